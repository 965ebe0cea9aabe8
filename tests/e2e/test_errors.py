"""No RPC answers UNKNOWN: a fault inside the data plane is INTERNAL with a generic message, a body that does not
parse is INVALID_ARGUMENT, for every RPC of both services."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton
from google.protobuf.message import Message
from tritonclient.utils import InferenceServerException

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service.errors import INTERNAL_MESSAGE
from tests.e2e.conftest import MODEL, Reference, ThreadServer, report, thread_settings, triton_inputs

SECRET = "/srv/secret/path: a detail only the server's log may hold"
SERVICES = {service.full_name: service for service in (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                                                       feedback_pb.DESCRIPTOR.services_by_name["Feedback"])}


@dataclass(frozen=True)
class Case:
    service: str
    method: str
    dataplane: str
    """The data plane method the RPC calls, made to fail."""
    request: Callable[[Reference], Message]


def _infer(reference: Reference) -> pb.ModelInferRequest:
    pixels = reference.images(1, seed=0)
    request = pb.ModelInferRequest(model_name=MODEL, id="x")
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


INFERENCE, FEEDBACK = "inference.GRPCInferenceService", "valley.v1.Feedback"
CASES = [
    Case(INFERENCE, "ServerLive", "live", lambda r: pb.ServerLiveRequest()),
    Case(INFERENCE, "ServerReady", "ready", lambda r: pb.ServerReadyRequest()),
    Case(INFERENCE, "ModelReady", "model_ready", lambda r: pb.ModelReadyRequest(name=MODEL)),
    Case(INFERENCE, "ServerMetadata", "server_metadata", lambda r: pb.ServerMetadataRequest()),
    Case(INFERENCE, "ModelMetadata", "model_metadata", lambda r: pb.ModelMetadataRequest(name=MODEL)),
    Case(INFERENCE, "ModelConfig", "model_config", lambda r: pb.ModelConfigRequest(name=MODEL)),
    Case(INFERENCE, "ModelInfer", "infer", _infer),
    Case(INFERENCE, "ModelStreamInfer", "infer", _infer),
    Case(INFERENCE, "ModelStatistics", "statistics", lambda r: pb.ModelStatisticsRequest(name=MODEL)),
    Case(INFERENCE, "RepositoryIndex", "index", lambda r: pb.RepositoryIndexRequest()),
    Case(INFERENCE, "RepositoryModelLoad", "load", lambda r: pb.RepositoryModelLoadRequest(model_name=MODEL)),
    Case(INFERENCE, "RepositoryModelUnload", "unload", lambda r: pb.RepositoryModelUnloadRequest(model_name=MODEL)),
    Case(FEEDBACK, "Report", "report", lambda r: feedback_pb.ReportRequest(
        labels=[feedback_pb.Label(model_name=MODEL, request_id="x", position=0, true_class=1)])),
]


CONTROL = {"index", "load", "unload", "report", "suggestion", "recalibrate"}
"""The methods of the data plane's control half; the others are its inference half's."""


def _plane(server: ThreadServer, method: str) -> object:
    return server.server.control if method in CONTROL else server.server.inference


def _streaming(service: str, method: str) -> bool:
    return bool(SERVICES[service].methods_by_name[method].client_streaming)


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ThreadServer]:
    with ThreadServer(thread_settings(repository)) as running:
        yield running


def _call(url: str, case: Case, body: bytes) -> Any:
    """Send `body` as the request of `case`'s RPC; the response bytes (or the stream's first response)."""
    path = f"/{case.service}/{case.method}"
    with grpc.insecure_channel(url) as channel:
        if _streaming(case.service, case.method):
            return next(iter(channel.stream_stream(path)(iter([body]), timeout=10)))
        return channel.unary_unary(path)(body, timeout=10)


def test_every_rpc_of_both_services_is_covered() -> None:
    covered = {(case.service, case.method) for case in CASES}
    assert covered == {(name, method.name) for name, service in SERVICES.items() for method in service.methods}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.method)
def test_a_fault_in_the_data_plane_is_internal_with_a_generic_message(
        server: ThreadServer, reference: Reference, case: Case, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(_plane(server, case.dataplane), case.dataplane, broken)
    body = case.request(reference).SerializeToString()
    with caplog.at_level(logging.ERROR, logger="service"):
        if _streaming(case.service, case.method):
            # A failed request on a stream answers with its error and the stream goes on, as in Triton.
            answer = pb.ModelStreamInferResponse.FromString(_call(server.url, case, body))
            assert answer.error_message == f"INTERNAL: {INTERNAL_MESSAGE}" and answer.infer_response.id == "x"
        else:
            with pytest.raises(grpc.RpcError) as error:
                _call(server.url, case, body)
            assert error.value.code() == grpc.StatusCode.INTERNAL, error.value.details()
            assert error.value.details() == INTERNAL_MESSAGE
    assert any(SECRET in (record.exc_text or "") for record in caplog.records), "the server logs the traceback"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.method)
def test_a_body_that_does_not_parse_is_invalid_argument(server: ThreadServer, case: Case) -> None:
    # Field 1 as a length-delimited value that claims more bytes than follow.
    with pytest.raises(grpc.RpcError) as error:
        _call(server.url, case, b"\x0a\xff\xff\xff\x0f")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "does not parse" in error.value.details()


def test_a_stream_goes_on_after_a_request_that_fails_in_the_data_plane(server: ThreadServer, reference: Reference,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    infer, calls = server.server.inference.infer, []

    async def first_fails(request: Any) -> Any:
        calls.append(request.id)
        if len(calls) == 1:
            raise KeyError(SECRET)
        return await infer(request)

    monkeypatch.setattr(server.server.inference, "infer", first_fails)
    requests = []
    for index in range(2):
        request = _infer(reference)
        request.id = f"s{index}"
        requests.append(request.SerializeToString())
    with grpc.insecure_channel(server.url) as channel:
        answers = [pb.ModelStreamInferResponse.FromString(answer) for answer in channel.stream_stream(
            f"/{INFERENCE}/ModelStreamInfer")(iter(requests), timeout=10)]
    failed = [answer for answer in answers if answer.error_message]
    assert len(answers) == 2 and len(failed) == 1
    assert failed[0].error_message == f"INTERNAL: {INTERNAL_MESSAGE}" and SECRET not in str(answers)


HTTP_CASES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("GET", "/v2", "server_metadata", None),
    ("GET", f"/v2/models/{MODEL}", "model_metadata", None),
    ("GET", f"/v2/models/{MODEL}/ready", "check_ready", None),
    ("GET", f"/v2/models/{MODEL}/config", "model_config", None),
    ("GET", f"/v2/models/{MODEL}/stats", "statistics", None),
    ("GET", "/v2/models/stats", "statistics", None),
    ("POST", f"/v2/models/{MODEL}/infer", "infer", {"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                                 "shape": [1, 1, 16, 16], "data": [0] * 256}]}),
    ("POST", "/v2/repository/index", "index", {}),
    ("POST", f"/v2/repository/models/{MODEL}/load", "load", {}),
    ("POST", f"/v2/repository/models/{MODEL}/unload", "unload", {}),
    ("POST", "/valley/v1/feedback", "report", {"labels": []}),
    ("GET", f"/valley/v1/models/{MODEL}/calibration", "suggestion", None),
    ("POST", f"/valley/v1/models/{MODEL}/recalibrate", "recalibrate", {}),
]


@pytest.mark.parametrize(("method", "path", "dataplane", "body"), HTTP_CASES, ids=lambda v: str(v))
def test_a_fault_in_the_data_plane_is_a_500_over_http_with_a_generic_message(
        server: ThreadServer, method: str, path: str, dataplane: str, body: dict[str, Any] | None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(_plane(server, dataplane), dataplane, broken)
    connection = http.client.HTTPConnection("127.0.0.1", server.ports.http or 0, timeout=10)
    with caplog.at_level(logging.ERROR, logger="service"):
        connection.request(method, path, json.dumps(body).encode() if body is not None else None)
        answer = connection.getresponse()
        status, text = answer.status, answer.read()
    connection.close()
    assert (status, json.loads(text)) == (500, {"error": INTERNAL_MESSAGE})
    assert any(SECRET in (record.exc_text or "") for record in caplog.records), "the server logs the traceback"


def test_overlong_names_and_ids_are_refused_without_being_echoed(repository: Path, reference: Reference) -> None:
    long = "z" * 100_000
    with ThreadServer(thread_settings(repository)) as server:
        client = triton.InferenceServerClient(server.url)
        pixels = reference.images(1, seed=21)
        calls: list[Callable[[], object]] = [
            lambda: client.infer(MODEL, triton_inputs(pixels), request_id=long),
            lambda: client.infer(long, triton_inputs(pixels)),
            lambda: client.infer(MODEL, triton_inputs(pixels), model_version=long)]
        for call in calls:
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert "INVALID_ARGUMENT" in str(refused.value.status())
            assert "at most 256" in str(refused.value) and "zzzz" not in str(refused.value)
        with pytest.raises(grpc.RpcError) as label:
            report(server.url, [(long, 0, 1)])
        assert label.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "zzzz" not in str(label.value.details())
        assert client.infer(MODEL, triton_inputs(pixels), request_id="r" * 256).as_numpy("probabilities").shape \
            == (1, 10), "256 characters are still taken"
