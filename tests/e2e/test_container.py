"""What a container runtime relies on: liveness before the models load, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.e2e.conftest import MODEL, health_status, start_server_process, stop_server_process

SERVING, NOT_SERVING = 1, 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_liveness_answers_while_ensembles_load_and_readiness_waits(exported: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for copy in range(12):  # enough ensembles that loading them takes a second or more
        version = repository / f"{MODEL}-{copy:02d}" / "1"
        shutil.copytree(exported, version)
        manifest = json.loads((version / "manifest.json").read_text())
        (version / "manifest.json").write_text(json.dumps({**manifest, "name": f"{MODEL}-{copy:02d}"}))
    port = _free_port()
    command = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--grpc-port", str(port),
               "--metrics-port", "0", "--instances", "1", "--log-level", "WARNING"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                live, ready = health_status(port, "liveness"), health_status(port, "")
            except Exception:  # the port is not open yet
                time.sleep(0.02)
                continue
            seen.append((live, ready))
            if ready == SERVING:
                break
            time.sleep(0.02)
        assert (SERVING, NOT_SERVING) in seen, f"never seen alive while loading: {seen[:5]}"
        assert seen[-1] == (SERVING, SERVING), "ready once every ensemble is loaded, and still alive"
        assert all(live == SERVING for live, _ in seen), "liveness never waits for the models"
    finally:
        process.terminate()
        process.wait(60)


def test_json_logs_are_one_object_per_line(repository: Path) -> None:
    server = start_server_process(repository, "--log-format", "json")
    log = stop_server_process(server)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"level"' in line]
    assert records, log
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("ready" in record["message"] for record in records)
    assert all(line.startswith("{") for line in log.splitlines() if line.strip()), "no text line among them"
