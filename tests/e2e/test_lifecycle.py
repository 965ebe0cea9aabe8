"""Overload, deadlines, graceful shutdown, loading and unloading versions, the per-member mode."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from artefact.manifest import OUTPUTS, sha256_of
from service.core.batching import BatchRecord
from tests.conftest import Gate, until_entered
from tests.e2e.conftest import (
    MODEL,
    Reference,
    ThreadServer,
    health_status,
    start_server_process,
    stop_server_process,
    thread_settings,
    triton_inputs,
)


@pytest.fixture
def own_repository(repository: Path, tmp_path: Path) -> Path:
    """A private copy of the repository that a test may change."""
    root = tmp_path / "repo"
    shutil.copytree(repository, root)
    return root


@pytest.fixture
def gated(own_repository: Path) -> Iterator[tuple[ThreadServer, Gate]]:
    """A server whose model runs wait at a gate the test opens; queue bound 2, no batching delay."""
    server = ThreadServer(thread_settings(own_repository, max_queue_size=2, max_queue_delay_ms=0, max_batch_size=8,
                                          instances=1))
    model = server.server.repository.get(MODEL)
    gate = Gate(model.batcher._runs[0])
    model.batcher._runs[0] = gate
    try:
        yield server, gate
    finally:
        gate.open.set()
        server.close()


def test_a_full_queue_answers_unavailable_at_once(gated: tuple[ThreadServer, Gate], reference: Reference) -> None:
    server, gate = gated

    async def main() -> tuple[list[object], float]:
        async with triton_aio.InferenceServerClient(server.url) as client:
            pixels = reference.images(1, seed=0)
            running = asyncio.ensure_future(client.infer(MODEL, triton_inputs(pixels)))
            await until_entered(gate)
            queued = [asyncio.ensure_future(client.infer(MODEL, triton_inputs(pixels))) for _ in range(2)]
            await asyncio.sleep(0.3)  # both are in the queue now (bound 2)
            labels = {"model": MODEL, "version": "1"}
            assert server.server.registry.get_sample_value("valley_queue_depth_requests", labels) == 2
            assert server.server.registry.get_sample_value("valley_in_flight_requests", labels) == 3
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as error:
                await client.infer(MODEL, triton_inputs(pixels))
            refused_after = time.monotonic() - started
            assert error.value.status() == "StatusCode.UNAVAILABLE" and "queue is full" in str(error.value.message())
            gate.open.set()
            return list(await asyncio.gather(running, *queued)), refused_after

    answers, refused_after = asyncio.run(main())
    assert len(answers) == 3 and refused_after < 1.0
    assert sum(gate.batches) == 3


def test_a_request_past_its_deadline_is_dropped_before_compute(gated: tuple[ThreadServer, Gate],
                                                               reference: Reference) -> None:
    server, gate = gated
    client = triton.InferenceServerClient(server.url)
    holder = threading.Thread(target=client.infer, args=(MODEL, triton_inputs(reference.images(1, seed=1))))
    holder.start()
    assert gate.entered.wait(10)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, triton_inputs(reference.images(5, seed=2)), client_timeout=0.3)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    gate.open.set()
    holder.join(10)
    client.infer(MODEL, triton_inputs(reference.images(2, seed=3)))
    assert gate.batches == [1, 2], "the expired 5-image request must never reach the model"
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 3 and int(stats["inference_stats"]["fail"]["count"]) == 1


def test_shutdown_lets_in_flight_requests_finish_and_refuses_new_ones(gated: tuple[ThreadServer, Gate],
                                                                      reference: Reference) -> None:
    server, gate = gated
    client = triton.InferenceServerClient(server.url)
    pixels = reference.images(1, seed=4)
    results: list[triton.InferResult] = []
    in_flight = threading.Thread(target=lambda: results.append(client.infer(MODEL, triton_inputs(pixels))))
    in_flight.start()
    assert gate.entered.wait(10)
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)
    deadline = time.monotonic() + 10
    while not server.server.inference.shutting_down and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, triton_inputs(pixels))
    assert error.value.status() == "StatusCode.UNAVAILABLE"
    gate.open.set()
    in_flight.join(10)
    stopping.result(10)
    assert len(results) == 1
    np.testing.assert_allclose(results[0].as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)


def test_sigterm_drains_a_burst_and_exits_cleanly(own_repository: Path, reference: Reference) -> None:
    server = start_server_process(own_repository, "--max-queue-delay-ms", "20")
    batches = [reference.images(4, seed=10 + i) for i in range(40)]

    async def burst() -> list[object]:
        async with triton_aio.InferenceServerClient(server.url) as client:
            requests = [asyncio.ensure_future(client.infer(MODEL, triton_inputs(pixels))) for pixels in batches]
            await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*requests, return_exceptions=True))

    answers = asyncio.run(burst())
    log = stop_server_process(server)
    assert server.process.returncode == 0, log
    assert "shutting down" in log and "stopped" in log and "Traceback" not in log
    served = [(a, p) for a, p in zip(answers, batches, strict=True) if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, InferenceServerException)]
    assert len(served) + len(refused) == len(batches), [a for a in answers if isinstance(a, BaseException)]
    assert all(a.status() == "StatusCode.UNAVAILABLE" for a in refused)
    assert served, "requests already sent when SIGTERM came must be answered"
    for answer, pixels in served:
        np.testing.assert_allclose(answer.as_numpy("probabilities"),  # type: ignore[attr-defined]
                                   reference(pixels)["probabilities"], atol=1e-6)


def _publish(source: Path, version: int) -> Path:
    """A copy of version folder `source` as `version` of the same ensemble, as an export would write it."""
    target = source.parent / str(version)
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    return target


def _corrupt(version_dir: Path) -> None:
    graph = version_dir / "ensemble.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))


def test_new_versions_swap_in_and_bad_ones_are_refused(own_repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(own_repository)) as server:
        client = triton.InferenceServerClient(server.url)
        pixels = reference.images(2, seed=5)
        _publish(own_repository / MODEL / "1", 2)
        client.load_model(MODEL)
        assert client.get_model_metadata(MODEL, as_json=True)["versions"] == ["2"]
        assert client.infer(MODEL, triton_inputs(pixels)).get_response().model_version == "2"

        _corrupt(_publish(own_repository / MODEL / "2", 3))
        with pytest.raises(InferenceServerException) as error:
            client.load_model(MODEL)
        assert error.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "sha256" in str(error.value.message()) and "version 2 keeps serving" in str(error.value.message())
        result = client.infer(MODEL, triton_inputs(pixels))
        assert result.get_response().model_version == "2"
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)
        index = {m["version"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["2"]["state"] == "READY" and index["3"]["state"] == "UNAVAILABLE"
        assert "sha256" in index["3"]["reason"] and index["1"]["state"] == "UNAVAILABLE"


def test_unload_and_load_again(own_repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(own_repository)) as server:
        client = triton.InferenceServerClient(server.url)
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        assert client.is_server_ready(), "an unloaded model does not make the server unready"
        assert health_status(server.ports.grpc, MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, triton_inputs(reference.images(1, seed=6)))
        assert error.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in str(error.value.message())
        index = client.get_model_repository_index(as_json=True)["models"]
        assert [(m["name"], m["state"], m["reason"]) for m in index] == [(MODEL, "UNAVAILABLE", "unloaded")]
        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
        assert health_status(server.ports.grpc, MODEL) == health_pb2.HealthCheckResponse.SERVING


def _unreadable_graph(version_dir: Path) -> None:
    """A graph onnxruntime cannot parse, with the sha256 the manifest records (so only loading fails)."""
    graph = version_dir / "ensemble.onnx"
    graph.write_bytes(b"not an onnx graph")
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["fused"]["sha256"] = sha256_of(graph)
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "reason"), [(_corrupt, "sha256"), (_unreadable_graph, "refused")])
def test_a_bad_ensemble_at_start_is_reported_and_the_rest_serve(own_repository: Path, reference: Reference,
                                                               damage: Callable[[Path], None], reason: str) -> None:
    broken = own_repository / "broken" / "1"
    shutil.copytree(own_repository / MODEL / "1", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "name": "broken"}))
    damage(broken)
    with ThreadServer(thread_settings(own_repository)) as server:
        client = triton.InferenceServerClient(server.url)
        assert client.is_model_ready(MODEL) and not client.is_model_ready("broken")
        assert not client.is_server_ready(), "a refused ensemble keeps the server unready, as in Triton"
        assert health_status(server.ports.grpc) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferenceServerException) as error:
            client.infer("broken", triton_inputs(reference.images(1, seed=7)))
        assert error.value.status() == "StatusCode.UNAVAILABLE" and reason in str(error.value.message())
        with pytest.raises(InferenceServerException) as error:
            client.load_model("broken")
        assert error.value.status() == "StatusCode.FAILED_PRECONDITION", error.value.message()
        client.infer(MODEL, triton_inputs(reference.images(1, seed=7)))
        client.unload_model("broken")
        assert client.is_server_ready(), "once the bad ensemble is unloaded the server is ready"


def test_load_takes_names_not_paths(own_repository: Path) -> None:
    with ThreadServer(thread_settings(own_repository)) as server:
        client = triton.InferenceServerClient(server.url)
        for name in ("../repo/synth", str(own_repository / MODEL), ".hidden"):
            with pytest.raises(InferenceServerException) as error:
                client.load_model(name)
            assert error.value.status() == "StatusCode.NOT_FOUND", name
        assert client.is_server_ready()


def test_per_member_execution_gives_the_fused_answers(own_repository: Path, reference: Reference,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    times: list[list[float]] = []
    with ThreadServer(thread_settings(own_repository, execution="members")) as server:
        model = server.server.repository.get(MODEL)
        assert len(model.instances) == 2 and all(i.execution == "members" for i in model.instances)
        observe = server.server.observer.observe_batch

        def record(name: str, version: int, classes: Sequence[str], batch: BatchRecord) -> None:
            times.append(batch.member_seconds)  # each member's time comes back in the run's record
            observe(name, version, classes, batch)

        monkeypatch.setattr(server.server.observer, "observe_batch", record)
        client = triton.InferenceServerClient(server.url)
        pixels = reference.images(9, seed=8)
        result = client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput(n) for n in OUTPUTS])
        expected = reference(pixels)
        for name in OUTPUTS:
            np.testing.assert_allclose(result.as_numpy(name), expected[name], atol=1e-5, err_msg=name)
        members = len(model.ensemble.manifest.members)
        assert len(times) == 1 and len(times[0]) == members and all(t > 0 for t in times[0])


def test_bad_settings_exit_2_with_the_flag_named(repository: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "service.cli", "--repository", str(repository),
                             "--max-batch-size", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--max-batch-size" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "service.cli", "--repository", "/nonexistent"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a folder" in result.stderr
    for ready_file in ("/nonexistent/ready.json", str(repository), ""):
        result = subprocess.run([sys.executable, "-m", "service.cli", "--repository", str(repository),
                                 "--ready-file", ready_file], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--ready-file" in result.stderr and "Traceback" not in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "service.cli", "--repository", str(repository), "--host",
                                 "127.0.0.1", "--grpc-port", port, "--metrics-port", "0", "--http-port", "0"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"cannot listen for gRPC on 127.0.0.1:{port}" in result.stderr
        result = subprocess.run([sys.executable, "-m", "service.cli", "--repository", str(repository), "--host",
                                 "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", port],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    env_port = subprocess.run([sys.executable, "-c", "from service.cli import parse_settings; "
                               "print(parse_settings(['--repository', 'r']).grpc_port)"], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env={"VALLEY_GRPC_PORT": "9123",
                                                                               "PATH": "/usr/bin"})
    assert env_port.stdout.strip() == "9123", env_port.stderr



def test_port_0_is_announced_on_stdout_and_in_the_ready_file(repository: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import REPO

    ready_file = tmp_path / "ready.json"
    command = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--host", "127.0.0.1",
               "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--ready-file", str(ready_file)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready_file.is_file():
            assert process.poll() is None and time.monotonic() < deadline, "valley-serve wrote no ready file"
            time.sleep(0.05)
        assert process.stdout is not None
        line = process.stdout.readline()  # printed before the file is written
        announced = json.loads(line)
        assert ready_file.read_text() == line and announced["ready"] is True and announced["pid"] == process.pid
        assert health_status(announced["grpc_port"]) == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{announced['metrics_port']}/metrics", timeout=10) as answer:
            assert b"valley_model_ready" in answer.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{announced['http_port']}/v2/health/ready", timeout=10) as answer:
            assert json.loads(answer.read()) == {"ready": True}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0 and not ready_file.exists(), "the ready file goes with the server"
