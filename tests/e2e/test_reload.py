"""valley-reload: a running server loads the version a training job has just written, or keeps its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import tritonclient.grpc as triton

from service.launch import ServerProcess
from tests.conftest import REPO
from tests.e2e.conftest import MODEL


def _publish(repository: Path, version: int) -> Path:
    """Copy version 1 as `version`, as an export of the same ensemble would write it."""
    target = repository / MODEL / str(version)
    shutil.copytree(repository / MODEL / "1", target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    return target


def _reload(target: str, *flags: str) -> tuple[int, list[dict[str, object]], str]:
    result = subprocess.run([sys.executable, "-m", "service.control.reload", "--target", target, "--model", MODEL,
                             "--timeout", "60", *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, lines, result.stderr


def test_reload_swaps_in_the_new_version_and_keeps_serving_when_one_is_refused(
        versioned: tuple[Path, ServerProcess]) -> None:
    repository, server = versioned
    target = f"127.0.0.1:{server.grpc_port}"
    client = triton.InferenceServerClient(target)
    assert client.get_model_metadata(MODEL).versions == ["1"]
    _publish(repository, 2)
    code, lines, stderr = _reload(target)
    assert code == 0, stderr
    assert lines == [{"model": MODEL, "address": target, "ok": True, "version": "2", "error": ""}]
    assert client.get_model_metadata(MODEL).versions == ["2"]

    broken = _publish(repository, 3)
    (broken / json.loads((broken / "manifest.json").read_text())["fused"]["file"]).write_bytes(b"not onnx")
    code, lines, _ = _reload(target)
    assert code == 1 and lines[0]["ok"] is False
    assert "version 3" in str(lines[0]["error"]) and "version 2 keeps serving" in str(lines[0]["error"])
    assert client.get_model_metadata(MODEL).versions == ["2"]
    assert client.is_model_ready(MODEL)


def test_reload_reports_servers_it_cannot_reach_and_bad_targets() -> None:
    code, lines, _ = _reload("127.0.0.1:1")
    assert code == 1 and lines[0]["ok"] is False and "UNAVAILABLE" in str(lines[0]["error"])
    for target in ("no-port-here", "127.0.0.1:99999"):
        code, _, stderr = _reload(target)
        assert code == 2 and "HOST:PORT" in stderr, target
