"""Versions swapped under load: model-control modes, version policies, verification, refusals, odd repositories."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service.core.inference import InferenceRequest
from service.core.tensors import Values, WireTensor
from service.launch import ServerProcess
from tests.e2e.conftest import (
    MODEL,
    Reference,
    ThreadServer,
    start_server_process,
    stop_server_process,
    thread_settings,
    triton_inputs,
)

CORRUPTIONS = ("graph", "outside", "samples", "manifest")


def _publish(repository: Path, version: int, corrupt: str = "", name: str = MODEL) -> None:
    """Write `name/version` as a copy of version 1, the way an export does: aside, then renamed into place."""
    source = repository / MODEL / "1"
    aside = repository / name / f".{version}.partial"
    shutil.copytree(source, aside)
    manifest = json.loads((aside / "manifest.json").read_text())
    manifest.update(version=version, name=name)
    if corrupt == "graph":
        (aside / manifest["fused"]["file"]).write_bytes(b"not an onnx graph")
    elif corrupt == "outside":
        manifest["fused"]["file"] = f"../1/{manifest['fused']['file']}"
    elif corrupt == "samples":
        manifest["samples"]["probabilities"] = [row[::-1] for row in manifest["samples"]["probabilities"]]
    (aside / "manifest.json").write_text("{ not json" if corrupt == "manifest" else json.dumps(manifest))
    os.rename(aside, repository / name / str(version))


@pytest.fixture
def own(exported: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    return repository


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    ends = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < ends, "the repository change was not taken up in time"
        time.sleep(0.05)


def _index(client: triton.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in client.get_model_repository_index().models}


@dataclass
class Load:
    """Clients sending requests without pause (two unary, one stream) and checking every answer."""

    url: str
    reference: Reference
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _check(self, result: triton.InferResult, pixels: np.ndarray) -> None:
        probabilities = result.as_numpy("probabilities")
        if probabilities is None or not np.allclose(probabilities, self.reference(pixels)["probabilities"],
                                                    atol=1e-5):
            self.failures.append("wrong probabilities")
        self.versions.add(result.get_response().model_version)
        self.answered += 1

    def _unary(self, seed: int) -> None:
        client = triton.InferenceServerClient(self.url)
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            pixels = self.reference.images(int(rng.integers(1, 9)), seed=int(rng.integers(1 << 30)))
            try:
                self._check(client.infer(MODEL, triton_inputs(pixels), client_timeout=30), pixels)
            except InferenceServerException as error:
                self.failures.append(f"{error.status()}: {error.message()}")

    def _stream(self) -> None:
        client = triton.InferenceServerClient(self.url)
        pixels = self.reference.images(4, seed=99)
        answers: list[tuple[triton.InferResult | None, InferenceServerException | None]] = []
        arrived = threading.Semaphore(0)

        def on_answer(result: triton.InferResult | None, error: InferenceServerException | None) -> None:
            answers.append((result, error))
            arrived.release()

        client.start_stream(on_answer)
        try:
            while not self._stop.is_set():
                client.async_stream_infer(MODEL, triton_inputs(pixels))
                if not arrived.acquire(timeout=30):
                    self.failures.append("a stream answer did not come within 30 s")
                    return
                result, error = answers.pop()
                if error is not None or result is None:
                    self.failures.append(f"stream: {error}")
                else:
                    self._check(result, pixels)
        finally:
            client.stop_stream()

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._unary, args=(seed,)) for seed in range(2)]
        self._threads.append(threading.Thread(target=self._stream))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_twenty_swaps_under_load_through_polling_and_rpc_lose_no_request(own: Path, reference: Reference) -> None:
    """Ten versions published into a polled repository, ten loaded by RPC (a pin, a rollback, an unpin among them),
    one in four corrupt: every request sent meanwhile is answered, correctly."""
    swaps = refused = 0
    polled = start_server_process(own, "--model-control-mode", "poll", "--repository-poll-s", "0.2")
    try:
        client = triton.InferenceServerClient(polled.url)
        with Load(polled.url, reference) as load:
            for version in range(2, 12):
                corrupt = CORRUPTIONS[version // 4 % 4] if version % 4 == 0 else ""
                _publish(own, version, corrupt)
                if corrupt:
                    _until(lambda: _metric(polled, "valley_model_load_failures_total", model=MODEL,
                                           version=str(version)) > 0)  # noqa: B023 (called at once)
                    refused += 1
                else:
                    _until(lambda: client.get_model_metadata(MODEL).versions == [str(version)])  # noqa: B023
                swaps += 1
                time.sleep(0.3)
        assert not load.failures, load.failures[:5]
        assert load.answered > 50 and {"1", "11"} <= load.versions, (load.answered, load.versions)
        print(f"polled swaps: {load.answered} requests answered, {len(load.failures)} failed, versions served "
              f"{sorted(load.versions, key=int)}")
        for version in (4, 8):
            assert _metric(polled, "valley_model_load_failures_total", model=MODEL, version=str(version)) == 1, \
                "a refused version is counted once, and not tried again while it is unchanged"
        shutil.rmtree(own / MODEL / "11")
        _until(lambda: client.get_model_metadata(MODEL).versions == ["10"])
    finally:
        stop_server_process(polled)

    explicit = start_server_process(own)
    try:
        client = triton.InferenceServerClient(explicit.url)
        with Load(explicit.url, reference) as load:
            for version in range(12, 22):
                corrupt = CORRUPTIONS[version % 4] if version % 4 == 1 else ""
                _publish(own, version, corrupt)
                if version == 15:  # roll back: pin an older version, then unpin
                    client.load_model(MODEL, config=json.dumps({"version_policy": {"specific": {"versions": [10]}}}))
                    assert client.get_model_metadata(MODEL).versions == ["10"]
                    client.load_model(MODEL, config=json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
                    assert client.get_model_metadata(MODEL).versions == ["15"]
                elif corrupt:
                    with pytest.raises(InferenceServerException, match=f"version {version}") as error:
                        client.load_model(MODEL)
                    assert "keeps serving" in str(error.value)
                    refused += 1
                else:
                    client.load_model(MODEL)
                    assert client.get_model_metadata(MODEL).versions == [str(version)]
                swaps += 1
                time.sleep(0.3)
        assert not load.failures, load.failures[:5]
        assert load.answered > 50 and {"10", "20"} <= load.versions, (load.answered, load.versions)
        print(f"RPC swaps: {load.answered} requests answered, {len(load.failures)} failed, versions served "
              f"{sorted(load.versions, key=int)}")
    finally:
        stop_server_process(explicit)
    assert swaps == 20 and refused == 5


def test_a_corrupt_newest_version_at_start_falls_back_and_odd_folders_are_reported(own: Path) -> None:
    _publish(own, 2)
    _publish(own, 3, corrupt="outside")
    (own / MODEL / "notes").mkdir()
    (own / MODEL / "9").mkdir()  # an export that never finished: no manifest
    (own / "bad name!").mkdir()
    (own / "README.txt").write_text("models live here\n")
    (own / ".trash").mkdir()
    server = start_server_process(own)
    try:
        client = triton.InferenceServerClient(server.url)
        assert client.is_server_ready() and client.get_model_metadata(MODEL).versions == ["2"]
        index = _index(client)
        state, reason = index[(MODEL, "3")]
        assert state == "UNAVAILABLE" and "not a file name in the version's folder" in reason
        assert index[(MODEL, "1")] == ("UNAVAILABLE", "not chosen by the version policy (latest:1)")
        assert "ignored: not a version" in index[(MODEL, "notes")][1]
        assert "no manifest.json" in index[(MODEL, "9")][1]
        assert "not an ensemble name" in index[("bad name!", "")][1]
        assert "not a folder" in index[("README.txt", "")][1]
        assert not any(name == ".trash" for name, _ in index)
        assert _metric(server, "valley_model_load_failures_total", model=MODEL, version="3") == 1
    finally:
        log = stop_server_process(server)
    assert log.count("the repository holds synth/notes") == 1, "each oddity is logged once"


def test_at_start_the_leftovers_of_killed_exports_are_tidied_and_an_interrupted_replacement_restored(
        own: Path) -> None:
    _publish(own, 2)
    os.rename(own / MODEL / "2", own / MODEL / ".retired-2-1a2b")  # killed between an overwrite's two renames
    stale = own / MODEL / ".staging-3-4242"
    shutil.copytree(own / MODEL / "1", stale)
    long_ago = time.time() - 2 * 86_400
    for path in (*stale.iterdir(), stale):
        os.utime(path, (long_ago, long_ago))
    shutil.copytree(own / MODEL / "1", own / MODEL / ".staging-4-4343")  # an export writing now
    server = start_server_process(own)
    try:
        client = triton.InferenceServerClient(server.url)
        assert client.get_model_metadata(MODEL).versions == ["2"], "the restored version serves"
        assert not any(name.startswith(".") for _, name in _index(client))
    finally:
        log = stop_server_process(server)
    assert sorted(path.name for path in (own / MODEL).iterdir()) == [".staging-4-4343", "1", "2"]
    assert log.count("leftovers of interrupted exports or recalibrations") == 1, log
    assert "removed synth/.staging-3-4242; restored synth/2; kept for now synth/.staging-4-4343" in log, log


def test_version_policies_serve_several_versions_and_config_files_pin_one(own: Path, reference: Reference) -> None:
    _publish(own, 2)
    _publish(own, 3)
    server = start_server_process(own, "--version-policy", "latest:2")
    try:
        client = triton.InferenceServerClient(server.url)
        assert client.get_model_metadata(MODEL).versions == ["2", "3"]
        pixels = reference.images(2, seed=1)
        for version, served in (("2", "2"), ("3", "3"), ("", "3")):
            result = client.infer(MODEL, triton_inputs(pixels), model_version=version)
            assert result.get_response().model_version == served
        with pytest.raises(InferenceServerException, match="serving: 2, 3"):
            client.infer(MODEL, triton_inputs(pixels), model_version="1")
        (own / MODEL / "config.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
        client.load_model(MODEL)
        assert client.get_model_metadata(MODEL).versions == ["1"]
        (own / MODEL / "config.json").write_text('{"version_policy": {"newest": {}}}')
        with pytest.raises(InferenceServerException, match=r"config\.json: version_policy must be one of"):
            client.load_model(MODEL)
        assert client.get_model_metadata(MODEL).versions == ["1"], "a broken config keeps what serves"
        with pytest.raises(InferenceServerException, match="config parameter is not JSON"):
            client.load_model(MODEL, config="{")
        (own / MODEL / "config.json").write_text(json.dumps({"version_policy": {"specific": {"versions": [1]}}}))
        with pytest.raises(InferenceServerException, match="version 7 of 'synth' is not in the repository"):
            client.load_model(MODEL, config=json.dumps({"version_policy": {"specific": {"versions": [7]}}}))
        assert client.is_model_ready(MODEL) and client.get_model_metadata(MODEL).versions == ["1"]
        assert _index(client)[(MODEL, "2")][1] == "not chosen by the version policy (specific:1)", \
            "a pin that could not be served is not kept"
    finally:
        stop_server_process(server)


def test_model_control_modes(own: Path) -> None:
    _publish(own, 1, name="other")
    fixed = start_server_process(own, "--model-control-mode", "none")
    try:
        client = triton.InferenceServerClient(fixed.url)
        assert client.is_model_ready(MODEL) and client.is_model_ready("other")
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException, match="--model-control-mode none") as error:
                call(MODEL)
            assert "FAILED_PRECONDITION" in str(error.value.status())
    finally:
        stop_server_process(fixed)
    chosen = start_server_process(own, "--model-control-mode", "explicit", "--load-models", "other")
    try:
        client = triton.InferenceServerClient(chosen.url)
        assert client.is_model_ready("other") and not client.is_model_ready(MODEL)
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    finally:
        stop_server_process(chosen)


def test_a_request_whose_version_retires_before_it_is_queued_is_served_by_the_next(own: Path,
                                                                                  reference: Reference) -> None:
    pixels = reference.images(2, seed=3)
    entered, release = threading.Event(), threading.Event()

    class Held(Sequence[int]):
        """The pixels' values, held in the decoding worker thread while the version is swapped."""

        def __init__(self) -> None:
            self.values = pixels.ravel().tolist()

        def __len__(self) -> int:
            entered.set()
            release.wait(30)
            return len(self.values)

        @overload
        def __getitem__(self, index: int) -> int: ...

        @overload
        def __getitem__(self, index: slice) -> Sequence[int]: ...

        def __getitem__(self, index: int | slice) -> int | Sequence[int]:
            return self.values[index]

    with ThreadServer(thread_settings(own)) as server:
        tensor = WireTensor("pixels", "UINT8", pixels.shape, Values(Held(), "data", flat=True))
        request = InferenceRequest(MODEL, "", "", [tensor], ("probabilities",), heavy=True)
        answer = asyncio.run_coroutine_threadsafe(server.server.inference.infer(request), server.loop)
        assert entered.wait(10)
        _publish(own, 2)
        server.run(server.server.repository.load(MODEL))  # version 1 retires: its batcher takes nothing more
        release.set()
        response = answer.result(30)
    assert response.version == "2"
    np.testing.assert_allclose(response.outputs["probabilities"], reference(pixels)["probabilities"], atol=1e-5)


def test_polling_keeps_a_serving_version_whose_files_break_and_forgets_removed_ensembles(own: Path,
                                                                                        reference: Reference) -> None:
    _publish(own, 1, name="other")
    server = start_server_process(own, "--model-control-mode", "poll", "--repository-poll-s", "0.2")
    try:
        client = triton.InferenceServerClient(server.url)
        fused = json.loads((own / MODEL / "1" / "manifest.json").read_text())["fused"]["file"]
        (own / MODEL / "1" / fused).write_bytes(b"overwritten under the server")
        _until(lambda: _metric(server, "valley_model_load_failures_total", model=MODEL, version="1") > 0)
        assert client.get_model_metadata(MODEL).versions == ["1"], "the verified copy in memory keeps serving"
        pixels = reference.images(2, seed=4)
        np.testing.assert_allclose(client.infer(MODEL, triton_inputs(pixels)).as_numpy("probabilities"),
                                   reference(pixels)["probabilities"], atol=1e-5)
        shutil.move(own / "other", own.parent / "other-aside")
        _until(lambda: not client.is_model_ready("other"))
        time.sleep(0.5)
        assert client.is_server_ready(), "a removed ensemble no longer counts for readiness"
        shutil.move(own.parent / "other-aside", own / "other")  # the same files, inodes and times
        _until(lambda: client.is_model_ready("other"))
        for odd in ("01", "²"):
            (own / MODEL / odd).mkdir()
        time.sleep(0.5)
        index = _index(client)
        assert "ignored: not a version" in index[(MODEL, "01")][1] and "ignored" in index[(MODEL, "²")][1]
        with pytest.raises(InferenceServerException, match="no version '²'"):
            client.infer(MODEL, triton_inputs(pixels), model_version="²")
    finally:
        log = stop_server_process(server)
    assert "Traceback" not in log
