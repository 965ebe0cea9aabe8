"""What a client sees of an error: the status of our errors, one short line, no path of the server's disk."""

from __future__ import annotations

from service.errors import INTERNAL_MESSAGE, MAX_MESSAGE, InvalidInput, LoadFailed, status_of


def test_host_paths_become_the_ensembles_own_and_internal_errors_say_nothing() -> None:
    error = LoadFailed("version 3 of 'synth' was refused: /srv/secret/repository/synth/3/manifest.json: changed")
    status = status_of(error)
    assert status.code == "FAILED_PRECONDITION"
    assert status.message == "version 3 of 'synth' was refused: synth/3/manifest.json: changed"
    assert status_of(RuntimeError("/srv/secret/x.onnx failed")).message == INTERNAL_MESSAGE


def test_client_strings_are_cut_and_kept_on_one_line() -> None:
    status = status_of(InvalidInput(f"no output named {'o' * 5000!r}\nsecond line"))
    assert status.code == "INVALID_ARGUMENT"
    assert len(status.message) <= MAX_MESSAGE and "\n" not in status.message
    assert status.message.startswith("no output named 'ooo") and status.message.endswith("(message cut)")
