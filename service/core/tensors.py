"""A request's input tensors as the wire declared them, and their decoding into numpy arrays, for both transports.

A transport only frames: it turns its message (protobuf's inputs with raw or typed contents, HTTP's
JSON tensors with JSON or binary data) into `WireTensor`s, each a declaration (name, datatype,
shape) and its data as it arrived, unread: raw little-endian bytes (`Raw`) or a sequence of values
(`Values`: a typed protobuf field, a JSON array flat or nested). `decode` then checks every
declaration, by the rules here and by the model's `Expect`, before it reads any data, so what a
request may make the server convert or allocate is bounded by what the model takes, never by
what the client declared; and a malformed tensor gets the same message over either transport.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput, check_length

MAX_RANK = 8
"""Most dimensions a tensor may declare (images are [B, C, H, W])."""
MAX_TENSORS = 16
"""Most inputs, or outputs asked for, in one request."""

Expect = Callable[[str, str, tuple[int, ...]], None]
"""Raises `InvalidInput` unless a tensor declared with this name, datatype and shape is one the model takes."""

DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}


@dataclass(frozen=True)
class Raw:
    """Raw little-endian bytes (gRPC's raw_input_contents, HTTP's binary data)."""

    data: bytes | memoryview
    where: str = "raw data"
    """What the bytes are called on their wire, for messages."""


@dataclass(frozen=True)
class Values:
    """A sequence of values: a typed protobuf field, or a JSON array (flat, or nested like the shape)."""

    values: object
    where: str
    """Where the values came from, for messages: contents.uint_contents, data."""
    flat: bool = False
    """The values are a flat sequence (a typed protobuf field): their count is checked before any is read."""


@dataclass(frozen=True)
class WireTensor:
    """One input as the wire declared it; its data is not read until the declaration has passed."""

    name: str
    datatype: str
    dims: Sequence[int]
    payload: Raw | Values


def _dtype(name: str, datatype: str) -> np.dtype[np.generic]:
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}': datatype {datatype!r} is not supported; use one of "
                           f"{', '.join(DATATYPES)}")
    return DATATYPES[datatype]


def _shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    if len(dims) > MAX_RANK:
        raise InvalidInput(f"input '{name}': {len(dims)} dimensions; at most {MAX_RANK} are taken")
    shape = tuple(dims)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input '{name}': shape {list(shape)} has a negative dimension")
    return shape


def check_range(name: str, datatype: str, values: np.ndarray) -> None:
    """`InvalidInput` when integer `values` (of a wider type) do not fit the input's integer datatype."""
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values.size:
        limits = np.iinfo(dtype)  # type: ignore[type-var]
        if values.min() < limits.min or values.max() > limits.max:
            raise InvalidInput(f"input '{name}': values outside the {datatype} range [{limits.min}, {limits.max}]")


def little_endian(data: bytes | memoryview, dtype: np.dtype[np.generic]) -> np.ndarray:
    """Raw little-endian `data` (the protocol's byte order) as a flat array of `dtype`."""
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def _raw(name: str, datatype: str, dtype: np.dtype[np.generic], shape: tuple[int, ...], raw: Raw) -> np.ndarray:
    needed = math.prod(shape) * dtype.itemsize
    if len(raw.data) != needed:
        raise InvalidInput(f"input '{name}': {len(raw.data)} bytes of {raw.where}, but {datatype} {list(shape)} "
                           f"needs {needed}")
    return little_endian(raw.data, dtype)


def _values(name: str, datatype: str, dtype: np.dtype[np.generic], shape: tuple[int, ...],
            values: Values) -> np.ndarray:
    if not isinstance(values.values, Sequence) or isinstance(values.values, str | bytes):
        raise InvalidInput(f"input '{name}': {values.where} must be an array of values (flat or nested), or the "
                           "data sent raw")
    count = math.prod(shape)
    if values.flat and len(values.values) != count:
        raise InvalidInput(f"input '{name}': {len(values.values)} values in {values.where}, but shape {list(shape)} "
                           f"needs {count}")
    try:
        array = np.array(values.values)
    except (ValueError, OverflowError):  # ragged nesting, or integers beyond 64 bits
        raise InvalidInput(f"input '{name}': {values.where} must nest like its shape {list(shape)} (or be flat), "
                           "with numbers in range") from None
    if array.size != count:
        raise InvalidInput(f"input '{name}': {array.size} values in {values.where}, but shape {list(shape)} needs "
                           f"{count}")
    kind = array.dtype.kind if array.size else dtype.kind
    allowed = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if kind not in allowed:
        wanted = {"b": "true or false", "u": "integers", "i": "integers", "f": "numbers"}[dtype.kind]
        shown = "text" if kind in "US" else "other values"
        raise InvalidInput(f"input '{name}': {datatype} {values.where} must be {wanted}, got {shown}")
    check_range(name, datatype, array)
    return array.astype(dtype)


def decode(tensors: Sequence[WireTensor], expect: Expect) -> dict[str, np.ndarray]:
    """The input arrays by name; each declaration is checked (here, then by `expect`) before its data is read."""
    if len(tensors) > MAX_TENSORS:
        raise InvalidInput(f"the request has {len(tensors)} inputs; at most {MAX_TENSORS} are taken")
    arrays: dict[str, np.ndarray] = {}
    for tensor in tensors:
        name = tensor.name
        check_length("an input's name", name)
        if name in arrays:
            raise InvalidInput(f"input '{name}' is given twice")
        dtype = _dtype(name, tensor.datatype)
        shape = _shape(name, tensor.dims)
        expect(name, tensor.datatype, shape)
        payload = tensor.payload
        flat = _raw(name, tensor.datatype, dtype, shape, payload) if isinstance(payload, Raw) else \
            _values(name, tensor.datatype, dtype, shape, payload)
        try:
            array = flat.reshape(shape)
        except ValueError as error:  # e.g. a zero-sized shape whose other dimensions overflow
            raise InvalidInput(f"input '{name}': shape {list(shape)} is not usable ({error})") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"input '{name}' holds NaN or infinite values")
        arrays[name] = array
    return arrays
