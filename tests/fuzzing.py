"""Malformed requests for every RPC valley serves, as hypothesis strategies, and what every answer must keep.

Three kinds of request body, for each RPC of inference.GRPCInferenceService and valley.v1.Feedback:

* structural: a valid request with some of its fields replaced (huge, negative or empty shapes, wrong
  datatypes, names of up to 100,000 characters, odd unicode, thousands of inputs or outputs, typed contents
  far larger than the input, raw contents of the wrong size, odd parameters and timeouts), with unknown
  fields appended as raw protobuf;
* byte-level: the serialized form of a valid or structurally mutated request with bits flipped, bytes set,
  inserted, deleted or repeated, lengths blown up, or cut short;
* raw: random bytes.

A request body of a failing example can be sent again to a running server:

    .venv/bin/python -m tests.fuzzing HOST:PORT /inference.GRPCInferenceService/ModelInfer BODY_FILE
"""

from __future__ import annotations

import math
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.valley.v1 import feedback_pb2 as feedback_pb

INFERENCE, FEEDBACK = "inference.GRPCInferenceService", "valley.v1.Feedback"
METHODS: dict[str, MethodDescriptor] = {
    f"/{service.full_name}/{method.name}": method
    for service in (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                    feedback_pb.DESCRIPTOR.services_by_name["Feedback"])
    for method in service.methods}
"""Every RPC of both services, by its path."""
STREAM_INFER = f"/{INFERENCE}/ModelStreamInfer"
MODEL_INFER = f"/{INFERENCE}/ModelInfer"
LOAD, UNLOAD = f"/{INFERENCE}/RepositoryModelLoad", f"/{INFERENCE}/RepositoryModelUnload"
REPORT = f"/{FEEDBACK}/Report"

FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
MAX_DETAILS = 400
"""The longest status detail a client may get (service.errors.MAX_MESSAGE)."""
CLIENT_DEADLINE_DETAILS = "Deadline Exceeded"
"""What grpc's client library says when the server did not answer in time (the server's own words differ)."""
TRANSPORT = re.compile(r"Socket closed|Connection reset|failed to connect|Broken pipe|Stream removed|RST_STREAM")
"""What grpc's client library says when the connection broke, not the server."""
MAX_NAME = 100_000
"""The longest name, id or key a structural mutation makes."""


def short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Target:
    """What the valid requests name: the served model, its input, and a request id served before the campaign."""

    model: str
    version: str
    input_name: str
    datatype: str
    image_shape: tuple[int, ...]
    """One image's shape, without the batch dimension."""
    pixels: bytes
    """One image, raw."""
    known_id: str
    """The id of a served request of `known_batch` images, kept for feedback labels."""
    known_batch: int
    outputs: tuple[str, ...]

    def infer(self, batch: int = 1, request_id: str = "fuzz") -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version, id=request_id)
        request.inputs.add(name=self.input_name, datatype=self.datatype, shape=[batch, *self.image_shape])
        request.raw_input_contents.append(self.pixels * batch)
        return request

    def valid(self, method: str) -> Message:
        """A request of `method` the server serves (Load and Unload name the served model)."""
        name = short(method)
        requests: dict[str, Callable[[], Message]] = {
            "ServerLive": pb.ServerLiveRequest,
            "ServerReady": pb.ServerReadyRequest,
            "ServerMetadata": pb.ServerMetadataRequest,
            "ModelReady": lambda: pb.ModelReadyRequest(name=self.model, version=self.version),
            "ModelMetadata": lambda: pb.ModelMetadataRequest(name=self.model, version=self.version),
            "ModelConfig": lambda: pb.ModelConfigRequest(name=self.model, version=self.version),
            "ModelInfer": self.infer,
            "ModelStreamInfer": self.infer,
            "ModelStatistics": lambda: pb.ModelStatisticsRequest(name=self.model, version=self.version),
            "RepositoryIndex": lambda: pb.RepositoryIndexRequest(ready=True),
            "RepositoryModelLoad": lambda: pb.RepositoryModelLoadRequest(model_name=self.model),
            "RepositoryModelUnload": lambda: pb.RepositoryModelUnloadRequest(model_name=self.model),
            "Report": lambda: feedback_pb.ReportRequest(labels=[feedback_pb.Label(
                model_name=self.model, request_id=self.known_id, position=0, true_class=1)]),
        }
        return requests[name]()


# -- values -------------------------------------------------------------------------------------------

ODD_STRINGS = (
    "", " ", "\x00", "\n", "..", ".", "/", "../", "/etc/passwd", "C:\\Windows", "%s%n%x", "{0}", "${HOME}",
    "\u202e", "\ufeff", "\u0301", "\U0001f600", "\U0010ffff", "\u0430", "\uff53", "a" * 256, "a" * 257, "null",
    "None", "-1", "0", "1e309", "NaN", "*", "synth*", "' OR 1=1 --",
)


def overlong() -> st.SearchStrategy[str]:
    """Strings of 200 to 100,000 characters, often of a length at a limit (255 bytes is the longest file name,
    256 characters the longest name the server takes); hypothesis draws a few characters, the rest repeats them."""
    lengths = st.one_of(st.sampled_from([255, 256, 257, 4096, 4097, MAX_NAME]), st.integers(200, MAX_NAME))
    pieces = st.one_of(st.sampled_from(["a", "0", "_", ".", "-", "\u00e9", "\U0001f600"]),
                       st.text(min_size=1, max_size=3))
    return st.builds(lambda piece, count: (piece * count)[:count], pieces, lengths)


def strings(valid: str = "", long: bool = True) -> st.SearchStrategy[str]:
    """A string field's values: the valid one, odd ones, variations of it, any text, overlong ones (unless not
    `long`: for values repeated thousands of times)."""
    near = st.builds(lambda prefix, suffix: prefix + valid + suffix, st.sampled_from(["", " ", "../", "/", "\x00"]),
                     st.sampled_from(["", " ", "/1", "\x00", "\u0301", "/..", "-x", ".onnx"]))
    values = [st.just(valid), st.sampled_from(ODD_STRINGS), near, st.text(max_size=24)]
    return st.one_of(*values, overlong()) if long else st.one_of(*values)


def _edges(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({value for value in (low, high, 0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                                        2**53 + 1, 2**62, -(2**31), -(2**63)) if low <= value <= high})
    return st.one_of(st.integers(max(low, -3), min(high, 70)), st.sampled_from(edges), st.integers(low, high))


INT32, INT64 = _edges(-(2**31), 2**31 - 1), _edges(-(2**63), 2**63 - 1)
UINT32, UINT64 = _edges(0, 2**32 - 1), _edges(0, 2**64 - 1)
FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]))
FLOATS32 = st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, 3.4e38]))


def infer_parameters(long: bool = True) -> st.SearchStrategy[pb.InferParameter]:
    return st.one_of(
        st.just(pb.InferParameter()),
        st.booleans().map(lambda value: pb.InferParameter(bool_param=value)),
        INT64.map(lambda value: pb.InferParameter(int64_param=value)),
        strings(long=long).map(lambda value: pb.InferParameter(string_param=value)),
        FLOATS.map(lambda value: pb.InferParameter(double_param=value)),
        UINT64.map(lambda value: pb.InferParameter(uint64_param=value)))


def repository_parameters(long: bool = True) -> st.SearchStrategy[pb.ModelRepositoryParameter]:
    return st.one_of(
        st.just(pb.ModelRepositoryParameter()),
        st.booleans().map(lambda value: pb.ModelRepositoryParameter(bool_param=value)),
        INT64.map(lambda value: pb.ModelRepositoryParameter(int64_param=value)),
        strings(long=long).map(lambda value: pb.ModelRepositoryParameter(string_param=value)),
        st.one_of(st.binary(max_size=32), st.integers(0, (1 << 20) if long else 32).map(bytes)).map(
            lambda value: pb.ModelRepositoryParameter(bytes_param=value)))


PARAMETER_KEYS = ("timeout", "priority", "sequence_id", "sequence_start", "sequence_end", "binary_data_output",
                  "binary_data_size", "triton_enable_empty_final_response", "shared_memory_region",
                  "shared_memory_offset", "shared_memory_byte_size", "classification", "max_batch_size", "config",
                  "file:1/model.onnx", "members", "target_accuracy", "coverage", "conformal_score", "")


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(PARAMETER_KEYS), st.text(max_size=16), overlong())


def parameter_maps(values: Callable[[bool], st.SearchStrategy[Message]]) -> st.SearchStrategy[dict[str, Message]]:
    """A parameters map: a few odd entries, or thousands of short ones."""
    many = st.builds(lambda value, count: {f"key-{index}": value for index in range(count)}, values(False),
                     st.integers(100, 5000))
    return st.one_of(st.dictionaries(keys(), values(True), max_size=5), many)


def fill(map_field: object, entries: dict[str, Message]) -> None:
    """Put `entries` into a protobuf map field of messages."""
    for key, value in entries.items():
        map_field[key].CopyFrom(value)  # type: ignore[index]


# -- unknown fields and byte-level mutations --------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def unknown_field(draw: st.DrawFn) -> bytes:
    """One field as raw protobuf: an unknown number or a known one with another wire type, any payload,
    groups, invalid wire types and lengths that lie."""
    number = draw(st.one_of(st.integers(1, 20), st.sampled_from([99, 1000, 19000, 2**29 - 1]),
                            st.integers(1, 2**29 - 1)))
    wire = draw(st.integers(0, 7))
    tag = varint(number << 3 | wire)
    if wire == 0:
        return tag + draw(st.one_of(UINT64.map(varint), st.just(b"\xff" * 10 + b"\x01")))
    if wire == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire == 2:
        payload = draw(st.one_of(st.binary(max_size=40), st.integers(0, 1 << 20).map(bytes)))
        length = draw(st.one_of(st.just(len(payload)), UINT64))
        return tag + varint(length) + payload
    if wire == 3:
        inner = draw(st.binary(max_size=16))
        return tag + inner + (varint(number << 3 | 4) if draw(st.booleans()) else b"")
    if wire == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    return tag + draw(st.binary(max_size=8))  # 4: an end of group without its start; 6, 7: no such wire type


def with_unknown_fields(messages: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Serialized messages, sometimes with raw fields appended (or, rarely, put in front)."""
    @st.composite
    def appended(draw: st.DrawFn) -> bytes:
        body = draw(messages)
        extra = b"".join(draw(st.lists(unknown_field(), min_size=1, max_size=4)))
        return extra + body if draw(st.integers(0, 4)) == 0 else body + extra

    return st.one_of(messages, appended())


BYTE_OPS = ("flip", "set", "insert", "delete", "duplicate", "truncate", "blow-up-length", "random-run")


@st.composite
def byte_mutated(draw: st.DrawFn, seeds: st.SearchStrategy[bytes]) -> bytes:
    """A serialized message with one to six byte-level mutations."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(BYTE_OPS))
        at = draw(st.integers(0, len(data)))
        if operation == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x0A, 0x12, 0x08]))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif operation == "duplicate":
            end = min(len(data), at + draw(st.integers(1, 64)))
            data[end:end] = data[at:end] * draw(st.integers(1, 50))
        elif operation == "truncate":
            del data[at:]
        elif operation == "blow-up-length":  # a varint made as long as it can be: a huge length or value
            data[at:at] = b"\xff" * draw(st.integers(1, 10))
        elif operation == "random-run":
            data[at:at + 8] = random.Random(draw(st.integers(0, 2**32))).randbytes(8)
    return bytes(data)


def random_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that owe nothing to any message: short ones drawn, long ones (up to 1 MiB) from a seed."""
    seeded = st.builds(lambda seed, size: random.Random(seed).randbytes(size), st.integers(0, 2**32),
                       st.integers(0, 1 << 20))
    return st.one_of(st.binary(max_size=64), seeded, st.sampled_from([b"", b"\x00", b"\xff" * 64, b"\x0a\xff\xff"]))


# -- structural mutations of each request -------------------------------------------------------------------

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", "uint8", "UINT8 ", "FP8", "STRING", "")
CONTENT_FIELDS: dict[str, st.SearchStrategy[object]] = {
    "bool_contents": st.booleans(), "int_contents": INT32, "int64_contents": INT64, "uint_contents": UINT32,
    "uint64_contents": UINT64, "fp32_contents": FLOATS32, "fp64_contents": FLOATS,
    "bytes_contents": st.binary(max_size=16)}
LARGEST_CONTENTS = 1_000_000
"""Most typed values in one structural mutation (4 to 10 MB on the wire)."""


def dims() -> st.SearchStrategy[int]:
    return INT64


def shapes(image_shape: Sequence[int]) -> st.SearchStrategy[list[int]]:
    batch = st.sampled_from([0, 1, 2, 64, 65, 1000, -1, -(2**63), 2**31, 2**63 - 1])
    return st.one_of(
        batch.map(lambda first: [first, *image_shape]),
        st.lists(dims(), max_size=8),
        st.integers(9, 10_000).map(lambda count: [1] * count),  # a rank in the thousands
        st.builds(lambda first, index, value: [first, *image_shape[:index], value, *image_shape[index + 1:]],
                  batch, st.integers(0, len(image_shape) - 1), dims()))


@st.composite
def contents(draw: st.DrawFn, count: int) -> pb.InferTensorContents:
    """Typed contents of one field: a few values, or about `count`, or far more."""
    name = draw(st.sampled_from(list(CONTENT_FIELDS)))
    values = CONTENT_FIELDS[name]
    if draw(st.booleans()):
        items = draw(st.lists(values, max_size=32))
    else:
        size = draw(st.sampled_from([count - 1, count, count + 1, 64 * count, 1000 * count, LARGEST_CONTENTS]))
        items = [draw(values)] * min(max(size, 0), LARGEST_CONTENTS)
    tensor = pb.InferTensorContents()
    getattr(tensor, name).extend(items)
    return tensor


def raw_blobs(valid: int) -> st.SearchStrategy[bytes]:
    sizes = st.one_of(st.sampled_from([0, 1, valid - 1, valid + 1, 2 * valid, 64 * valid, 65 * valid, 8 << 20]),
                      st.integers(0, 4 * valid))
    return st.one_of(st.binary(max_size=32), st.builds(lambda byte, size: bytes([byte]) * size,
                                                       st.integers(0, 255), sizes))


INFER_OPS = ("model_name", "model_version", "id", "parameters", "timeout", "input_name", "datatype", "shape",
             "typed", "typed_and_raw", "input_parameters", "raw", "no_raw", "no_inputs", "more_inputs",
             "outputs", "many_outputs", "batch", "shared_memory", "empty_final")


@st.composite
def infer_request(draw: st.DrawFn, target: Target) -> pb.ModelInferRequest:
    """A valid ModelInferRequest with up to four of its parts replaced (none: the valid request itself)."""
    request = target.infer()
    tensor = request.inputs[0]
    image = math.prod(target.image_shape)
    for operation in draw(st.lists(st.sampled_from(INFER_OPS), max_size=4)):
        if operation == "model_name":
            request.model_name = draw(strings(target.model))
        elif operation == "model_version":
            request.model_version = draw(strings(target.version))
        elif operation == "id":
            request.id = draw(strings(target.known_id))
        elif operation == "parameters":
            fill(request.parameters, draw(parameter_maps(infer_parameters)))
        elif operation == "timeout":
            value = draw(st.one_of(INT64.map(lambda micros: pb.InferParameter(int64_param=micros)),
                                   st.sampled_from([1, 10, 1000, 0, -1]).map(
                                       lambda micros: pb.InferParameter(int64_param=micros)),
                                   infer_parameters()))
            request.parameters["timeout"].CopyFrom(value)
        elif operation == "input_name":
            tensor.name = draw(strings(target.input_name))
        elif operation == "datatype":
            tensor.datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.text(max_size=8)))
        elif operation == "shape":
            del tensor.shape[:]
            tensor.shape.extend(draw(shapes(target.image_shape)))
        elif operation in ("typed", "typed_and_raw"):
            tensor.contents.CopyFrom(draw(contents(image)))
            if operation == "typed":
                del request.raw_input_contents[:]
        elif operation == "input_parameters":
            fill(tensor.parameters, draw(parameter_maps(infer_parameters)))
        elif operation == "raw":
            del request.raw_input_contents[:]
            request.raw_input_contents.extend(draw(st.lists(raw_blobs(len(target.pixels)), max_size=3)))
        elif operation == "no_raw":
            del request.raw_input_contents[:]
        elif operation == "no_inputs":
            del request.inputs[:]
        elif operation == "more_inputs":
            count = draw(st.one_of(st.integers(1, 3), st.integers(100, 5000)))
            name = draw(st.one_of(st.just(target.input_name), strings(long=False)))
            shape = [1, *target.image_shape]
            request.inputs.extend([pb.ModelInferRequest.InferInputTensor(name=name, datatype=target.datatype,
                                                                         shape=shape)] * count)
            if draw(st.booleans()):
                request.raw_input_contents.extend([target.pixels] * count)
        elif operation == "outputs":
            for name in draw(st.lists(st.one_of(st.sampled_from(target.outputs), strings()), max_size=8)):
                output = request.outputs.add(name=name)
                if draw(st.booleans()):
                    fill(output.parameters, draw(parameter_maps(infer_parameters)))
        elif operation == "many_outputs":
            name = draw(st.one_of(st.sampled_from(target.outputs), strings(long=False)))
            request.outputs.extend([pb.ModelInferRequest.InferRequestedOutputTensor(name=name)]
                                   * draw(st.integers(9, 5000)))
        elif operation == "batch":
            batch = draw(st.sampled_from([2, 8, 63, 64, 65, 1000]))
            del tensor.shape[:]
            tensor.shape.extend([batch, *target.image_shape])
            del request.raw_input_contents[:]
            request.raw_input_contents.append(target.pixels * batch)
        elif operation == "shared_memory":
            where = request.outputs.add(name=target.outputs[0]) if draw(st.booleans()) else tensor
            fill(where.parameters, {"shared_memory_region": pb.InferParameter(string_param="region"),
                                    "shared_memory_byte_size": pb.InferParameter(int64_param=64)})
        elif operation == "empty_final":
            request.parameters["triton_enable_empty_final_response"].bool_param = draw(st.booleans())
    return request


def labels(target: Target, long: bool = True) -> st.SearchStrategy[feedback_pb.Label]:
    return st.builds(feedback_pb.Label, model_name=strings(target.model, long),
                     request_id=strings(target.known_id, long),
                     position=st.one_of(st.integers(0, target.known_batch), UINT32),
                     true_class=st.one_of(st.integers(0, 11), UINT32))


def report_request(target: Target) -> st.SearchStrategy[feedback_pb.ReportRequest]:
    many = st.builds(lambda label, count: [label] * count, labels(target, long=False), st.integers(50, 20_000))
    return st.one_of(st.lists(labels(target), max_size=8), many).map(
        lambda items: feedback_pb.ReportRequest(labels=items))


def structural(method: str, target: Target) -> st.SearchStrategy[Message]:
    """Valid requests of `method` with some fields replaced."""
    name = short(method)
    model, version = strings(target.model), strings(target.version)
    if name in ("ServerLive", "ServerReady", "ServerMetadata"):
        return st.just(target.valid(method))  # nothing to replace: unknown fields and bytes do the work
    if name == "ModelReady":
        return st.builds(pb.ModelReadyRequest, name=model, version=version)
    if name == "ModelMetadata":
        return st.builds(pb.ModelMetadataRequest, name=model, version=version)
    if name == "ModelStatistics":
        return st.builds(pb.ModelStatisticsRequest, name=model, version=version)
    if name == "ModelConfig":
        return st.builds(pb.ModelConfigRequest, name=model, version=version)
    if name == "RepositoryIndex":
        return st.builds(pb.RepositoryIndexRequest, repository_name=strings(), ready=st.booleans())
    if name in ("ModelInfer", "ModelStreamInfer"):
        return infer_request(target)
    if name in ("RepositoryModelLoad", "RepositoryModelUnload"):
        kind = pb.RepositoryModelLoadRequest if name == "RepositoryModelLoad" else pb.RepositoryModelUnloadRequest

        def build(repository: str, model_name: str, parameters: dict[str, Message]) -> Message:
            request = kind(repository_name=repository, model_name=model_name)
            fill(request.parameters, parameters)
            return request

        return st.builds(build, strings(), model, st.one_of(st.just({}), parameter_maps(repository_parameters)))
    if name == "Report":
        return report_request(target)
    raise AssertionError(f"no structural mutations for {method}")


def bodies(method: str, target: Target) -> st.SearchStrategy[bytes]:
    """Request bodies for `method`: structural mutations, byte-level mutations of valid or mutated requests,
    and random bytes, about 4:4:1."""
    mutated = with_unknown_fields(structural(method, target).map(lambda message: message.SerializeToString()))
    seeds = st.one_of(st.just(target.valid(method).SerializeToString()), mutated)
    return st.one_of(mutated, byte_mutated(seeds), random_bytes())


def spares_the_model(method: str, body: bytes, model: str) -> bytes:
    """`body`, unless it would load or unload the served model: then the same request for a model that does
    not exist (a later field of the same number wins when protobuf parses it).

    The served model is unloaded and loaded again once, in a test of its own; the campaign must not take it
    away from the requests that follow.
    """
    if method not in (LOAD, UNLOAD):
        return body
    kind = GetMessageClass(METHODS[method].input_type)
    try:
        parsed = kind.FromString(body)
    except Exception:
        return body
    if getattr(parsed, "model_name", None) != model:
        return body
    missing = (model + "-missing").encode()
    return body + b"\x12" + varint(len(missing)) + missing


# -- the rules every answer keeps --------------------------------------------------------------------------


@dataclass
class Rules:
    """What no answer may do: INTERNAL, UNKNOWN, a long detail, a host path, no answer in time."""

    hidden: Sequence[str]
    """Strings no detail may hold (the repository's absolute path)."""
    problems: list[str] = field(default_factory=list)

    def detail_problem(self, details: str) -> str | None:
        if len(details) > MAX_DETAILS:
            return f"a detail of {len(details)} characters (at most {MAX_DETAILS}): {details[:120]!r}..."
        for secret in self.hidden:
            if secret in details:
                return f"the detail shows a host path: {details!r}"
        return None

    def status_problem(self, code: grpc.StatusCode, details: str) -> str | None:
        if code in FORBIDDEN:
            return f"{code.name}: {details!r}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == CLIENT_DEADLINE_DETAILS:
            return "no answer before the client's deadline"
        if code == grpc.StatusCode.UNAVAILABLE and TRANSPORT.search(details):
            return f"the connection broke (did the server die?): {details!r}"
        return self.detail_problem(details)

    def stream_error_problem(self, error_message: str) -> str | None:
        """A stream answer's `error_message`: "CODE: message"."""
        code, _, message = error_message.partition(": ")
        if code not in grpc.StatusCode.__members__ or code in ("OK", "INTERNAL", "UNKNOWN"):
            return f"a stream answer's error is {error_message[:200]!r}"
        return self.detail_problem(message)


def read_rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def identity(body: bytes) -> bytes:
    return body


def replay(url: str, method: str, bodies: Iterable[bytes], timeout: float = 10) -> None:
    """Send `bodies` to `method` (one call each; one stream for a streaming RPC) and print what comes back."""
    with grpc.insecure_channel(url) as channel:
        try:
            if method == STREAM_INFER:
                stream = channel.stream_stream(method, request_serializer=identity, response_deserializer=identity)
                for answer in stream(iter(list(bodies)), timeout=timeout):
                    print(pb.ModelStreamInferResponse.FromString(answer))
                print("stream: OK")
                return
            call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
            for body in bodies:
                print(f"OK: {call(body, timeout=timeout)!r}")
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python -m tests.fuzzing HOST:PORT /SERVICE/METHOD BODY_FILE...")
    replay(sys.argv[1], sys.argv[2], [Path(name).read_bytes() for name in sys.argv[3:]])
