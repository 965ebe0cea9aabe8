"""The Prometheus rules are valid and do what their unit tests say; the server's /metrics passes promtool."""

from __future__ import annotations

import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from artefact.metrics import accuracy, ece
from tests.conftest import REPO
from tests.e2e.conftest import (
    MODEL,
    Reference,
    ThreadServer,
    prometheus,
    prometheus_query,
    report,
    start_server_process,
    stop_server_process,
    thread_settings,
    triton_inputs,
)
from training.data import FASHION_MNIST_DIR, read_idx

RULES = REPO / "deploy" / "prometheus"


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=RULES, input=stdin, capture_output=True, text=True, timeout=120)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_served_metrics_pass_promtool(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository)) as server:
        pixels = reference.images(3, seed=0)
        triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels), request_id="x")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
    assert "valley_confidence_ratio_bucket" in text
    linted = _promtool("check", "metrics", stdin=text)
    assert linted.returncode == 0 and not linted.stdout.strip() and not linted.stderr.strip(), \
        linted.stdout + linted.stderr


def _until(url: str, promql: str, predicate: Callable[[float], bool], timeout: float = 90) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = prometheus_query(url, promql)
        except OSError:  # Prometheus still starting
            result = []
        if result and predicate(float(result[0]["value"][1])):
            return float(result[0]["value"][1])
        time.sleep(0.5)
    raise AssertionError(f"{promql} did not reach the expected value in {timeout} s")


def test_prometheus_computes_the_ece_training_computes(fashion_repository: Path, tmp_path: Path) -> None:
    """Predictions and labels for Fashion-MNIST test images; PromQL's ECE equals artefact.metrics.ece."""
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:600, None]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:600].astype(np.int64)
    server = start_server_process(fashion_repository)
    try:
        with prometheus(tmp_path, [server.metrics_port]) as url:
            client = triton.InferenceServerClient(server.url)
            served = []
            for start in range(0, len(images), 50):
                result = client.infer("fashion", triton_inputs(images[start:start + 50]), request_id=f"batch-{start}",
                                      outputs=[triton.InferRequestedOutput("probabilities")])
                served.append(result.as_numpy("probabilities"))
            sent = [(f"batch-{i - i % 50}", i % 50, int(labels[i])) for i in range(len(labels))]
            assert report(server.url, sent, model="fashion", timeout=30) == len(labels)
            _until(url, 'sum(valley_feedback_labels_total{model="fashion"})', lambda v: v == len(labels))
            probabilities = np.concatenate(served).astype(np.float64)
            expected = ece(probabilities, labels)
            live = _until(url, 'valley:feedback_ece:ratio{model="fashion"}',
                          lambda v: abs(v - expected) < 1e-6)
            assert live == pytest.approx(expected, abs=1e-6)
            accuracy_now = _until(url, 'valley:feedback_accuracy:ratio{model="fashion"}', lambda v: v > 0)
            assert accuracy_now == pytest.approx(accuracy(probabilities, labels), abs=1e-9)
            assert 0.5 < accuracy_now < 1.0, "a real, if small, Fashion-MNIST ensemble"
    finally:
        stop_server_process(server)
