"""Tensors between the HTTP/REST protocol's bodies and numpy arrays: JSON, and Triton's binary data.

A request body is a JSON object, or, with the binary-data extension, a JSON object of
`Inference-Header-Content-Length` bytes followed by the raw data of every input whose
parameters give a `binary_data_size`, in the order of `inputs`. JSON data may be flat or nested
in the tensor's shape. A response is JSON, or JSON followed by the raw data of every output
sent binary (`"binary_data": true` on the output, or `"binary_data_output": true` on the
request for outputs that do not say), whose parameters then give its `binary_data_size`.

As in `service.transport.codec`, inputs are only framed here (`WireTensor`s, data unread); the
core checks each declaration against the model before it decodes the data, with the same rules
and messages for both transports. Every check a client can fail raises `InvalidInput` naming
the tensor and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.core.inference import Framing
from service.core.request import Parameter
from service.core.tensors import MAX_TENSORS, Raw, Values, WireTensor
from service.errors import InvalidInput, check_length
from service.transport.codec import datatype_of, raw_bytes, refuse_shared_memory

HEADER_LENGTH = "inference-header-content-length"
"""The header giving the JSON part's size when binary data follows it (Triton's binary-data extension)."""
BINARY_OUTPUT = "binary_data_output"
JSON_ON_LOOP = 64 << 10
"""Bytes of JSON a request may hold and still be parsed on the event loop; larger ones go to a worker thread."""
VALUES_ON_LOOP = 1 << 16
"""Output values an answer may hold and still be encoded on the event loop; larger ones go to a worker thread."""


@dataclass(frozen=True)
class Body:
    """An inference request's JSON object and the binary data after it."""

    header: dict[str, Any]
    binary: memoryview


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def json_object(data: bytes | memoryview, fix: str = "") -> dict[str, Any]:
    """A request body that must be one JSON object; `fix`, if given, ends the message when it does not parse."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise InvalidInput(f"the request body is not valid JSON ({error}){fix}") from None
    return _object(value, "the request body")


def parse_body(body: bytes, header_length: str | None) -> Body:
    """Split and parse a request body; `header_length` is the `Inference-Header-Content-Length` header, if any."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise InvalidInput(f"the Inference-Header-Content-Length header must be a byte count, got "
                               f"{header_length[:40]!r}") from None
        if not 0 < size <= len(body):
            raise InvalidInput(f"the Inference-Header-Content-Length header says {size} bytes of JSON, but the body "
                               f"has {len(body)}")
    header = json_object(memoryview(body)[:size], "; send a JSON object, with Inference-Header-Content-Length when "
                                                  "binary data follows it")
    return Body(header, memoryview(body)[size:])


def text(value: object, what: str) -> str:
    """A JSON string field (at most the longest name taken)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    check_length(what, value)
    return value


def parameters(container: Mapping[str, Any], what: str) -> dict[str, Parameter]:
    """The `parameters` object of a request, an input or an output (each value a boolean, number or string)."""
    found = _object(container.get("parameters", {}), f"{what}'s parameters")
    if len(found) > MAX_TENSORS * 4:
        raise InvalidInput(f"{what} has {len(found)} parameters; at most {MAX_TENSORS * 4} are taken")
    for key, value in found.items():
        check_length(f"a parameter name of {what}", key)
        if not isinstance(value, bool | int | float | str):
            raise InvalidInput(f"{what}'s parameter {key!r} must be a boolean, number or string, got "
                               f"{type(value).__name__}")
    return found


def _dims(name: str, value: object) -> list[int]:
    """A tensor's `shape`: a list of integers (its rank and signs are the core's to check, as for gRPC)."""
    if not isinstance(value, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in value):
        raise InvalidInput(f"input '{name}': shape must be a list of integers, got {str(value)[:60]}")
    return value


def frame(body: Body) -> Framing:
    """The request's inputs as declared, their data unread (a JSON array, or a slice of the binary data), and the
    outputs it asks for."""
    header = body.header
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs 'inputs': a list of tensors, each with name, shape, datatype and data")
    if len(inputs) > MAX_TENSORS:
        raise InvalidInput(f"the request has {len(inputs)} inputs; at most {MAX_TENSORS} are taken")
    tensors: list[WireTensor] = []
    offset = 0
    for position, tensor in enumerate(inputs):
        tensor = _object(tensor, f"input {position}")
        name = text(tensor.get("name"), f"input {position}'s name")
        options = parameters(tensor, f"input '{name}'")
        refuse_shared_memory("input", name, options)
        datatype = text(tensor.get("datatype"), f"input '{name}''s datatype")
        dims = _dims(name, tensor.get("shape"))
        if "binary_data_size" in options:
            size = options["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a number of bytes, got {size!r}")
            if tensor.get("data") is not None:
                raise InvalidInput(f"input '{name}': give its data either in JSON or as binary data, not both")
            if offset + size > len(body.binary):
                raise InvalidInput(f"input '{name}': {size} bytes of binary data declared, but only "
                                   f"{len(body.binary) - offset} follow the JSON")
            payload: Raw | Values = Raw(body.binary[offset:offset + size], "binary data (binary_data_size)")
            offset += size
        else:
            payload = Values(tensor.get("data"), "data")
        tensors.append(WireTensor(name, datatype, dims, payload))
    if offset != len(body.binary):
        raise InvalidInput(f"{len(body.binary) - offset} bytes of binary data follow the JSON that no input's "
                           "binary_data_size accounts for")
    outputs, classification = _outputs(header.get("outputs", []))
    return tensors, outputs, classification


def _outputs(requested: object) -> tuple[tuple[str, ...], dict[str, object]]:
    if not isinstance(requested, list):
        raise InvalidInput("'outputs' must be a list of objects, each with a name")
    if len(requested) > MAX_TENSORS:
        raise InvalidInput(f"the request asks for {len(requested)} outputs; at most {MAX_TENSORS} are taken")
    names: list[str] = []
    classification: dict[str, object] = {}
    for position, output in enumerate(requested):
        output = _object(output, f"output {position}")
        name = text(output.get("name"), f"output {position}'s name")
        options = parameters(output, f"output '{name}'")
        refuse_shared_memory("output", name, options)
        if "classification" in options:
            classification[name] = options["classification"]
        if not isinstance(options.get("binary_data", False), bool):
            raise InvalidInput(f"output '{name}': parameter 'binary_data' must be true or false")
        names.append(name)
    return tuple(names), classification


def binary_outputs(header: Mapping[str, Any], default: bool) -> set[str] | bool:
    """Which outputs go back as binary data: those that ask for it, or when the request names no output, every one
    if `default` (the request's `binary_data_output`). Call once `decode` has checked the outputs."""
    requested = header.get("outputs")
    if not requested:
        return default
    return {output["name"] for output in requested if output.get("parameters", {}).get("binary_data", default)}


def encode(model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray],
           response_parameters: Mapping[str, Parameter], binary: set[str] | bool) -> tuple[bytes, int | None]:
    """The response body and, when binary data follows the JSON, the JSON's length (the header to send)."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs.items():
        datatype = datatype_of(name, array)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary is True or (isinstance(binary, set) and name in binary):
            data = raw_bytes(array)
            output["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif datatype == "BYTES":
            output["data"] = [item.decode("utf-8", errors="replace") for item in array.flat]
        else:
            output["data"] = np.ascontiguousarray(array).ravel()
        described.append(output)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request_id:
        response["id"] = request_id
    if response_parameters:
        response["parameters"] = dict(response_parameters)
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)
