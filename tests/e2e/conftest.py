"""Real valley servers for end-to-end tests: a `valley-serve` process, or a `Server` in a thread.

The process is what users run (flags, env vars, signals), started on port 0 through
`service.launch`. The in-thread server is the same `service.server.Server` on real ports (port 0
too), for tests that must hold a model run at a gate to fill the queue or pass a deadline.

The answers these servers give are compared with the fused graph run in process (`Reference`),
so both start with every member answering (`--members full`, never degraded under load) unless a test sets
`--members`;
tests/e2e/test_members.py serves the default, the fitted cascade.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service._proto.valley.v1 import feedback_pb2_grpc as feedback_grpc
from service.launch import ServerProcess, start_server
from service.server import Ports, Server
from service.settings import Settings
from tests.conftest import REPO, cli

T = TypeVar("T")
MODEL = "synth"


def triton_inputs(pixels: np.ndarray, name: str = "pixels", datatype: str = "UINT8") -> list[triton.InferInput]:
    """The one input tensor of a tritonclient request, holding `pixels`."""
    tensor = triton.InferInput(name, list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    return [tensor]


def http_inputs(pixels: np.ndarray, binary: bool = True, name: str = "pixels",
                datatype: str = "UINT8") -> list[triton_http.InferInput]:
    """The one input tensor of a tritonclient.http request, holding `pixels` (binary data, or JSON)."""
    tensor = triton_http.InferInput(name, list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return [tensor]


class Answer(Protocol):
    """An inference result of tritonclient.grpc or tritonclient.http."""

    def as_numpy(self, name: str) -> np.ndarray | None: ...


def assert_matches(result: Answer, expected: dict[str, np.ndarray], names: list[str]) -> None:
    """Every output in `names` is there, with the expected datatype and shape, within 1e-6 of `expected`."""
    for name in names:
        served = result.as_numpy(name)
        assert served is not None, f"output {name} missing"
        assert served.dtype == expected[name].dtype and served.shape == expected[name].shape, name
        np.testing.assert_allclose(served, expected[name], rtol=0, atol=1e-6, err_msg=name)


def free_port() -> int:
    """A TCP port nothing listens on now (for programs that must be told a port, not pick one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def prometheus(tmp: Path, metrics_ports: list[int]) -> Iterator[str]:
    """A real Prometheus scraping valley's metrics ports every second and evaluating our rules every second; its
    URL."""
    rules = (REPO / "deploy" / "prometheus" / "rules.yml").read_text().replace("interval: 30s", "interval: 1s")
    (tmp / "rules.yml").write_text(rules)
    targets = ", ".join(f"'127.0.0.1:{port}'" for port in metrics_ports)
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{tmp / 'rules.yml'}]\n"
        f"scrape_configs: [{{job_name: valley, static_configs: [{{targets: [{targets}]}}]}}]\n")
    port = free_port()  # Prometheus cannot say which port it bound when given 0
    with open(tmp / "prometheus.log", "wb") as log:
        process = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def scraped(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the server's /metrics shows now: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def prometheus_query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result of an instant query: one entry per series."""
    with urllib.request.urlopen(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=10) as response:
        return json.loads(response.read())["data"]["result"]  # type: ignore[no-any-return]


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)


@pytest.fixture(scope="session")
def repository(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the exported synthetic ensemble as `synth/1`."""
    root = tmp_path_factory.mktemp("serve-repo")
    shutil.copytree(exported, root / MODEL / "1")
    return root


@pytest.fixture(scope="session")
def fashion_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real Fashion-MNIST FGE ensemble (2,000 training images, 2 members), exported as `fashion`."""
    root = tmp_path_factory.mktemp("fashion")
    cli("train", "--dataset", "fashion-mnist", "--subset", "2000", "--val-size", "500", "--epochs", "2",
        "--save-epoch", "1", "--seed", "0", "--out", root / "base")
    cli("fge", "--from", root / "base", "--start-epoch", "1", "--cycles", "2", "--cycle-epochs", "1", "--lr1", "0.05",
        "--lr2", "0.005", "--out", root / "fge")
    cli("export", "--from", root / "fge", "--name", "fashion", "--out", root / "repository")
    return root / "repository"


@dataclass
class Reference:
    """The fused graph run in this process: what every served answer must equal."""

    session: onnxruntime.InferenceSession
    input_shape: tuple[int, ...]
    outputs: list[str]

    members: int

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Every served output: the fused graph's, and `members_used` (all of them)."""
        values = self.session.run(self.outputs, {"pixels": pixels})
        return {**dict(zip(self.outputs, values, strict=True)),
                "members_used": np.full(len(pixels), self.members, dtype=np.int64)}

    def images(self, count: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, (count, *self.input_shape), dtype=np.uint8)


@pytest.fixture(scope="session")
def reference(exported: Path) -> Reference:
    manifest = json.loads((exported / "manifest.json").read_text())
    session = onnxruntime.InferenceSession(str(exported / manifest["fused"]["file"]),
                                           providers=["CPUExecutionProvider"])
    return Reference(session, tuple(manifest["input"]["shape"][1:]), [o["name"] for o in manifest["outputs"]],
                     len(manifest["members"]))


def start_server_process(repository: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`valley-serve` on port 0, ready; its log in a file beside the repository (a pipe could fill and block it)."""
    log = Path(tempfile.mkstemp(prefix="valley-serve-", suffix=".log", dir=repository.parent)[1])
    if not any(flag.startswith("--members") for flag in flags):
        flags = ("--members", "full", *flags)
    if not any(flag.startswith("--degrade-queue-ms") for flag in flags):
        # Answers are compared with the full ensemble: a busy test machine must not cut them to the first stage.
        flags = ("--degrade-queue-ms", "0", *flags)
    # A feedback store of its own (the default, SQLite in the state folder): no test sees another's labels.
    state = tempfile.mkdtemp(prefix="valley-state-", dir=repository.parent)
    server = start_server(repository, *flags, log=log, cwd=REPO,
                          env={"OMP_NUM_THREADS": "2", "XDG_STATE_HOME": state, **(env or {})},
                          timeout=60)
    if not server.ready:
        server.stop()
        raise AssertionError(f"valley-serve loaded its repository but is not ready; its log:\n{log.read_text()}")
    return server


def stop_server_process(server: ServerProcess) -> str:
    """SIGTERM, wait for the exit, and return what the server logged."""
    assert server.log is not None
    if server.stop(timeout=60) == -signal.SIGKILL:
        raise AssertionError(f"valley-serve did not exit within 60 s of SIGTERM; its log:\n{server.log.read_text()}")
    return server.log.read_text()


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[ServerProcess]:
    """`valley-serve` on the synthetic repository, for the module's tests."""
    server = start_server_process(repository, "--max-queue-delay-ms", "5")
    yield server
    stop_server_process(server)


@pytest.fixture
def versioned(exported: Path, tmp_path: Path) -> Iterator[tuple[Path, ServerProcess]]:
    """A repository of the test's own holding `synth/1`, served by `valley-serve`: add versions to it."""
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    server = start_server_process(repository)
    yield repository, server
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
    overrides.setdefault("members", "full")
    overrides.setdefault("degrade_queue_ms", 0)
    # A feedback store of its own (the default, SQLite in the state folder): no test sees another's labels.
    overrides.setdefault("state_dir", Path(tempfile.mkdtemp(prefix="valley-state-", dir=repository.parent)))
    return Settings(repository=repository, host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0,
                    shutdown_grace_s=5, **overrides)


def report(url: str, labels: list[tuple[str, int, int]], model: str = MODEL, timeout: float = 10,
           credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> int:
    """Send (request id, position, true class) labels through valley.v1.Feedback; the number accepted."""
    request = feedback_pb.ReportRequest(labels=[
        feedback_pb.Label(model_name=model, request_id=request_id, position=position, true_class=true_class)
        for request_id, position, true_class in labels])
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.secure_channel(url, credentials) if credentials else grpc.insecure_channel(url) as channel:
        stub = feedback_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        return int(stub.Report(request, timeout=timeout, metadata=metadata).accepted)
