"""Classifiers valley never trained, as ONNX graphs: checked against the dataset, adapted to take pixels, fused.

`valley-train export --onnx a.onnx b.onnx ...` packages graphs exported elsewhere (by
`torch.onnx.export` or any other tool) as a standard ensemble artefact. Each graph must take one
NCHW image tensor (float32, or uint8 pixels) with a dynamic batch and give one [N, classes] tensor
of logits or probabilities; shapes that do not fit the dataset are refused with the reason. A
member graph of the artefact wraps each one so that it takes the uint8 pixels every valley graph
takes: the pixels are scaled to [0, 1] and, where the graph expects normalised floats, normalised
with the given mean and std; probabilities are turned into logits (their log: a tempered softmax of
log p is p^(1/T), renormalised). The fused graph runs every member and the ensemble outputs of
`training.export.graphs.ensemble_outputs_of`, composed in ONNX (the members' names prefixed,
their logits stacked), its temperature kept in the initializer recalibration rewrites.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from artefact.manifest import OUTPUTS
from training.errors import UsageError
from training.export.graphs import INPUT_NAME, ensemble_outputs_of

Outputs = Literal["logits", "probabilities"]
PROBABILITY_FLOOR = 1e-12
"""Probabilities below this become this before their log: a zero probability must not give -inf logits."""
TEMPERATURE = "temperature"
"""The fused graph's temperature initializer, by the name recalibration looks for."""


@dataclass(frozen=True)
class ExternalGraph:
    """An ONNX classifier from elsewhere, inspected: what it takes and what it gives."""

    path: Path
    input_name: str
    input_type: Literal["float", "uint8"]
    output_name: str
    opset: int


def _dims(value_info: Any) -> list[int | str | None]:
    """A tensor's dimensions: a number, a symbolic name, or None where unknown."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in shape.dim]


def inspect_graph(path: Path, channels: int, size: int, classes: int) -> ExternalGraph:
    """`path` checked against images of `channels` x `size` x `size` and `classes` classes; `UsageError` with the
    reason where it does not fit."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises several types for a file that is not a valid graph
        raise UsageError(f"--onnx {path} is not a valid ONNX model: {str(error).splitlines()[0][:200]}") from error
    graph = model.graph
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1:
        raise UsageError(f"--onnx {path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a "
                         "classifier here takes one image tensor")
    image = inputs[0]
    element = image.type.tensor_type.elem_type
    types: dict[int, Literal["float", "uint8"]] = {onnx.TensorProto.FLOAT: "float", onnx.TensorProto.UINT8: "uint8"}
    if element not in types:
        raise UsageError(f"--onnx {path}: input {image.name!r} is {onnx.TensorProto.DataType.Name(element)}; float32 "
                         "images or uint8 pixels are taken")
    dims, wanted = _dims(image), [channels, size, size]
    expected = f"[N, {channels}, {size}, {size}] (the dataset's images)"
    if len(dims) != 4 or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], wanted, strict=True)):
        raise UsageError(f"--onnx {path}: input {image.name!r} is {_shown(dims)}, not {expected}")
    if isinstance(dims[0], int) and dims[0] != 0:
        raise UsageError(f"--onnx {path}: input {image.name!r} has a fixed batch of {dims[0]}; export it with a "
                         "dynamic batch axis (torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}))")
    if not graph.output:
        raise UsageError(f"--onnx {path} has no output")
    output = graph.output[0]
    out = _dims(output)
    if len(out) != 2 or (isinstance(out[1], int) and out[1] != classes):
        raise UsageError(f"--onnx {path}: output {output.name!r} is {_shown(out)}, not [N, {classes}] (one score per "
                         "class of the dataset)")
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    return ExternalGraph(path, image.name, types[element], output.name, opset)


def _shown(dims: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def check_compatible(graphs: Sequence[ExternalGraph]) -> None:
    """Members of one ensemble take the same kind of input."""
    kinds = {graph.input_type for graph in graphs}
    if len(kinds) > 1:
        described = ", ".join(f"{graph.path.name}: {graph.input_type}" for graph in graphs)
        raise UsageError(f"the --onnx graphs take different inputs ({described}): an ensemble's members take the "
                         "same pixels")


def _constant(name: str, values: Sequence[float], shape: Sequence[int]) -> Any:
    import onnx

    return onnx.numpy_helper.from_array(np.asarray(values, dtype=np.float32).reshape(shape), name)


def adapted_graph(graph: ExternalGraph, outputs: Outputs, mean: Sequence[float] | None, std: Sequence[float] | None,
                  channels: int, size: int, target: Path) -> None:
    """Write `graph` wrapped to take uint8 `pixels` [N, C, H, W] and give `logits` [N, classes]."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.compose.add_prefix(onnx.load(str(graph.path)), "net_")
    before: list[Any] = []  # pixels to the graph's input
    after: list[Any] = []  # the graph's output to logits
    initializers = []
    source = f"net_{graph.input_name}"
    if graph.input_type == "uint8":
        if mean is not None or std is not None:
            raise UsageError(f"--onnx {graph.path} takes uint8 pixels: --input-mean and --input-std apply to graphs "
                             "that take float images")
        before.append(helper.make_node("Identity", [INPUT_NAME], [source]))
    else:
        initializers.append(_constant("adapter_scale", [1 / 255.0], []))
        normalised = mean is not None and std is not None
        before += [helper.make_node("Cast", [INPUT_NAME], ["adapter_float"], to=TensorProto.FLOAT),
                   helper.make_node("Mul", ["adapter_float", "adapter_scale"],
                                    ["adapter_scaled" if normalised else source])]
        if mean is not None and std is not None:
            initializers += [_constant("adapter_mean", mean, [1, channels, 1, 1]),
                             _constant("adapter_std", std, [1, channels, 1, 1])]
            before += [helper.make_node("Sub", ["adapter_scaled", "adapter_mean"], ["adapter_centred"]),
                       helper.make_node("Div", ["adapter_centred", "adapter_std"], [source])]
    result = f"net_{graph.output_name}"
    if outputs == "probabilities":
        initializers.append(_constant("adapter_floor", [PROBABILITY_FLOOR], []))
        after += [helper.make_node("Max", [result, "adapter_floor"], ["adapter_floored"]),
                  helper.make_node("Log", ["adapter_floored"], ["logits"])]
    else:
        after.append(helper.make_node("Identity", [result], ["logits"]))
    inner = model.graph
    pixels = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", channels, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])
    adapted = helper.make_graph([*before, *inner.node, *after], "member", [pixels], [logits],
                                initializer=[*inner.initializer, *initializers], value_info=inner.value_info)
    wrapped = helper.make_model(adapted, opset_imports=model.opset_import, ir_version=model.ir_version)
    wrapped.functions.extend(model.functions)
    onnx.checker.check_model(wrapped, full_check=True)
    onnx.save(wrapped, str(target))


class _Head(nn.Module):
    """The ensemble outputs of stacked member logits [B, K, C], at a temperature."""

    temperature: torch.Tensor

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.register_buffer(TEMPERATURE, torch.tensor(temperature, dtype=torch.float32))

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ensemble_outputs_of(logits, self.temperature)


def fused_graph(members: Sequence[Path], classes: int, temperature: float, target: Path) -> None:
    """Compose the member graphs (pixels -> logits) and the ensemble head into one graph with `OUTPUTS`."""
    import onnx
    from onnx import helper

    with tempfile.TemporaryDirectory() as folder:
        head_path = Path(folder) / "head.onnx"
        example = torch.zeros(2, len(members), classes)
        batch = torch.export.Dim("batch", min=1, max=65536)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Head(temperature).eval(), (example,), str(head_path), input_names=["logits"],
                              output_names=list(OUTPUTS), dynamo=True, dynamic_shapes={"logits": {0: batch}},
                              external_data=False, verbose=False)
        head = onnx.load(str(head_path))
    opset = max([_opset(head), *(_opset(onnx.load(str(path))) for path in members)])
    parts = [_at_opset(onnx.load(str(path)), opset) for path in members]
    head = onnx.compose.add_prefix(_at_opset(head, opset), "head_")
    nodes: list[Any] = []
    initializers: list[Any] = []
    value_info: list[Any] = []
    functions: list[Any] = []
    stacked = []
    for index, part in enumerate(parts):
        prefixed = onnx.compose.add_prefix(part, f"m{index}_")
        nodes += [helper.make_node("Identity", [INPUT_NAME], [f"m{index}_{INPUT_NAME}"]), *prefixed.graph.node,
                  helper.make_node("Unsqueeze", [f"m{index}_logits", "fused_axis"], [f"m{index}_stacked"])]
        initializers += prefixed.graph.initializer
        value_info += prefixed.graph.value_info
        functions += prefixed.functions
        stacked.append(f"m{index}_stacked")
    initializers.append(onnx.numpy_helper.from_array(np.asarray([1], dtype=np.int64), "fused_axis"))
    nodes += [helper.make_node("Concat", stacked, ["head_logits"], axis=1)]
    renamed = {f"head_{TEMPERATURE}": TEMPERATURE}
    for node in head.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for initializer in head.graph.initializer:
        initializer.name = renamed.get(initializer.name, initializer.name)
    nodes += head.graph.node
    nodes += [helper.make_node("Identity", [f"head_{name}"], [name]) for name in OUTPUTS]
    initializers += head.graph.initializer
    value_info += head.graph.value_info
    functions += head.functions
    pixels = next(value for value in parts[0].graph.input if value.name == INPUT_NAME)
    outputs = []
    for output in head.graph.output:
        copied = onnx.ValueInfoProto()
        copied.CopyFrom(output)
        copied.name = output.name.removeprefix("head_")
        outputs.append(copied)
    graph = helper.make_graph(nodes, "ensemble", [pixels], outputs, initializer=initializers, value_info=value_info)
    imports = {entry.domain: entry for part in [*parts, head] for entry in part.opset_import}
    model = helper.make_model(graph, opset_imports=list(imports.values()),
                              ir_version=max(part.ir_version for part in [*parts, head]))
    model.functions.extend(functions)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))


def _opset(model: Any) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _at_opset(model: Any, opset: int) -> Any:
    """`model` converted to `opset` of the default domain (a newer one: onnx's version converter)."""
    import onnx

    if _opset(model) == opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises RuntimeError and others for operators it cannot move
        raise UsageError(f"an ONNX graph of opset {_opset(model)} cannot be converted to opset {opset} to fuse it "
                         f"with the others ({str(error).splitlines()[0][:160]}): export it at opset {opset}"
                         ) from error
