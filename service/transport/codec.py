"""Tensors between the Open Inference Protocol's messages and the core: inputs framed, outputs encoded.

Inputs may come as raw bytes (`raw_input_contents`, what tritonclient sends) or as typed
contents; framing turns each into a `WireTensor` (`service.core.tensors`) without reading its
data: the core checks the declaration against the model, then decodes. Outputs always go back
raw, since tritonclient reads only raw outputs. Every check a client can fail raises
`InvalidInput` with a message naming the tensor and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from service._proto.inference import grpc_service_pb2 as pb
from service.core.tensors import DATATYPES, MAX_TENSORS, Raw, Values, WireTensor
from service.errors import InvalidInput, check_length

_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# Which repeated field of InferTensorContents carries each datatype (FP16 travels raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}

_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
           "fp64_contents", "bytes_contents")
TYPED_ON_LOOP = 4096
"""Typed values a request may hold and still be converted on the event loop; more go to a worker thread."""


def typed_values(request: pb.ModelInferRequest) -> int:
    """How many typed values the request's inputs hold (cheap: no value is read)."""
    return sum(len(getattr(tensor.contents, field)) for tensor in request.inputs[:MAX_TENSORS] for field in _FIELDS)


def refuse_shared_memory(kind: str, name: str, parameters: Iterable[str]) -> None:
    """`InvalidInput` when an input's or output's (`kind`) parameters ask for shared memory, which is not served."""
    if any(key.startswith("shared_memory") for key in parameters):
        fix = "send the data in the request" if kind == "input" else "outputs come back in the response"
        raise InvalidInput(f"{kind} '{name}': shared-memory {kind}s are not supported; {fix}")


def frame_inputs(request: pb.ModelInferRequest) -> list[WireTensor]:
    """The request's inputs as declared, their data unread: the raw entry of each, or the one typed field its
    datatype travels in."""
    if len(request.inputs) > MAX_TENSORS:
        raise InvalidInput(f"the request has {len(request.inputs)} inputs; at most {MAX_TENSORS} are taken")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
                           "send one raw entry per input, in the order of `inputs`")
    tensors = []
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        check_length("an input's name", name)
        refuse_shared_memory("input", name, tensor.parameters)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{name}': give its data either raw or as contents, not both")
            payload: Raw | Values = Raw(raw[index])
        else:
            payload = _typed(name, tensor)
        tensors.append(WireTensor(name, tensor.datatype, tensor.shape, payload))
    return tensors


def _typed(name: str, tensor: pb.ModelInferRequest.InferInputTensor) -> Values:
    """The typed field holding the input's values (not read), after checking that no other field holds any."""
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        if tensor.datatype in DATATYPES:
            raise InvalidInput(f"input '{name}': {tensor.datatype} data must be sent in raw_input_contents")
        return Values((), "contents", flat=True)  # an unknown datatype: the core says which ones are taken
    for other in _FIELDS:
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidInput(f"input '{name}': {tensor.datatype} values go in contents.{field}, but "
                               f"contents.{other} holds values too")
    return Values(getattr(tensor.contents, field), f"contents.{field}", flat=True)


def datatype_of(name: str, array: np.ndarray) -> str:
    """The protocol's datatype of an output array: BYTES for an object array of bytes (classification strings)."""
    if array.dtype == object:
        return "BYTES"
    if array.dtype not in _NAMES:
        raise TypeError(f"output '{name}' has dtype {array.dtype}, which the protocol cannot carry")
    return _NAMES[array.dtype]


def raw_bytes(array: np.ndarray) -> bytes:
    """An output's raw contents: little-endian values, or for BYTES each element's 4-byte little-endian length
    followed by its bytes (the protocol's serialization, over gRPC and HTTP alike)."""
    if array.dtype == object:
        return b"".join(len(item).to_bytes(4, "little") + item for item in array.flat)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_outputs(outputs: Mapping[str, np.ndarray], response: pb.ModelInferResponse) -> None:
    """Append each array to `response` as an output tensor with raw contents."""
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(name, array), shape=list(array.shape))
        response.raw_output_contents.append(raw_bytes(array))
