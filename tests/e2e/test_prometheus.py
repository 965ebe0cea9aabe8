"""The Prometheus rules are valid and do what their unit tests say; the server's /metrics passes promtool."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from tests.conftest import REPO
from tests.e2e.conftest import MODEL, Reference, ThreadServer, thread_settings

RULES = REPO / "deploy" / "prometheus"


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=RULES, input=stdin, capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_served_metrics_pass_promtool(repository: Path, reference: Reference) -> None:
    server = ThreadServer(thread_settings(repository))
    try:
        pixels = reference.images(3, seed=0)
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(pixels))
        triton.InferenceServerClient(server.url).infer(MODEL, [tensor], request_id="x")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()
    assert "valley_confidence_ratio_bucket" in text
    linted = _promtool("check", "metrics", stdin=text)
    assert linted.returncode == 0 and not linted.stdout.strip() and not linted.stderr.strip(), \
        linted.stdout + linted.stderr
