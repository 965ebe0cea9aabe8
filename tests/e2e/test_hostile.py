"""Requests built to cost the server: each is refused quickly with the right status, costs memory bounded by what the
model takes (never by what the client declared), and leaves the event loop (and the health probes) free."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.inference import grpc_service_pb2 as pb
from service.transport.servicer import STREAM_BUFFER_BYTES
from tests.e2e.conftest import MODEL, Reference, ThreadServer, thread_settings, triton_inputs

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ThreadServer]:
    with ThreadServer(thread_settings(repository)) as running:
        yield running


def _request(pixels: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def _infer(url: str, request: pb.ModelInferRequest | bytes, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    """The status and details of one ModelInfer call with this body."""
    body = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 80 << 20)]) as channel:
        try:
            channel.unary_unary(INFER)(body, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


def _typed(shape: list[int], values: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=shape)
    tensor.contents.uint_contents.extend(np.zeros(values, dtype=np.uint32).tolist())
    return request


class HealthWatch:
    """Checks grpc.health.v1 every 20 ms in a thread; `slowest` is the longest answer seen."""

    def __init__(self, url: str) -> None:
        self._channel = grpc.insecure_channel(url)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._done = threading.Event()
        self.slowest = 0.0
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            self._stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self._done.wait(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(15)
        self._channel.close()


def test_declarations_are_checked_before_any_data_is_read(server: ThreadServer) -> None:
    """Shapes, ranks, counts and typed contents far beyond the model's input are refused by their declaration."""
    huge = 12_000_000  # 48 MB of typed values, 47,000 times the model's input
    cases: dict[str, tuple[pb.ModelInferRequest, str]] = {
        "typed contents beyond a one-image shape": (_typed([1, 1, 16, 16], huge), "values in contents"),
        "typed contents with a matching declared shape": (_typed([huge // 256, 1, 16, 16], huge), "at most 64"),
        "a declared shape of 2^62 elements": (_typed([1 << 31, 1 << 31, 1, 1], 0), "must have shape"),
        "nine dimensions": (_typed([1] * 9, 1), "at most 8"),
        "a negative dimension": (_typed([-1, 1, 16, 16], 0), "negative"),
    }
    with HealthWatch(server.url) as health:
        for case, (request, words) in cases.items():
            started = time.monotonic()
            code, details = _infer(server.url, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {code} {details}"
            assert words in details, f"{case}: {details}"
            assert time.monotonic() - started < 10, case
    assert health.slowest < 1.0, f"a health check took {health.slowest:.2f} s while the requests were refused"


def test_too_many_tensors_and_overlong_names_are_refused_without_echo(server: ThreadServer,
                                                                      reference: Reference) -> None:
    pixels = reference.images(1, seed=3)
    many_outputs = _request(pixels)
    for index in range(17):
        many_outputs.outputs.add(name=f"o{index}")
    long_output = _request(pixels)
    long_output.outputs.add(name="q" * 50_000)
    long_input = pb.ModelInferRequest(model_name=MODEL)
    long_input.inputs.add(name="q" * 50_000, datatype="UINT8", shape=[1, 1, 16, 16])
    many_inputs = pb.ModelInferRequest(model_name=MODEL)
    for index in range(17):
        many_inputs.inputs.add(name=f"i{index}", datatype="UINT8", shape=[1, 1, 16, 16])
    for request, words in ((many_outputs, "at most 16"), (long_output, "at most 256"), (long_input, "at most 256"),
                           (many_inputs, "at most 16")):
        code, details = _infer(server.url, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert words in details and "qqqq" not in details and len(details) <= 400


def test_unknown_fields_are_ignored_as_protobuf_allows(server: ThreadServer, reference: Reference) -> None:
    """A newer client's fields (numbers this server does not know) are skipped, not fatal: the request is served."""
    pixels = reference.images(2, seed=5)
    unknown = bytes([0xF8, 0x07, 0x2A]) + bytes([0x82, 0x08, 0x03]) + b"abc"  # field 127 varint, field 128 bytes
    body = _request(pixels).SerializeToString() + unknown
    with grpc.insecure_channel(server.url) as channel:
        answer = pb.ModelInferResponse.FromString(channel.unary_unary(INFER)(body, timeout=30))
    probabilities = np.frombuffer(answer.raw_output_contents[list(o.name for o in answer.outputs).index(
        "probabilities")], dtype=np.float32).reshape(2, -1)
    np.testing.assert_allclose(probabilities, reference(pixels)["probabilities"], atol=1e-5)


def test_a_client_that_does_not_read_its_stream_is_slowed_not_buffered(server: ThreadServer,
                                                                      reference: Reference) -> None:
    """The server stops reading a stream whose answers are not taken, holding a bounded number of bytes for it."""
    pixels = reference.images(64, seed=6)
    request = _request(pixels)
    request.outputs.add(name="member_probabilities")  # the largest answer there is
    body = request.SerializeToString()
    offered = 5000
    client = triton.InferenceServerClient(server.url)

    def served() -> int:
        """Requests of the stream the server has read and computed (64 images each)."""
        return int(client.get_inference_statistics(MODEL).model_stats[0].inference_count) // 64

    before = served()
    with grpc.insecure_channel(server.url) as channel:
        answers = channel.stream_stream(STREAM)(iter([body] * offered), timeout=120)
        time.sleep(6)  # the client reads nothing meanwhile
        stalled = served() - before
        time.sleep(2)
        assert served() - before == stalled, "the server stopped reading the stream"
        # Requests the queue could not serve within its wait bound are refused at once, so their answers may come
        # before the first computed one: skip those (they are overload refusals, nothing else).
        first = pb.ModelStreamInferResponse.FromString(next(answers))
        for _ in range(stalled + 64):
            if not first.error_message:
                break
            assert first.error_message.startswith("UNAVAILABLE: the model is overloaded"), first.error_message
            first = pb.ModelStreamInferResponse.FromString(next(answers))
        answer_bytes = first.ByteSize()
        # Read but unwritten: STREAM_IN_FLIGHT requests and STREAM_BUFFER_BYTES of answers at most; written but
        # unread: what HTTP/2's flow-control windows let the client's transport take (a few MB).
        assert stalled * answer_bytes < STREAM_BUFFER_BYTES + (16 << 20), \
            f"{stalled} answers of {answer_bytes} bytes were computed for a client that reads nothing"
        assert stalled < offered // 2
        assert client.infer(MODEL, triton_inputs(pixels[:1])).as_numpy("probabilities").shape == (1, 10), \
            "other clients are served meanwhile"
        assert not first.error_message and first.infer_response.outputs[0].shape[0] == 64
        answers.cancel()


def test_rpcs_past_the_concurrency_limit_are_unavailable_at_once(repository: Path, reference: Reference) -> None:
    pixels = reference.images(1, seed=7)
    body = _request(pixels).SerializeToString()
    with ThreadServer(thread_settings(repository, max_concurrent_rpcs=2)) as limited, \
            grpc.insecure_channel(limited.url) as channel:
        release = threading.Event()

        def held() -> Iterator[bytes]:
            yield body
            release.wait(30)

        streams = [channel.stream_stream(STREAM)(held(), timeout=60) for _ in range(2)]
        for stream in streams:  # both streams are being served: each holds one of the two places
            assert not pb.ModelStreamInferResponse.FromString(next(stream)).error_message
        started = time.monotonic()
        code, details = _infer(limited.url, body)
        assert code == grpc.StatusCode.UNAVAILABLE and "limit of 2 concurrent" in details, details
        # The HTTP port shares the limit: its requests are refused the same way, 503.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{limited.ports.http}/v2/models/{MODEL}/infer", method="POST",
                data=json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                             "data": pixels.ravel().tolist()}]}).encode()), timeout=10)
        assert refused.value.code == 503 and "limit of 2 concurrent" in json.loads(refused.value.read())["error"]
        assert time.monotonic() - started < 1.0
        with HealthWatch(limited.url) as health:
            time.sleep(0.1)
        assert health.slowest < 1.0, "health is not limited"
        release.set()
        for stream in streams:
            assert list(stream) == []
        assert _infer(limited.url, body) == (grpc.StatusCode.OK, "")
