"""valley-serve driven with plain grpcio stubs: typed contents, health, reflection, size limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, Reference, ThreadServer, health_status, thread_settings


@pytest.fixture(scope="module")
def stub(served: ServerProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _raw_request(pixels: np.ndarray, *outputs: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id="raw")
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def _array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    dtype = {"FP32": np.float32, "INT64": np.int64}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(list(tensor.shape))


def test_typed_contents_give_the_same_answer_as_raw(stub: pb_grpc.GRPCInferenceServiceStub,
                                                    reference: Reference) -> None:
    pixels = reference.images(3, seed=7)
    request = pb.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    request.outputs.add(name="probabilities")
    typed = stub.ModelInfer(request, timeout=10)
    raw = stub.ModelInfer(_raw_request(pixels, "probabilities"), timeout=10)
    assert typed.id == "typed" and not typed.outputs[0].HasField("contents"), "outputs always travel raw"
    np.testing.assert_array_equal(_array(typed, "probabilities"), _array(raw, "probabilities"))
    np.testing.assert_allclose(_array(typed, "probabilities"), reference(pixels)["probabilities"], atol=1e-6)


@pytest.mark.parametrize(("mutate", "words"), [
    (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-1]), "bytes of raw data"),
    (lambda r: r.inputs[0].contents.uint_contents.append(1), "either raw or as contents"),
    (lambda r: r.inputs[0].__setattr__("datatype", "COMPLEX"), "not supported"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -2), "negative dimension"),
    (lambda r: r.raw_input_contents.append(b"x"), "2 entries for 1 inputs"),
    (lambda r: r.__setattr__("model_name", ""), "names no model"),
    (lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([0, 2**62, 2**62]),
                r.raw_input_contents.__setitem__(0, b"")), "must have shape"),
])
def test_malformed_requests_are_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, reference: Reference,
                                                 mutate: object, words: str) -> None:
    request = _raw_request(reference.images(2, seed=8))
    mutate(request)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    expected = grpc.StatusCode.NOT_FOUND if words == "names no model" else grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.code() == expected
    assert words in error.value.details()


def test_typed_values_out_of_range_and_non_finite_values(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 1, 16, 16]).contents.uint_contents.extend(
        [3] * 255 + [300])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the UINT8 range" in error.value.details()
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="pixels", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.0, float("nan")])
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    # The model takes UINT8: a float tensor is refused by its declaration, before its values are read (the codec's
    # NaN check is in tests/test_codec.py).
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be UINT8" in error.value.details()


def test_health_for_the_server_and_each_model(served: ServerProcess) -> None:
    for service in ("", "inference.GRPCInferenceService", MODEL):
        assert health_status(served.grpc_port, service) == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        health_status(served.grpc_port, "nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(served: ServerProcess) -> None:
    with grpc.insecure_channel(served.url) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        described = database.FindFileContainingSymbol("inference.ModelInferRequest")
        assert "ModelInferRequest" in [m.name for m in described.message_type]


def test_messages_above_the_size_limit_are_refused(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository, max_message_bytes=4096)) as server, \
            grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        small = stub.ModelInfer(_raw_request(reference.images(1, seed=9), "predicted_class"), timeout=10)
        assert _array(small, "predicted_class").shape == (1,)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(_raw_request(reference.images(64, seed=9)), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
