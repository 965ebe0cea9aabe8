"""The generated code is fresh, and our protocol is wire-compatible with tritonclient's.

tritonclient registers the same proto names (package `inference`) in protobuf's default
pool, so its side runs in a child process and reports descriptors and bytes as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.json_format import MessageToDict

from service._proto.inference import grpc_service_pb2 as ours
from tests.conftest import REPO

TRITON_SIDE = """
import json, sys
from tritonclient.grpc import service_pb2 as triton

def fields(descriptor, prefix=""):
    name = prefix + descriptor.name
    out = {name: {f.name: [f.number, f.type, f.is_repeated] for f in descriptor.fields}}
    for child in descriptor.nested_types:
        out.update(fields(child, name + "."))
    return out

messages = {}
for message in triton.DESCRIPTOR.message_types_by_name.values():
    messages.update(fields(message))
service = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
           for m in service.methods}
request = triton.ModelInferRequest(model_name="fashion", model_version="2", id="abc")
request.parameters["priority"].int64_param = 3
tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[2, 1, 28, 28])
tensor.contents.uint_contents.extend([1, 2, 3])
request.outputs.add(name="probabilities")
request.raw_input_contents.append(bytes(range(16)))
if len(sys.argv) > 1:
    echoed = triton.ModelInferRequest.FromString(bytes.fromhex(sys.argv[1]))
    print(json.dumps({"equal": echoed == request}))
else:
    print(json.dumps({"messages": messages, "methods": methods, "request": request.SerializeToString().hex()}))
"""


def _triton(*args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", TRITON_SIDE, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def triton() -> dict[str, Any]:
    return _triton()


def test_generated_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _messages(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, Descriptor]]:
    name = f"{prefix}{descriptor.name}"
    nested = [m for child in descriptor.nested_types if not child.GetOptions().map_entry
              for m in _messages(child, f"{name}.")]
    return [(name, descriptor), *nested]


def test_every_field_matches_triton(triton: dict[str, Any]) -> None:
    checked = 0
    for top in ours.DESCRIPTOR.message_types_by_name.values():
        for name, descriptor in _messages(top):
            theirs = triton["messages"][name]
            for field in descriptor.fields:
                assert field.name in theirs, f"{name}.{field.name} is not in Triton's protocol"
                ours_field = [field.number, field.type, field.is_repeated]
                assert ours_field == theirs[field.name], f"{name}.{field.name} differs"
                checked += 1
    assert checked > 80


def test_service_methods_match_triton(triton: dict[str, Any]) -> None:
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert len(service.methods) == 11
    for method in service.methods:
        assert [method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming] == triton["methods"][method.name]


def test_an_infer_request_round_trips_both_ways(triton: dict[str, Any]) -> None:
    decoded = ours.ModelInferRequest.FromString(bytes.fromhex(triton["request"]))
    assert decoded.model_name == "fashion" and decoded.id == "abc"
    assert decoded.parameters["priority"].int64_param == 3
    assert list(decoded.inputs[0].shape) == [2, 1, 28, 28]
    assert list(decoded.inputs[0].contents.uint_contents) == [1, 2, 3]
    assert decoded.outputs[0].name == "probabilities" and decoded.raw_input_contents[0] == bytes(range(16))
    assert MessageToDict(ours.ModelInferRequest.FromString(decoded.SerializeToString())) == MessageToDict(decoded)
    assert _triton(decoded.SerializeToString().hex())["equal"]
