"""What a container runtime relies on: the Deployment's probes while models load, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from tests.conftest import REPO
from tests.e2e.conftest import (
    MODEL,
    Reference,
    free_port,
    health_status,
    start_server_process,
    stop_server_process,
    triton_inputs,
)
from tests.kube import find, pod_spec, render

SERVING, NOT_SERVING = 1, 2


def _deployment_probes() -> dict[str, str]:
    """The grpc.health.v1 service each probe of the rendered Deployment asks for."""
    container = pod_spec(find(render("overlays/cpu"), "Deployment"))["containers"][0]
    return {probe: container[probe]["grpc"]["service"] for probe in ("startupProbe", "livenessProbe",
                                                                     "readinessProbe")}


def test_the_deployments_probes_pass_while_ensembles_load_and_readiness_waits_until_it_serves(
        exported: Path, reference: Reference, tmp_path: Path) -> None:
    probes = _deployment_probes()
    repository = tmp_path / "repository"
    names = [f"{MODEL}-{copy:02d}" for copy in range(12)]  # enough ensembles that loading takes a second or more
    for name in names:
        version = repository / name / "1"
        shutil.copytree(exported, version)
        manifest = json.loads((version / "manifest.json").read_text())
        (version / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    port, health_port = free_port(), free_port()  # the probes ask the health-only port, as in the Deployment
    command = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--grpc-port", str(port),
               "--http-port", "0", "--health-port", str(health_port), "--metrics-port", "0", "--instances", "1",
               "--log-level", "WARNING", "--members", "full"]  # answers compared with the fused graph
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: list[tuple[int, int, int]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                states = (health_status(health_port, probes["startupProbe"]),
                          health_status(health_port, probes["livenessProbe"]),
                          health_status(health_port, probes["readinessProbe"]))
            except Exception:  # the port is not open yet
                time.sleep(0.02)
                continue
            seen.append(states)
            if states[2] == SERVING:
                break
            time.sleep(0.02)
        assert (SERVING, SERVING, NOT_SERVING) in seen, f"never seen started and alive while loading: {seen[:5]}"
        assert seen[-1] == (SERVING, SERVING, SERVING), "ready once every ensemble is loaded, and still alive"
        assert all(start == live == SERVING for start, live, _ in seen), "startup and liveness never wait for models"
        # Ready means serving: every ensemble answers at once, right after the first ready probe.
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        pixels = reference.images(2, seed=3)
        for name in names:
            answer = client.infer(name, triton_inputs(pixels)).as_numpy("probabilities")
            np.testing.assert_allclose(answer, reference(pixels)["probabilities"], rtol=1e-5, atol=1e-6)
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
