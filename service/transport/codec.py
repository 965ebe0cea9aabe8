"""Tensors between the Open Inference Protocol's messages and numpy arrays.

Inputs may come as raw bytes (`raw_input_contents`, what tritonclient sends) or as typed
contents; outputs always go back raw, since tritonclient reads only raw outputs. Every check
that a client can fail raises `InvalidInput` with a message naming the tensor and the fix.

A tensor's declaration (name, datatype, shape) is checked, by the codec and then by the
caller's `expect` (the model's input), before any of its data is touched: what a request may
make the server convert or allocate is bounded by what the model takes, never by what the
client declared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from service._proto.inference import grpc_service_pb2 as pb
from service.core.request import Expect
from service.errors import InvalidInput, check_length

MAX_RANK = 8
"""Most dimensions a tensor may declare (images are [B, C, H, W])."""
MAX_TENSORS = 16
"""Most inputs, or outputs asked for, in one request."""



def _anything(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    pass

DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# Which repeated field of InferTensorContents carries each datatype (FP16 travels raw only).
_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}

# What each typed field holds, as numpy reads it before narrowing to the tensor's datatype.
_WIDE = {"bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32), "int64_contents": np.dtype(np.int64),
         "uint_contents": np.dtype(np.uint32), "uint64_contents": np.dtype(np.uint64),
         "fp32_contents": np.dtype(np.float32), "fp64_contents": np.dtype(np.float64)}
TYPED_ON_LOOP = 4096
"""Typed values a request may hold and still be converted on the event loop; more go to a worker thread."""


def typed_values(request: pb.ModelInferRequest) -> int:
    """How many typed values the request's inputs hold (cheap: no value is read)."""
    return sum(len(getattr(tensor.contents, field)) for tensor in request.inputs[:MAX_TENSORS]
               for field in (*_WIDE, "bytes_contents"))


def dtype_of(name: str, datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of input `name`'s declared datatype; `InvalidInput` listing the supported ones."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}': datatype {datatype!r} is not supported; use one of "
                           f"{', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def refuse_shared_memory(kind: str, name: str, parameters: Iterable[str]) -> None:
    """`InvalidInput` when an input's or output's (`kind`) parameters ask for shared memory, which is not served."""
    if any(key.startswith("shared_memory") for key in parameters):
        fix = "send the data in the request" if kind == "input" else "outputs come back in the response"
        raise InvalidInput(f"{kind} '{name}': shared-memory {kind}s are not supported; {fix}")


def check_range(name: str, datatype: str, values: np.ndarray) -> None:
    """`InvalidInput` when integer `values` (of a wider type) do not fit the input's integer datatype."""
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values.size:
        limits = np.iinfo(dtype)  # type: ignore[type-var]
        if values.min() < limits.min or values.max() > limits.max:
            raise InvalidInput(f"input '{name}': values outside the {datatype} range [{limits.min}, {limits.max}]")


def check_finite(name: str, array: np.ndarray) -> None:
    """`InvalidInput` when a floating-point input holds NaN or infinite values."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input '{name}' holds NaN or infinite values")


def little_endian(data: bytes | memoryview, dtype: np.dtype[np.generic]) -> np.ndarray:
    """Raw little-endian `data` (the protocol's byte order) as a flat array of `dtype`."""
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def _shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    if len(dims) > MAX_RANK:
        raise InvalidInput(f"input '{name}': {len(dims)} dimensions; at most {MAX_RANK} are taken")
    shape = tuple(dims)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    return shape


def decode_inputs(request: pb.ModelInferRequest, expect: Expect = _anything) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays, by name; each declaration passes `expect` before its data is
    read."""
    if len(request.inputs) > MAX_TENSORS:
        raise InvalidInput(f"the request has {len(request.inputs)} inputs; at most {MAX_TENSORS} are taken")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
                           "send one raw entry per input, in the order of `inputs`")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        check_length("an input's name", name)
        refuse_shared_memory("input", name, tensor.parameters)
        if name in arrays:
            raise InvalidInput(f"input '{name}' is given twice")
        dtype = dtype_of(name, tensor.datatype)
        shape = _shape(name, tensor.shape)
        expect(name, tensor.datatype, shape)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{name}': give its data either raw or as contents, not both")
            expected = count * dtype.itemsize
            if len(raw[index]) != expected:
                raise InvalidInput(f"input '{name}': {len(raw[index])} bytes of raw data, but {tensor.datatype} "
                                   f"{list(shape)} needs {expected}")
            array = little_endian(raw[index], dtype)
        else:
            array = _typed(name, tensor, dtype, count)
        try:
            array = array.reshape(shape)
        except ValueError as error:  # e.g. a zero-sized shape whose other dimensions overflow
            raise InvalidInput(f"input '{name}': shape {list(shape)} is not usable ({error})") from None
        check_finite(name, array)
        arrays[name] = array
    return arrays


def _typed(name: str, tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype[np.generic],
           count: int) -> np.ndarray:
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {tensor.datatype} data must be sent in raw_input_contents")
    for other in (*_WIDE, "bytes_contents"):
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidInput(f"input '{name}': {tensor.datatype} values go in contents.{field}, but "
                               f"contents.{other} holds values too")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': {len(values)} values in contents.{field}, but shape "
                           f"{list(tensor.shape)} needs {count}")
    wide = np.fromiter(values, dtype=_WIDE[field], count=count)
    check_range(name, tensor.datatype, wide)
    return wide.astype(dtype)


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
