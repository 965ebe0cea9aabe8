"""Real valley servers for end-to-end tests: a `valley-serve` process, or a `Server` in a thread.

The process is what users run (flags, env vars, signals). The in-thread server is the same
`service.server.Server` on a real port, for tests that must hold a model run at a gate to
fill the queue or pass a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service._proto.valley.v1 import feedback_pb2_grpc as feedback_grpc
from service.server import Ports, Server
from service.settings import Settings
from tests.conftest import REPO

T = TypeVar("T")
MODEL = "synth"


def triton_inputs(pixels: np.ndarray, name: str = "pixels", datatype: str = "UINT8") -> list[triton.InferInput]:
    """The one input tensor of a tritonclient request, holding `pixels`."""
    tensor = triton.InferInput(name, list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def wait_until_serving(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    """Poll grpc.health.v1 until the server says SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"valley-serve exited with {process.returncode} before it was ready")
        try:
            if health_status(port) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} did not become ready in {timeout} s")


@pytest.fixture(scope="session")
def repository(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the exported synthetic ensemble as `synth/1`."""
    root = tmp_path_factory.mktemp("serve-repo")
    shutil.copytree(exported, root / MODEL / "1")
    return root


@dataclass
class Reference:
    """The fused graph run in this process: what every served answer must equal."""

    session: onnxruntime.InferenceSession
    input_shape: tuple[int, ...]
    outputs: list[str]

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {"pixels": pixels})
        return dict(zip(self.outputs, values, strict=True))

    def images(self, count: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, (count, *self.input_shape), dtype=np.uint8)


@pytest.fixture(scope="session")
def reference(exported: Path) -> Reference:
    manifest = json.loads((exported / "manifest.json").read_text())
    session = onnxruntime.InferenceSession(str(exported / manifest["fused"]["file"]),
                                           providers=["CPUExecutionProvider"])
    return Reference(session, tuple(manifest["input"]["shape"][1:]), [o["name"] for o in manifest["outputs"]])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def start_server_process(repository: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`valley-serve` on free ports, its log in a file beside the repository (a pipe could fill and block it)."""
    grpc_port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "service.cli", "--repository", str(repository), "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), *flags]
    log = repository.parent / f"valley-serve-{grpc_port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    try:
        wait_until_serving(grpc_port, process)
    except BaseException as error:
        process.kill()
        raise AssertionError(f"{error}; its log:\n{log.read_text()}") from None
    return ServerProcess(process, grpc_port, metrics_port, log)


def stop_server_process(server: ServerProcess) -> str:
    """SIGTERM, wait for the exit, and return what the server logged."""
    server.process.terminate()
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise AssertionError("valley-serve did not exit within 60 s of SIGTERM") from None
    return server.log.read_text()


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[ServerProcess]:
    """`valley-serve` on the synthetic repository, for the module's tests."""
    server = start_server_process(repository, "--max-queue-delay-ms", "5")
    yield server
    stop_server_process(server)


class ThreadServer:
    """`service.server.Server` running on its own event loop in a thread, on real ports."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self.run(self._create(settings))
        self.ports: Ports = self.run(self.server.start())

    @staticmethod
    async def _create(settings: Settings) -> Server:
        return Server(settings)  # made on the loop: grpc.aio binds to the running loop

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def thread_settings(repository: Path, **overrides: Any) -> Settings:
    return Settings(repository=repository, host="127.0.0.1", grpc_port=0, metrics_port=0, shutdown_grace_s=5,
                    **overrides)


def report(url: str, labels: list[tuple[str, int, int]], model: str = MODEL, timeout: float = 10) -> int:
    """Send (request id, position, true class) labels through valley.v1.Feedback; the number accepted."""
    request = feedback_pb.ReportRequest(labels=[
        feedback_pb.Label(model_name=model, request_id=request_id, position=position, true_class=true_class)
        for request_id, position, true_class in labels])
    with grpc.insecure_channel(url) as channel:
        stub = feedback_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        return int(stub.Report(request, timeout=timeout).accepted)
