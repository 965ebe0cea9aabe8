"""gRPC and HTTP answer the same malformed request parameters with the same code and the same message: both
transports hand the parameters over as sent, and one module reads them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service.errors import HTTP_STATUS
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, Reference
from tests.e2e.test_http import call, infer_body

Value = bool | int | float | str


@pytest.fixture(scope="module")
def stub(served: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _set(parameter: pb.InferParameter, value: Value) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


def _over_grpc(stub: pb_grpc.GRPCInferenceServiceStub, pixels: np.ndarray, parameters: dict[str, Value],
               output_parameters: dict[str, Value]) -> tuple[str, str]:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    for key, value in parameters.items():
        _set(request.parameters[key], value)
    output = request.outputs.add(name="probabilities")
    for key, value in output_parameters.items():
        _set(output.parameters[key], value)
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        return error.code().name, error.details()
    return "OK", ""


def _over_http(served: ServerProcess, pixels: np.ndarray, parameters: dict[str, Value],
               output_parameters: dict[str, Value]) -> tuple[int, str]:
    body = infer_body(pixels, parameters=parameters,
                      outputs=[{"name": "probabilities", "parameters": output_parameters}])
    status, _, answer = call(served, "POST", f"/v2/models/{MODEL}/infer", body)
    return status, json.loads(answer).get("error", "") if status != 200 else ""


@pytest.mark.parametrize(("parameters", "output_parameters", "words"), [
    ({"timeout": "soon"}, {}, "parameter 'timeout' must be a whole number of microseconds"),
    ({"timeout": -5}, {}, "parameter 'timeout'"),
    ({"timeout": 1.5}, {}, "parameter 'timeout'"),
    ({"timeout": True}, {}, "parameter 'timeout'"),
    ({"members": "most"}, {}, "members"),
    ({"members": 0}, {}, "members"),
    ({"members": 2.5}, {}, "members"),
    ({"members": True}, {}, "members"),
    ({"target_accuracy": 1.5}, {}, "target_accuracy"),
    ({"target_accuracy": "high"}, {}, "target_accuracy"),
    ({"target_accuracy": False}, {}, "target_accuracy"),
    ({"coverage": 1.5}, {}, "parameter 'coverage' must be a number in (0, 1]"),
    ({"coverage": "most"}, {}, "parameter 'coverage' must be a number in (0, 1]"),
    ({"coverage": 0}, {}, "parameter 'coverage'"),
    ({"coverage": True}, {}, "parameter 'coverage'"),
    ({"conformal_score": "thr"}, {}, "parameter 'conformal_score' must be one of lac, aps, raps"),
    ({"conformal_score": 3}, {}, "parameter 'conformal_score'"),
    ({"binary_data_output": "yes"}, {}, "binary_data_output"),
    ({"binary_data_output": 1}, {}, "binary_data_output"),
    ({}, {"classification": "three"}, "classification"),
    ({}, {"classification": -1}, "classification"),
])
def test_a_malformed_parameter_gets_the_same_code_and_message_over_both(
        stub: pb_grpc.GRPCInferenceServiceStub, served: ServerProcess, reference: Reference,
        parameters: dict[str, Value], output_parameters: dict[str, Value], words: str) -> None:
    pixels = reference.images(2, seed=5)
    code, grpc_message = _over_grpc(stub, pixels, parameters, output_parameters)
    status, http_message = _over_http(served, pixels, parameters, output_parameters)
    assert code == "INVALID_ARGUMENT" and status == HTTP_STATUS[code], (code, status, grpc_message, http_message)
    assert grpc_message == http_message and words in grpc_message, (grpc_message, http_message)


def test_well_formed_parameters_are_taken_over_both(stub: pb_grpc.GRPCInferenceServiceStub, served: ServerProcess,
                                                    reference: Reference) -> None:
    pixels = reference.images(2, seed=6)
    accepted: list[dict[str, Value]] = [{"timeout": 10_000_000}, {"timeout": 0}, {"timeout": 5e6},
                                        {"members": "full"},
                                        {"members": 2}, {"members": "1"}, {"coverage": 0.95}, {"coverage": 1},
                                        {"coverage": "0.8", "conformal_score": "raps"},
                                        {"unknown_to_valley": "ignored"}]
    for parameters in accepted:
        assert _over_grpc(stub, pixels, parameters, {}) == ("OK", ""), parameters
        assert _over_http(served, pixels, parameters, {}) == (200, ""), parameters


@pytest.mark.parametrize(("name", "datatype", "dims", "words"), [
    ("pixels", "COMPLEX", [1, 1, 16, 16], "datatype 'COMPLEX' is not supported"),
    ("pixels", "UINT8", [1, -1, 16, 16], "negative dimension"),
    ("pixels", "UINT8", [1] * 9, "at most 8"),
    ("pixels", "FP32", [1, 1, 16, 16], "FP32"),
    ("image", "UINT8", [1, 1, 16, 16], "image"),
    ("pixels", "UINT8", [65, 1, 16, 16], "at most 64 per request"),
    ("pixels", "UINT8", [1, 1, 16, 8], "must have shape"),
])
def test_a_malformed_tensor_declaration_gets_the_same_answer_over_both(
        stub: pb_grpc.GRPCInferenceServiceStub, served: ServerProcess, name: str, datatype: str, dims: list[int],
        words: str) -> None:
    """Both transports only frame tensors; the core checks every declaration, so the messages are one."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=name, datatype=datatype, shape=dims)
    request.raw_input_contents.append(b"")
    try:
        stub.ModelInfer(request, timeout=30)
        code, grpc_message = "OK", ""
    except grpc.RpcError as error:
        code, grpc_message = error.code().name, error.details()
    body = {"inputs": [{"name": name, "datatype": datatype, "shape": dims, "data": []}]}
    status, _, answer = call(served, "POST", f"/v2/models/{MODEL}/infer", body)
    http_message = json.loads(answer).get("error", "")
    assert code == "INVALID_ARGUMENT" and status == 400, (code, status, grpc_message, http_message)
    assert grpc_message == http_message and words in grpc_message, (grpc_message, http_message)
