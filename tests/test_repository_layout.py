"""The repository's layout rules, owned by artefact/repository.py: version names, the next version, publishing by
rename, withdrawing, and tidying what killed processes leave."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from artefact.repository import (
    next_version,
    publish,
    published_versions,
    staging_folder,
    tidy,
    version_folders,
    version_of,
    withdraw,
)

DAY = 86_400.0


@pytest.mark.parametrize(("text", "version"), [("1", 1), ("42", 42), ("01", None), ("0", None), ("³", None),
                                               ("\u0661", None), ("-1", None), (" 2", None), ("1e3", None), ("", None),
                                               ("1234567890", None)])
def test_a_version_has_one_spelling(text: str, version: int | None) -> None:
    assert version_of(text) == version


def _version(folder: Path, number: int, manifest: bool = True) -> Path:
    path = folder / str(number)
    path.mkdir(parents=True)
    if manifest:
        (path / "manifest.json").write_text("{}")
    return path


def test_the_next_version_counts_every_version_folder_and_nothing_else(tmp_path: Path) -> None:
    assert next_version(tmp_path / "absent") == 1
    _version(tmp_path, 1)
    _version(tmp_path, 4, manifest=False)  # an export that wrote its number without its manifest yet
    (tmp_path / "07").mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    (tmp_path / ".refused-12-abcd").mkdir()
    assert version_folders(tmp_path) == [1, 4] and published_versions(tmp_path) == [1]
    assert next_version(tmp_path) == 5


def test_publishing_never_overwrites_unless_asked_and_leaves_nothing_hidden(tmp_path: Path) -> None:
    staging = staging_folder(tmp_path, "staging", 1)
    (staging / "manifest.json").write_text('{"v": 1}')
    publish(staging, tmp_path / "1")
    again = staging_folder(tmp_path, "staging", 1)
    (again / "manifest.json").write_text('{"v": 2}')
    with pytest.raises(FileExistsError):
        publish(again, tmp_path / "1")
    assert (tmp_path / "1" / "manifest.json").read_text() == '{"v": 1}'
    publish(again, tmp_path / "1", replace=True)
    assert (tmp_path / "1" / "manifest.json").read_text() == '{"v": 2}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1"]
    hidden = withdraw(tmp_path / "1")
    assert hidden.name.startswith(".refused-1-") and next_version(tmp_path) == 1, "a withdrawn number is reused"


def _aged(path: Path, seconds: float) -> Path:
    path.mkdir(parents=True)
    (path / "file").write_text("x")
    stamp = time.time() - seconds
    for item in (path / "file", path):
        os.utime(item, (stamp, stamp))
    return path


def test_tidy_removes_stale_work_restores_an_interrupted_replacement_and_ages_out_withdrawn_versions(
        tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _version(folder, 1)
    _aged(folder / ".staging-3-1234", 2 * DAY)
    _aged(folder / ".staging-4-5678", 60)  # an export writing now
    _aged(folder / ".recalibrating--abcdef012345", 2 * DAY)
    _aged(folder / ".retired-1-9999", 60)  # its replacement was published: only the old copy is left
    _aged(folder / ".retired-2-aaaa", 60)  # killed between the renames: version 2 is only here
    _aged(folder / ".refused-5-bbbb", 30 * DAY)
    _aged(folder / ".refused-6-cccc", DAY)
    _aged(folder / ".6.partial", 30 * DAY)  # not ours: left alone
    done = tidy(tmp_path)
    assert sorted(done.removed) == ["m/.recalibrating--abcdef012345", "m/.refused-5-bbbb", "m/.retired-1-9999",
                                    "m/.staging-3-1234"]
    assert done.restored == ["m/2"] and sorted(done.kept) == ["m/.refused-6-cccc", "m/.staging-4-5678"]
    assert sorted(path.name for path in folder.iterdir()) == [".6.partial", ".refused-6-cccc", ".staging-4-5678",
                                                              "1", "2"]
    assert (folder / "2" / "file").read_text() == "x"
    assert not tidy(tmp_path).removed, "tidy is idempotent"


def test_tidy_lists_what_it_cannot_remove_instead_of_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    _aged(folder / ".staging-3-1234", 2 * DAY)

    def read_only(path: Path) -> None:  # what a repository mounted read-only answers (root ignores permissions)
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr("artefact.repository.shutil.rmtree", read_only)
    done = tidy(tmp_path)
    assert done.failed == ["m/.staging-3-1234 (Read-only file system)"] and not done.removed
    assert (folder / ".staging-3-1234").is_dir()
