"""The generated code is fresh, and our protocol is wire-compatible with tritonclient's.

Both live in one process: our descriptors are in a private pool (protos/generate.py), so
tritonclient's copies of the same names in protobuf's default pool do not collide.
"""

from __future__ import annotations

import subprocess
import sys

from google.protobuf.descriptor import Descriptor
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton

from service._proto.inference import grpc_service_pb2 as ours
from service._proto.inference import model_config_pb2 as ours_config
from tests.conftest import REPO


def test_generated_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _messages(descriptor: Descriptor, prefix: str = "") -> list[tuple[str, Descriptor]]:
    name = f"{prefix}{descriptor.name}"
    nested = [m for child in descriptor.nested_types if not child.GetOptions().map_entry
              for m in _messages(child, f"{name}.")]
    return [(name, descriptor), *nested]


def test_our_descriptors_stay_out_of_the_default_pool() -> None:
    assert ours.ModelInferRequest.DESCRIPTOR is not triton.ModelInferRequest.DESCRIPTOR
    assert ours.ModelInferRequest.DESCRIPTOR.file.pool is not triton.ModelInferRequest.DESCRIPTOR.file.pool


# valley's additions to Triton's messages: fields Triton does not have, at numbers it does not use.
ADDITIONS = {("ModelMetadataResponse", "parameters")}


def test_every_field_matches_triton() -> None:
    theirs = dict(_message for module in (triton, triton_config)
                  for top in module.DESCRIPTOR.message_types_by_name.values() for _message in _messages(top))
    checked = 0
    for top in (top for module in (ours, ours_config) for top in module.DESCRIPTOR.message_types_by_name.values()):
        for name, descriptor in _messages(top):
            assert name in theirs, f"{name} is not in Triton's protocol"
            for field in descriptor.fields:
                if (name, field.name) in ADDITIONS:
                    assert field.name not in theirs[name].fields_by_name, f"{name}.{field.name} is Triton's now"
                    assert field.number not in theirs[name].fields_by_number, f"{name}.{field.name}'s number is taken"
                    continue
                assert field.name in theirs[name].fields_by_name, f"{name}.{field.name} is not in Triton's protocol"
                other = theirs[name].fields_by_name[field.name]
                assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), \
                    f"{name}.{field.name} differs"
                checked += 1
    assert checked > 130


def test_service_methods_match_triton() -> None:
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert len(service.methods) == 12
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name, method.client_streaming,
                method.server_streaming) == (other.input_type.full_name, other.output_type.full_name,
                                             other.client_streaming, other.server_streaming)


def test_an_infer_request_round_trips_both_ways() -> None:
    request = triton.ModelInferRequest(model_name="fashion", model_version="2", id="abc")
    request.parameters["priority"].int64_param = 3
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[2, 1, 28, 28])
    tensor.contents.uint_contents.extend([1, 2, 3])
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(bytes(range(16)))

    decoded = ours.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.model_name == "fashion" and decoded.id == "abc"
    assert decoded.parameters["priority"].int64_param == 3
    assert list(decoded.inputs[0].shape) == [2, 1, 28, 28]
    assert list(decoded.inputs[0].contents.uint_contents) == [1, 2, 3]
    assert decoded.outputs[0].name == "probabilities" and decoded.raw_input_contents[0] == bytes(range(16))
    assert MessageToDict(ours.ModelInferRequest.FromString(decoded.SerializeToString())) == MessageToDict(decoded)
    assert triton.ModelInferRequest.FromString(decoded.SerializeToString()) == request


def test_tritonclient_reads_metadata_with_our_parameters() -> None:
    """Clients compiled from Triton's proto skip the metadata's parameters and read the rest."""
    ours_metadata = ours.ModelMetadataResponse(name="fashion", versions=["1"], platform="valley_ensemble")
    ours_metadata.parameters["members_default"].string_param = "cascade"
    theirs = triton.ModelMetadataResponse.FromString(ours_metadata.SerializeToString())
    assert (theirs.name, list(theirs.versions), theirs.platform) == ("fashion", ["1"], "valley_ensemble")


def test_model_config_enums_match_triton() -> None:
    for name, enum in ours_config.DESCRIPTOR.enum_types_by_name.items():
        assert {v.name: v.number for v in enum.values} == \
            {v.name: v.number for v in triton_config.DESCRIPTOR.enum_types_by_name[name].values}
    for message in ("ModelInstanceGroup", "ModelInput", "ModelQueuePolicy"):
        for enum in ours_config.DESCRIPTOR.message_types_by_name[message].enum_types:
            other = triton_config.DESCRIPTOR.message_types_by_name[message].enum_types_by_name[enum.name]
            assert {v.name: v.number for v in enum.values} == {v.name: v.number for v in other.values}
