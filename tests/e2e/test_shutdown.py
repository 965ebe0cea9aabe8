"""SIGTERM under load: every request the server took is answered (streams included), later ones are refused
UNAVAILABLE, and the process exits within its grace period even while a version is loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO
from tests.e2e.conftest import MODEL, Reference, http_inputs, start_server_process, triton_inputs

GRACE_S = 4.0


def _slow_version(repository: Path, version: int) -> None:
    """A version whose graph is an 8 GB sparse file: verifying it hashes for seconds, then refuses it."""
    target = repository / MODEL / str(version)
    shutil.copytree(repository / MODEL / "1", target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    with open(target / manifest["fused"]["file"], "wb") as graph:
        graph.truncate(8 << 30)


@pytest.fixture
def own(exported: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    return repository


class Unary(threading.Thread):
    """Sends requests without pause until the server is gone; keeps every outcome."""

    def __init__(self, url: str, reference: Reference, seed: int) -> None:
        super().__init__()
        self.url, self.reference, self.seed = url, reference, seed
        self.answered, self.refused, self.other = 0, 0, list[str]()

    def run(self) -> None:
        client = triton.InferenceServerClient(self.url)
        rng = np.random.default_rng(self.seed)
        refusals_in_a_row = 0
        while refusals_in_a_row < 20:
            pixels = self.reference.images(int(rng.integers(1, 5)), seed=int(rng.integers(1 << 30)))
            try:
                result = client.infer(MODEL, triton_inputs(pixels), client_timeout=30)
            except InferenceServerException as error:
                if error.status() == "StatusCode.UNAVAILABLE":
                    self.refused += 1
                    refusals_in_a_row += 1
                    time.sleep(0.01)
                else:
                    self.other.append(f"{error.status()}: {error.message()}")
                    return
                continue
            refusals_in_a_row = 0
            if np.allclose(result.as_numpy("probabilities"), self.reference(pixels)["probabilities"], atol=1e-5):
                self.answered += 1
            else:
                self.other.append("wrong probabilities")


class HttpUnary(threading.Thread):
    """`Unary` over HTTP: 503 while the server drains, then no connection once it has gone."""

    def __init__(self, url: str, reference: Reference, seed: int) -> None:
        super().__init__()
        self.url, self.reference, self.seed = url, reference, seed
        self.answered, self.refused, self.gone, self.other = 0, 0, 0, list[str]()

    def run(self) -> None:
        client = triton_http.InferenceServerClient(self.url, network_timeout=30)
        rng = np.random.default_rng(self.seed)
        while self.gone < 20:
            pixels = self.reference.images(int(rng.integers(1, 5)), seed=int(rng.integers(1 << 30)))
            try:
                result = client.infer(MODEL, http_inputs(pixels))
            except InferenceServerException as error:
                if error.status() == "503" and "shutting down" in str(error.message()):
                    self.refused += 1
                    time.sleep(0.01)
                else:
                    self.other.append(f"{error.status()}: {error.message()}")
                    return
                continue
            except OSError:  # the port has closed: the server is gone
                self.gone += 1
                time.sleep(0.01)
                continue
            if np.allclose(result.as_numpy("probabilities"), self.reference(pixels)["probabilities"], atol=1e-5):
                self.answered += 1
            else:
                self.other.append("wrong probabilities")


class Stream(threading.Thread):
    """One stream sending requests with ids s0, s1, ... until the server ends it; keeps every answer."""

    def __init__(self, url: str, reference: Reference) -> None:
        super().__init__()
        self.url, self.reference = url, reference
        self.pixels = reference.images(2, seed=7)
        self.answers: dict[str, str] = {}
        self.ended: InferenceServerException | None = None
        self.sent = 0
        self._ended = threading.Event()

    def _on_answer(self, result: triton.InferResult | None, error: InferenceServerException | None) -> None:
        if result is not None:
            request_id = result.get_response().id
            good = np.allclose(result.as_numpy("probabilities"), self.reference(self.pixels)["probabilities"],
                               atol=1e-5)
            self.answers[request_id] = "ok" if good else "wrong"
        elif error is not None and error.message().startswith("UNAVAILABLE: the server is shutting down") \
                and "send the request to another replica" in error.message():
            self.answers[f"s{len(self.answers)}-refused"] = "refused"  # a per-request answer (error_message)
        else:
            self.ended = error
            self._ended.set()

    def run(self) -> None:
        client = triton.InferenceServerClient(self.url)
        client.start_stream(self._on_answer)
        try:
            while not self._ended.is_set() and self.sent < 100_000:
                try:
                    client.async_stream_infer(MODEL, triton_inputs(self.pixels), request_id=f"s{self.sent}")
                except InferenceServerException:
                    break
                self.sent += 1
                time.sleep(0.002)
            self._ended.wait(30)
        finally:
            client.stop_stream(cancel_requests=True)


def test_sigterm_under_load_loses_no_accepted_request_and_exits_within_the_grace(own: Path,
                                                                                reference: Reference) -> None:
    server = start_server_process(own, "--shutdown-grace-s", str(GRACE_S), "--max-queue-delay-ms", "5")
    unary = [Unary(server.url, reference, seed) for seed in range(2)]
    streams = [Stream(server.url, reference) for _ in range(2)]
    over_http = HttpUnary(server.http_url, reference, 3)
    for thread in (*unary, *streams, over_http):
        thread.start()
    _slow_version(own, 2)
    loading: list[BaseException] = []

    def load() -> None:
        try:
            triton.InferenceServerClient(server.url).load_model(MODEL)
        except InferenceServerException as error:
            loading.append(error)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(1.5)  # load under way (hashing), requests flowing
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(GRACE_S + 30)
    exited = time.monotonic() - sent
    for thread in (*unary, *streams, loader, over_http):
        thread.join(60)
    log = server.log.read_text() if server.log else ""
    assert code == 0, log
    assert exited < GRACE_S, f"exited {exited:.1f} s after SIGTERM (grace {GRACE_S} s)"
    assert "Traceback" not in log
    for client in unary:
        assert not client.other, client.other[:3]
        assert client.answered > 0 and client.refused > 0
    assert not over_http.other, over_http.other[:3]
    assert over_http.answered > 0 and over_http.refused > 0, "HTTP requests too are served, then refused 503"
    for stream in streams:
        served = sorted(int(key[1:]) for key, value in stream.answers.items() if value == "ok")
        assert "wrong" not in stream.answers.values()
        assert served == list(range(len(served))), "a request read before a later answered one went unanswered"
        assert served, "the stream was served before the shutdown"
        assert stream.ended is not None and "UNAVAILABLE" in str(stream.ended.status()), stream.ended
        assert "shutting down" in stream.ended.message()
    assert loading, "the load in progress was not reported as finished"
    print(f"SIGTERM under load: exit {exited:.2f} s after the signal (grace {GRACE_S} s); unary answered "
          f"{sum(c.answered for c in unary)}, refused {sum(c.refused for c in unary)}; streams answered "
          f"{sum(len(s.answers) for s in streams)} of {sum(s.sent for s in streams)} sent")


def test_sigterm_while_loading_at_start_exits_within_the_grace(own: Path, tmp_path: Path) -> None:
    _slow_version(own, 2)
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--repository", str(own), "--grpc-port", "0", "--metrics-port", "0",
             "--http-port", "0", "--shutdown-grace-s", str(GRACE_S)], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        ends = time.monotonic() + 60
        while "loading ensembles" not in log.read_text():
            assert time.monotonic() < ends and process.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        exited = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, log.read_text()
    assert exited < GRACE_S, f"exited {exited:.1f} s after SIGTERM (grace {GRACE_S} s)"
    print(f"SIGTERM while loading at start: exit {exited:.2f} s after the signal (grace {GRACE_S} s)")
    assert "stopped" in log.read_text() and "Traceback" not in log.read_text()
