from __future__ import annotations

import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as pb
from service.core.tensors import Expect, decode
from service.errors import InvalidInput
from service.transport.codec import encode_outputs, frame_inputs


def _anything(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    pass


def decode_inputs(request: pb.ModelInferRequest, expect: Expect = _anything) -> dict[str, np.ndarray]:
    """What the server does with a request's inputs: framed by the gRPC codec, decoded by the core."""
    return decode(frame_inputs(request), expect)


def _raw_request(array: np.ndarray, datatype: str, name: str = "pixels") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


@pytest.mark.parametrize(("dtype", "datatype"), [(np.uint8, "UINT8"), (np.float32, "FP32"), (np.int64, "INT64"),
                                                 (np.float16, "FP16"), (np.bool_, "BOOL")])
def test_raw_inputs_round_trip(dtype: type, datatype: str) -> None:
    array: np.ndarray = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    decoded = decode_inputs(_raw_request(array, datatype))["pixels"]
    assert decoded.dtype == np.dtype(dtype) and np.array_equal(decoded, array)


def test_typed_contents() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 2, 2])
    tensor.contents.uint_contents.extend([0, 1, 254, 255])
    assert decode_inputs(request)["pixels"].tolist() == [[[0, 1], [254, 255]]]
    floats = pb.ModelInferRequest()
    floats.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([0.5, 1.5, -2])
    assert decode_inputs(floats)["x"].dtype == np.float32


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 3), "3 bytes of raw data, but UINT8 \\[1, 2, 2\\] needs 4"),
    (lambda r: setattr(r.inputs[0], "datatype", "STRING"), "datatype 'STRING' is not supported"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -1), "negative dimension"),
    (lambda r: r.raw_input_contents.append(b"x"), "2 entries for 1 inputs"),
    (lambda r: r.inputs[0].contents.uint_contents.append(1), "either raw or as contents"),
    (lambda r: r.inputs.add(name="pixels", datatype="UINT8", shape=[1]) and r.raw_input_contents.append(b"\0"),
     "given twice"),
])
def test_bad_requests_name_the_problem(mutate: object, message: str) -> None:
    request = _raw_request(np.zeros((1, 2, 2), dtype=np.uint8), "UINT8")
    mutate(request)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=message):
        decode_inputs(request)


def test_typed_values_are_checked() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="pixels", datatype="UINT8", shape=[2]).contents.uint_contents.extend([3, 300])
    with pytest.raises(InvalidInput, match=r"outside the UINT8 range \[0, 255\]"):
        decode_inputs(request)
    short = pb.ModelInferRequest()
    short.inputs.add(name="pixels", datatype="UINT8", shape=[3]).contents.uint_contents.extend([3])
    with pytest.raises(InvalidInput, match=r"1 values in contents\.uint_contents, but shape \[3\] needs 3"):
        decode_inputs(short)
    fp16 = pb.ModelInferRequest()
    fp16.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="FP16 data must be sent in raw_input_contents"):
        decode_inputs(fp16)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_are_refused(value: float) -> None:
    array = np.array([[1.0, value]], dtype=np.float32)
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        decode_inputs(_raw_request(array, "FP32", "x"))


def test_outputs_go_back_raw() -> None:
    response = pb.ModelInferResponse()
    outputs = {"probabilities": np.array([[0.25, 0.75]], dtype=np.float32), "predicted_class": np.array([1])}
    encode_outputs(outputs, response)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [1, 2]), ("predicted_class", "INT64", [1])]
    assert np.frombuffer(response.raw_output_contents[0], dtype="<f4").tolist() == [0.25, 0.75]
    assert np.frombuffer(response.raw_output_contents[1], dtype="<i8").tolist() == [1]
