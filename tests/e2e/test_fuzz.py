"""Malformed requests to every RPC of a running `valley-serve`: mutated valid messages and raw bytes.

Every answer must be a status the client can act on: never INTERNAL or UNKNOWN, never a detail over
400 characters or one that shows where the repository lies, never silence past the client's deadline.
Meanwhile grpc.health.v1 must answer within 1 s every 100 ms, the server's memory must stay bounded,
and once the campaign is over the server must serve the same probabilities as before it.

The short campaign (about 1,900 requests, some 10 s) runs with the other tests; the full one (about
11,500 requests, about a minute) with

    .venv/bin/pytest -m long tests/e2e/test_fuzz.py

A burst of twelve malformed 60 MiB requests, on a server of its own, runs with the short campaign.

A failing request is shrunk by hypothesis and written to a file the failure names; `python -m
tests.fuzzing HOST:PORT METHOD FILE` sends it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, Reference, start_server_process, stop_server_process, triton_inputs
from tests.fuzzing import (
    FEEDBACK,
    INFERENCE,
    LOAD,
    METHODS,
    MODEL_INFER,
    STREAM_INFER,
    UNLOAD,
    Rules,
    Target,
    bodies,
    byte_mutated,
    identity,
    random_bytes,
    read_rss_kib,
    short,
    spares_the_model,
    with_unknown_fields,
)

T = TypeVar("T")

CALL_TIMEOUT_S = 10.0
"""How long one call may take before its silence is a finding (the slowest legitimate one takes well under 1 s)."""
HEALTH_EVERY_S, HEALTH_WITHIN_S = 0.1, 1.0
DRAIN_LIMIT_S = 10.0
"""How long SIGTERM may take once the campaign is over: nothing is in flight, so well under a second is usual."""
RSS_GROWTH_LIMIT_MIB = 128
# What the server keeps grows little over a campaign: the feedback store holds one prediction (10 floats and
# an id of at most 256 characters) per valid request with an id, a few MiB at most, and the statistics and
# metrics have bounded labels. What moves RSS is messages of up to 64 MiB parsed and freed, of which the
# allocator keeps some mapped; the warm-up sends the largest once, so the baseline holds that. A server that
# frees each request once answered ends +25 MiB (short) and +66 MiB (full) above the baseline; keeping even
# a fifth of the failed requests' bodies (the full campaign sends about 690 MiB) goes past 128 MiB.
RSS_PEAK_LIMIT_MIB = 512
# At any moment, above the baseline: one 64 MiB request is held about four times while it is served (grpc's
# buffer, the bytes handed to the parser, the parsed message, the decoded input), under 256 MiB; twice that
# is room for an answer being written while the next request is read. More means requests that failed are
# kept after their answer.
BURST = 12
"""Malformed 60 MiB requests sent one after another by the burst test."""


@dataclass(frozen=True)
class Size:
    """How many examples each part of the campaign draws, and the requests it must send in all."""

    scale: int
    least: int


SHORT, FULL = Size(scale=1, least=1_500), Size(scale=7, least=10_000)
SIZES = [pytest.param(SHORT, id="short"), pytest.param(FULL, id="full", marks=pytest.mark.long)]
UNARY = [method for method in METHODS if method != STREAM_INFER]
EXAMPLES = {  # per unit of scale
    **{method: 60 for method in UNARY},
    f"/{INFERENCE}/ModelReady": 80, f"/{INFERENCE}/ModelMetadata": 80, f"/{INFERENCE}/ModelConfig": 80,
    f"/{INFERENCE}/ModelStatistics": 80,
    f"/{INFERENCE}/RepositoryIndex": 80, LOAD: 100, UNLOAD: 100, MODEL_INFER: 320, f"/{FEEDBACK}/Report": 150,
}
STREAMS = 40
"""Streams per unit of scale, each of one to eight messages."""
RAW = 150
"""Random-byte requests per unit of scale, to any RPC and to paths that name none."""
WHILE_UNLOADED = 60
"""Requests per unit of scale while the served model is unloaded."""
HEALTH_AND_REFLECTION = 40
"""Requests per unit of scale to grpc.health.v1 and server reflection."""
UNKNOWN_PATHS = (f"/{INFERENCE}/Nope", f"/{INFERENCE}/", f"/{FEEDBACK}/Report/x", "/valley.v1.Nope/Report", "/")


class HealthMonitor(threading.Thread):
    """grpc.health.v1 Health/Check every 100 ms, on a channel of its own: how long each took, and failures; and
    the server's RSS each time, for its peak."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.peak_rss_kib = read_rss_kib(pid)
        self._done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.url) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                        response_deserializer=health_pb2.HealthCheckResponse.FromString)
            while not self._done.is_set():
                started = time.monotonic()
                try:
                    check(health_pb2.HealthCheckRequest(), timeout=5 * HEALTH_WITHIN_S)
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")
                took = time.monotonic() - started
                self.latencies.append(took)
                with contextlib.suppress(OSError):  # the server exited: the campaign says so
                    self.peak_rss_kib = max(self.peak_rss_kib, read_rss_kib(self.pid))
                self._done.wait(max(0.0, HEALTH_EVERY_S - took))

    def stop(self) -> None:
        self._done.set()
        self.join(10)


@dataclass
class Campaign:
    """A server under fuzz, and the client side that sends to it and judges each answer."""

    server: ServerProcess
    target: Target
    rules: Rules
    channel: grpc.Channel
    monitor: HealthMonitor
    findings: Path
    """Where the body of each failing request is written."""
    pixels: np.ndarray
    before: np.ndarray
    """The probabilities served for `pixels` before the campaign."""
    rss_before_kib: int
    sent: Counter[str] = field(default_factory=Counter)
    """Requests sent, by RPC."""
    sent_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    parts: dict[str, int] = field(default_factory=dict)
    """The parts of the campaign that ran, with the server's RSS (KiB) after each."""

    @property
    def log(self) -> Path:
        assert self.server.log is not None
        return self.server.log

    def fail(self, method: str, bodies: list[bytes], problem: str, log_from: int) -> None:
        """Raise an AssertionError naming the problem, the request (kept in a file) and what the server logged."""
        time.sleep(0.2)  # the server logs a traceback after it answered
        with self.log.open("rb") as log:
            log.seek(log_from)
            logged = log.read().decode(errors="replace")[-6000:]
        files = []
        for body in bodies:
            path = self.findings / f"{short(method)}-{hashlib.sha256(body).hexdigest()[:12]}.bin"
            path.write_bytes(body)
            files.append(str(path))
        died = "" if self.server.process.poll() is None else \
            f"\nthe server exited with status {self.server.process.returncode}"
        raise AssertionError(
            f"{short(method)}: {problem}{died}\nrequest ({', '.join(str(len(body)) for body in bodies)} bytes): "
            f"{bodies[0][:160]!r}{'...' if len(bodies[0]) > 160 else ''}\n"
            f"replay: .venv/bin/python -m tests.fuzzing {self.server.url} {method} {' '.join(files)}\n"
            f"server log meanwhile:\n{logged or '(nothing)'}")

    def call(self, method: str, body: bytes) -> grpc.StatusCode:
        """Send `body` as the request of unary `method`; its status code, once judged."""
        body = spares_the_model(method, body, self.target.model)
        log_from = self.log.stat().st_size
        send = self.channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
        self.sent[method] += 1
        self.sent_bytes += len(body)
        try:
            answer = send(body, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        else:
            if method in METHODS:
                GetMessageClass(METHODS[method].output_type).FromString(answer)  # an answer that parses
            return grpc.StatusCode.OK
        # Judged outside the except block: a failure then carries no grpc exception as its context, so
        # hypothesis sees the same failure each time it replays the request.
        if (problem := self.rules.status_problem(code, details)) is not None:
            self.fail(method, [body], problem, log_from)
        return code

    def stream(self, bodies: list[bytes], cancel_after: int | None = None) -> grpc.StatusCode:
        """Send `bodies` on one ModelStreamInfer stream, reading every answer (or cancelling after
        `cancel_after` of them); how the stream ended, once every answer was judged."""
        log_from = self.log.stat().st_size
        send = self.channel.stream_stream(STREAM_INFER, request_serializer=identity, response_deserializer=identity)
        self.sent[STREAM_INFER] += len(bodies)
        self.sent_bytes += sum(map(len, bodies))
        call = send(iter(bodies), timeout=2 * CALL_TIMEOUT_S)
        answers, code, details = [], grpc.StatusCode.OK, ""
        try:
            for answer in call:
                answers.append(pb.ModelStreamInferResponse.FromString(answer))
                if cancel_after is not None and len(answers) >= cancel_after:
                    call.cancel()
                    code = grpc.StatusCode.CANCELLED
                    break
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        if code != grpc.StatusCode.OK and (problem := self.rules.status_problem(code, details)) is not None:
            self.fail(STREAM_INFER, bodies, f"the stream ended {problem}", log_from)
        for answer in answers:
            if answer.error_message and (problem := self.rules.stream_error_problem(answer.error_message)):
                self.fail(STREAM_INFER, bodies, problem, log_from)
        if code == grpc.StatusCode.OK and len(answers) != len(bodies):
            self.fail(STREAM_INFER, bodies, f"{len(answers)} answers to {len(bodies)} requests on a stream that "
                      "ended OK", log_from)
        return code

    def done(self, part: str) -> None:
        self.parts[part] = read_rss_kib(self.server.process.pid)

    def open_stream(self, path: str, bodies: list[bytes], client_streaming: bool) -> grpc.StatusCode:
        """Send `bodies` to a streaming RPC of grpc's own services, read its first answer, then cancel it."""
        log_from = self.log.stat().st_size
        self.sent[path] += len(bodies)
        self.sent_bytes += sum(map(len, bodies))
        if client_streaming:
            call = self.channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)(
                iter(bodies), timeout=CALL_TIMEOUT_S)
        else:
            call = self.channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                bodies[0], timeout=CALL_TIMEOUT_S)
        try:
            for _ in call:
                return grpc.StatusCode.CANCELLED
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        finally:
            call.cancel()  # a Watch that answered would go on until the server stops
        if code != grpc.StatusCode.CANCELLED and (problem := self.rules.status_problem(code, details)):
            self.fail(path, bodies, problem, log_from)
        return code

    def infer(self) -> np.ndarray:
        client = triton.InferenceServerClient(self.server.url)
        try:
            result = client.infer(self.target.model, triton_inputs(self.pixels))
            return np.asarray(result.as_numpy("probabilities"))
        finally:
            client.close()


def fuzz(strategy: st.SearchStrategy[T], examples: int, send: Callable[[T], object]) -> None:
    """Send `examples` values of `strategy`; a value that fails is shrunk to a small one, then reported."""
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @given(strategy)
    def campaign(value: T) -> None:
        send(value)

    campaign()


def _big_infer(target: Target, raw_bytes: int) -> bytes:
    """A ModelInferRequest whose raw contents are `raw_bytes` long (the wrong size unless 256)."""
    request = target.infer()
    request.raw_input_contents[0] = b"\x00" * raw_bytes
    return request.SerializeToString()


def _warm_up(campaign: Campaign) -> None:
    """About 200 requests before the memory is measured: valid ones of each RPC, batches of several sizes, and
    a few that fail, so the first allocations of each path are made."""
    target = campaign.target
    for round_ in range(14):
        for method in METHODS:
            request = target.valid(method)
            if method == LOAD:
                request = pb.RepositoryModelLoadRequest(model_name=f"{target.model}-missing-{round_}")
            elif method == UNLOAD:
                request = pb.RepositoryModelUnloadRequest(model_name=f"{target.model}-missing-{round_}")
            body = request.SerializeToString()
            if method == STREAM_INFER:
                campaign.stream([body, target.infer(batch=1 + round_ % 4).SerializeToString()])
            else:
                campaign.call(method, body)
        campaign.call(MODEL_INFER, target.infer(batch=1 + round_ * 5).SerializeToString())
        campaign.call(MODEL_INFER, target.infer().SerializeToString()[:-3])
        campaign.call(MODEL_INFER, pb.ModelInferRequest(model_name="nope").SerializeToString())
    # The largest messages once, so that what the allocator keeps of them is in the baseline.
    campaign.call(MODEL_INFER, _big_infer(target, (64 << 20) - 4096))
    campaign.call(f"/{FEEDBACK}/Report", target.valid(f"/{FEEDBACK}/Report").SerializeToString() * 20_000)
    campaign.sent.clear()
    campaign.sent_bytes = 0


def _target(server: ServerProcess, reference: Reference) -> Target:
    """What the valid requests to `server` name, after serving the request the feedback labels name."""
    client = triton.InferenceServerClient(server.url)
    try:
        metadata = client.get_model_metadata(MODEL, as_json=True)
        spec = metadata["inputs"][0]
        target = Target(model=MODEL, version=metadata["versions"][0], input_name=spec["name"],
                        datatype=spec["datatype"], image_shape=tuple(int(d) for d in spec["shape"][1:]),
                        pixels=reference.images(1, seed=9).tobytes(), known_id="fuzz-known", known_batch=4,
                        outputs=tuple(output["name"] for output in metadata["outputs"]))
        client.infer(MODEL, triton_inputs(reference.images(target.known_batch, seed=8)), request_id=target.known_id)
        return target
    finally:
        client.close()


def _hidden(repository: Path) -> list[str]:
    """What no status detail may show: where the repository lies."""
    return sorted({str(repository), str(repository.resolve()), str(repository.parent)})


@pytest.fixture(scope="module", params=SIZES)
def campaign(request: pytest.FixtureRequest, repository: Path, reference: Reference,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    server = start_server_process(repository)
    try:
        target = _target(server, reference)
        pixels = reference.images(1, seed=7)
        client = triton.InferenceServerClient(server.url)
        before = np.asarray(client.infer(MODEL, triton_inputs(pixels)).as_numpy("probabilities"))
        client.close()
        np.testing.assert_allclose(before, reference(pixels)["probabilities"], atol=1e-6)
        with grpc.insecure_channel(server.url, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            monitor = HealthMonitor(server.url, server.process.pid)
            running = Campaign(server, target, Rules(_hidden(repository)), channel, monitor,
                               tmp_path_factory.mktemp("fuzz-findings"), pixels, before, 0)
            _warm_up(running)
            running.rss_before_kib = read_rss_kib(server.process.pid)
            running.started = time.monotonic()
            monitor.peak_rss_kib = running.rss_before_kib
            monitor.start()
            try:
                yield running
            finally:
                monitor.stop()
    finally:
        stop_server_process(server)


def _size(request: pytest.FixtureRequest) -> Size:
    size = request.node.callspec.params["campaign"]
    assert isinstance(size, Size)
    return size


def test_every_rpc_of_both_services_is_fuzzed() -> None:
    services = (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                feedback_pb.DESCRIPTOR.services_by_name["Feedback"])
    every = {f"/{service.full_name}/{method.name}" for service in services for method in service.methods}
    assert set(METHODS) == every and set(EXAMPLES) | {STREAM_INFER} == every


FOUND = [
    # Names of valid characters but longer than a file name may be (255 bytes): INTERNAL (OSError ENAMETOOLONG).
    (LOAD, pb.RepositoryModelLoadRequest(model_name="0" * 256).SerializeToString()),
    (UNLOAD, pb.RepositoryModelUnloadRequest(model_name="a" * 257).SerializeToString()),
    # grpc's own services answer a body that does not parse UNKNOWN, quoting a Python exception.
    ("/grpc.health.v1.Health/Check", b"\x00"),
]
"""Requests that once failed, sent by every campaign."""


def test_edge_cases(campaign: Campaign) -> None:
    """Requests a random draw seldom makes: at and over the 64 MiB message limit, 100,000-character names
    in every name field, huge repeated counts, and the requests that once failed."""
    target, long = campaign.target, "\U0001f600" * 100_000
    typed = target.infer()
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.uint_contents.extend([255] * 2_000_000)
    cases: list[tuple[str, bytes]] = [
        *FOUND,
        (MODEL_INFER, _big_infer(target, 64 << 20)),
        (MODEL_INFER, _big_infer(target, (64 << 20) - 4096)),
        (MODEL_INFER, typed.SerializeToString()),
        (MODEL_INFER, pb.ModelInferRequest(model_name=long).SerializeToString()),
        (MODEL_INFER, b"\x0a" + b"\xff" * 9 + b"\x01"),  # a length of 2**64 - 1
        (f"/{FEEDBACK}/Report", feedback_pb.ReportRequest(labels=[feedback_pb.Label(
            model_name=target.model, request_id=target.known_id, position=2**32 - 1, true_class=2**32 - 1)]
            * 200_000).SerializeToString()),
    ]
    for method in UNARY:
        request = target.valid(method)
        for name in ("name", "model_name", "id", "model_version", "version", "repository_name"):
            if name in request.DESCRIPTOR.fields_by_name:
                setattr(request, name, long)
        cases.append((method, request.SerializeToString()))
        cases.append((method, b"\x00" * 1024))
    streams = [[_big_infer(target, 64 << 20)],
               [target.infer().SerializeToString()] * 300]  # past the 256 requests a stream has in flight
    problems = []
    for method, body in cases:
        try:
            campaign.call(method, body)
        except AssertionError as problem:
            problems.append(str(problem))
    for bodies_ in streams:
        try:
            campaign.stream(bodies_)
        except AssertionError as problem:
            problems.append(str(problem))
    assert not problems, f"{len(problems)} edge cases failed:\n\n" + "\n\n".join(problems)
    campaign.done("edge cases")


@pytest.mark.parametrize("method", UNARY, ids=short)
def test_mutated_requests(campaign: Campaign, method: str, request: pytest.FixtureRequest) -> None:
    """Structural and byte-level mutations of valid requests, and random bytes, to one unary RPC."""
    examples = EXAMPLES[method] * _size(request).scale
    fuzz(bodies(method, campaign.target), examples, lambda body: campaign.call(method, body))
    campaign.done(method)


def test_mutated_streams(campaign: Campaign, request: pytest.FixtureRequest) -> None:
    """ModelStreamInfer streams of one to eight mutated or random messages, some cancelled early."""
    messages = bodies(STREAM_INFER, campaign.target)
    streams = st.tuples(st.lists(messages, min_size=1, max_size=8), st.one_of(st.none(), st.integers(0, 3)))
    fuzz(streams, STREAMS * _size(request).scale, lambda stream: campaign.stream(*stream))
    campaign.done(STREAM_INFER)


def test_random_bytes_to_any_path(campaign: Campaign, request: pytest.FixtureRequest) -> None:
    """Random bytes and mutations of any RPC's valid request, to any RPC and to paths that name none."""
    paths = st.sampled_from([*UNARY, *UNKNOWN_PATHS])
    seeds = st.sampled_from([campaign.target.valid(method).SerializeToString() for method in METHODS])
    calls = st.tuples(paths, st.one_of(random_bytes(), byte_mutated(seeds), with_unknown_fields(seeds)))
    fuzz(calls, RAW * _size(request).scale, lambda call: campaign.call(*call))
    campaign.done("random bytes")


def test_while_the_served_model_is_unloaded(campaign: Campaign, request: pytest.FixtureRequest) -> None:
    """Unload the served model, fuzz what names it, load it again: a state the campaign itself never makes."""
    target = campaign.target
    assert campaign.call(UNLOAD, b"") != grpc.StatusCode.OK, "an unload request that names no model"
    unload = campaign.channel.unary_unary(UNLOAD, request_serializer=identity, response_deserializer=identity)
    unload(pb.RepositoryModelUnloadRequest(model_name=target.model).SerializeToString(), timeout=CALL_TIMEOUT_S)
    try:
        assert campaign.call(MODEL_INFER, target.infer().SerializeToString()) == grpc.StatusCode.UNAVAILABLE
        methods = [MODEL_INFER, f"/{INFERENCE}/ModelReady", f"/{INFERENCE}/ModelMetadata",
                   f"/{INFERENCE}/ModelConfig", f"/{INFERENCE}/ModelStatistics", f"/{FEEDBACK}/Report",
                   f"/{INFERENCE}/RepositoryIndex"]
        calls = st.sampled_from(methods).flatmap(lambda method: st.tuples(st.just(method), bodies(method, target)))
        fuzz(calls, WHILE_UNLOADED * _size(request).scale, lambda call: campaign.call(*call))
        fuzz(st.lists(bodies(STREAM_INFER, target), min_size=1, max_size=4), 5, campaign.stream)
        with_parameters = pb.RepositoryModelLoadRequest(model_name=target.model)
        with_parameters.parameters["no-such-parameter"].string_param = "{}"
        assert campaign.call(LOAD, with_parameters.SerializeToString()) != grpc.StatusCode.OK
        assert campaign.call(MODEL_INFER, target.infer().SerializeToString()) == grpc.StatusCode.UNAVAILABLE
    finally:
        load = campaign.channel.unary_unary(LOAD, request_serializer=identity, response_deserializer=identity)
        load(pb.RepositoryModelLoadRequest(model_name=target.model).SerializeToString(), timeout=60)
    assert campaign.call(MODEL_INFER, target.infer().SerializeToString()) == grpc.StatusCode.OK
    campaign.done("unloaded")


HEALTH_CHECK, HEALTH_WATCH = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def test_grpc_health_and_reflection(campaign: Campaign, request: pytest.FixtureRequest) -> None:
    """The services grpc brings (health, reflection) keep the same rules for a body that does not parse."""
    seeds = st.sampled_from([
        health_pb2.HealthCheckRequest(service="").SerializeToString(),
        health_pb2.HealthCheckRequest(service=INFERENCE).SerializeToString(),
        reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString(),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE).SerializeToString()])
    messages = st.one_of(random_bytes(), byte_mutated(seeds), with_unknown_fields(seeds))
    calls = st.tuples(st.sampled_from([HEALTH_CHECK, HEALTH_WATCH, REFLECTION]), st.lists(messages, min_size=1,
                                                                                          max_size=3))

    def send(path: str, bodies: list[bytes]) -> None:
        if path == HEALTH_CHECK:
            campaign.call(path, bodies[0])
        else:
            campaign.open_stream(path, bodies, client_streaming=path == REFLECTION)

    fuzz(calls, HEALTH_AND_REFLECTION * _size(request).scale, lambda call: send(*call))
    campaign.done("health and reflection")


PARTS = {"edge cases", *UNARY, STREAM_INFER, "random bytes", "unloaded", "health and reflection"}


def _in_flight(metrics_port: int) -> float:
    """The inference requests the server counts as being served now (valley_in_flight_requests, summed)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("valley_in_flight_requests"))


def test_the_server_is_unharmed(campaign: Campaign, reference: Reference, request: pytest.FixtureRequest) -> None:
    """After the campaign: the requests were sent, health answered in time throughout, memory stayed bounded,
    nothing is left in flight, the server serves the same probabilities, logged no traceback and stops at once."""
    size, sent = _size(request), sum(campaign.sent.values())
    took = time.monotonic() - campaign.started
    time.sleep(0.5)
    server, monitor = campaign.server, campaign.monitor
    rss_after = read_rss_kib(server.process.pid)
    monitor.stop()
    latencies = monitor.latencies
    growth_mib = (rss_after - campaign.rss_before_kib) / 1024
    peak_mib = (monitor.peak_rss_kib - campaign.rss_before_kib) / 1024
    by_rpc = dict(sorted((short(method), count) for method, count in campaign.sent.items()))
    print(f"\nfuzz campaign: {sent} requests of {campaign.sent_bytes / 2**20:.0f} MiB in {took:.1f} s ({by_rpc}); "
          f"health: {len(latencies)} checks, slowest {max(latencies, default=0) * 1000:.0f} ms, p99 "
          f"{np.percentile(latencies, 99) * 1000 if latencies else 0:.0f} ms; RSS {campaign.rss_before_kib // 1024}"
          f" -> {rss_after // 1024} MiB ({growth_mib:+.1f} MiB, peak {peak_mib:+.1f} MiB); after each part: "
          f"{', '.join(f'{short(part)} {rss // 1024}' for part, rss in campaign.parts.items())} MiB")
    problems = []
    if server.process.poll() is not None:
        pytest.fail(f"the server exited with status {server.process.returncode}")
    if set(campaign.parts) >= PARTS and sent < size.least:
        problems.append(f"only {sent} requests were sent")
    if monitor.failures:
        problems.append(f"{len(monitor.failures)} health checks failed: {monitor.failures[:5]}")
    if not latencies or max(latencies) >= HEALTH_WITHIN_S:
        problems.append(f"a health check took {max(latencies, default=0):.2f} s; the slowest: {sorted(latencies)[-5:]}")
    if growth_mib >= RSS_GROWTH_LIMIT_MIB:
        problems.append(f"the server's memory grew by {growth_mib:.0f} MiB")
    if peak_mib >= RSS_PEAK_LIMIT_MIB:
        problems.append(f"the server's memory peaked {peak_mib:.0f} MiB above where it started")
    if (left := _in_flight(server.metrics_port)) != 0:
        problems.append(f"{left:g} inference requests are still in flight")
    after = campaign.infer()
    if not np.allclose(after, campaign.before, atol=1e-6, rtol=0) or \
            not np.allclose(after, reference(campaign.pixels)["probabilities"], atol=1e-6, rtol=0):
        problems.append(f"the probabilities changed: {campaign.before} before, {after} after")
    stopping = time.monotonic()
    log = stop_server_process(server)
    if (drain := time.monotonic() - stopping) > DRAIN_LIMIT_S:
        problems.append(f"the server took {drain:.0f} s to stop after SIGTERM (something was left in flight)")
    if "Traceback" in log:
        problems.append(f"the server logged {log.count('Traceback')} tracebacks; the last:\n"
                        f"{log[log.rindex('Traceback') - 200:][:3000]}")
    assert not problems, "\n".join(problems)


def test_a_burst_of_the_largest_malformed_requests(repository: Path, reference: Reference,
                                                   tmp_path: Path) -> None:
    """Malformed ModelInfer requests of 60 MiB, one after another, on a server of the test's own: each is
    refused, health answers in time meanwhile, and a refused request is freed once answered (RSS stays within
    about two such requests)."""
    server = start_server_process(repository)
    try:
        target = _target(server, reference)
        body = _big_infer(target, 60 << 20)  # raw contents of the wrong size: INVALID_ARGUMENT
        with grpc.insecure_channel(server.url) as channel:
            monitor = HealthMonitor(server.url, server.process.pid)
            burst = Campaign(server, target, Rules(_hidden(repository)), channel, monitor, tmp_path,
                             reference.images(1, seed=7), np.zeros(0), 0)
            assert burst.call(MODEL_INFER, body) == grpc.StatusCode.INVALID_ARGUMENT
            burst.rss_before_kib = monitor.peak_rss_kib = read_rss_kib(server.process.pid)
            monitor.start()
            try:
                for _ in range(BURST):
                    assert burst.call(MODEL_INFER, body) == grpc.StatusCode.INVALID_ARGUMENT
                    monitor.peak_rss_kib = max(monitor.peak_rss_kib, read_rss_kib(server.process.pid))
            finally:
                monitor.stop()
        peak_mib = (monitor.peak_rss_kib - burst.rss_before_kib) / 1024
        print(f"\nburst of {BURST} x 60 MiB: RSS {burst.rss_before_kib // 1024} MiB, peak {peak_mib:+.0f} MiB; "
              f"slowest health check {max(monitor.latencies, default=0) * 1000:.0f} ms")
        assert not monitor.failures and max(monitor.latencies) < HEALTH_WITHIN_S, monitor.failures[:5]
        assert peak_mib < RSS_PEAK_LIMIT_MIB, \
            f"RSS peaked {peak_mib:.0f} MiB above where the burst started: refused requests are kept after " \
            "their answer"
    finally:
        stop_server_process(server)
