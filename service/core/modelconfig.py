"""A served version's configuration in the form of Triton's `ModelConfig`: the values it really serves with
(its config.json's over the server's flags, `service.core.modelsettings`).

Triton's tools start with this call (perf_analyzer and model_analyzer read the batch size, the
tensors, the batching and the instances from it). It is built here once as the JSON object
Triton's HTTP endpoint answers (`/v2/models/{name}/config`: proto field names, enum names,
numbers as numbers); the gRPC servicer parses the same object into the `ModelConfig` message,
so the two transports cannot disagree.

A load request may send the configuration back (`load_model(name, config=...)`, as model_analyzer
does after changing it): `unchanged` keeps its version policy and drops every other field that
says what the server already does, so that a round trip loads; a field that asks for something
else is refused by name (batching and instances are set in the ensemble's config.json, tensors
by its export).

Dims leave out the batch dimension (max_batch_size > 0); an output with one value per image is
Triton's `dims: [1]` with `reshape: {shape: []}`. valley's own settings (members, cascade,
precision, temperature, class names) go in `parameters`, as string values.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from artefact.config import BACKEND, CONFIG_FILE, PLATFORM
from artefact.manifest import TensorSpec
from artefact.policy import VersionPolicy
from service._proto.inference import model_config_pb2 as config_pb
from service.core.ensemble import CUDA, graphs
from service.core.served import ServedModel
from service.errors import InvalidInput

FORMATS = {3: "FORMAT_NCHW"}
"""The input's format by its rank without the batch: images are [C, H, W]."""


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    dims = spec.shape[1:]
    tensor: dict[str, Any] = {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": dims or [1]}
    if not dims:
        tensor["reshape"] = {"shape": []}
    return tensor


def _version_policy(policy: VersionPolicy) -> dict[str, Any]:
    if policy.kind == "latest":
        return {"latest": {"num_versions": policy.count}}
    if policy.kind == "all":
        return {"all": {}}
    return {"specific": {"versions": list(policy.versions)}}


def model_config(model: ServedModel, outputs: list[TensorSpec], policy: VersionPolicy,
                 parameters: dict[str, str]) -> dict[str, Any]:
    """The configuration of `model` serving `outputs` under `policy`, with valley's `parameters` (metadata's)."""
    ensemble, batcher, options = model.ensemble, model.batcher, model.options
    manifest = ensemble.manifest
    on_gpu = ensemble.providers[0] == CUDA
    image = _tensor(manifest.input)
    if len(image["dims"]) in FORMATS:
        image["format"] = FORMATS[len(image["dims"])]
    queue_policy: dict[str, Any] = {"timeout_action": "REJECT", "max_queue_size": batcher.max_queue_size,
                                    "allow_timeout_override": True}
    if batcher.max_queue_wait is not None:
        queue_policy["default_timeout_microseconds"] = round(batcher.max_queue_wait * 1e6)
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": _version_policy(policy),
        "max_batch_size": batcher.max_batch_size,
        "input": [image],
        "output": [_tensor(spec) for spec in outputs],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(batcher.max_queue_delay * 1e6),
            "preferred_batch_size": list(options.preferred_batch_sizes) or [batcher.max_batch_size],
            "default_queue_policy": queue_policy,
        },
        "instance_group": [{"name": f"{model.name}_0", "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                            "count": len(model.instances), **({"gpus": [0]} if on_gpu else {})}],
        "default_model_filename": graphs(manifest, ensemble.precision)[1].file,
        "parameters": {key: {"string_value": value} for key, value in
                       {**parameters, "classes": json.dumps(manifest.classes),
                        "temperature": f"{manifest.temperature:g}", "method": manifest.method,
                        "execution": ensemble.execution, "session_threads": str(options.session_threads),
                        "degrade_queue_ms": f"{(options.degrade_after or 0) * 1e3:g}",
                        "calibration_window": str(options.calibration_window),
                        "drift_window": str(options.drift_window)}.items()},
        "model_transaction_policy": {"decoupled": False},
    }


def _message(field: str, value: Any) -> Message | None:
    """`{field: value}` as a ModelConfig message; None when it is not one (a wrong type, an unknown enum name)."""
    try:
        return json_format.ParseDict({field: value}, config_pb.ModelConfig())
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        return None


def unchanged(posted: dict[str, Any], current: dict[str, Any], name: str) -> dict[str, Any]:
    """`posted` (a load's config) reduced to its version policy, once every other field is found to say what
    `current` (the served configuration; {} when nothing serves) says, in Triton's JSON or protobuf's (int64 as
    strings); `InvalidInput` names the fields that ask for something else."""
    known = config_pb.ModelConfig.DESCRIPTOR.fields_by_name
    changed = []
    for field, value in posted.items():
        if field == "version_policy":
            continue
        if field not in known:
            if value not in (None, "", 0, False, [], {}):
                changed.append(field)
            continue
        theirs = _message(field, value)
        if theirs is None or field not in current or theirs != _message(field, current[field]):
            changed.append(field)
    if changed:
        listed = ", ".join(changed)[:200]
        raise InvalidInput(f"the config parameter asks {name!r} for other {listed} than it serves with: a load sets "
                           f"only version_policy; batching, instances and valley's settings are set in "
                           f"{name}/{CONFIG_FILE} (docs/serving.md), tensors by the export")
    return {"version_policy": posted["version_policy"]} if "version_policy" in posted else {}
