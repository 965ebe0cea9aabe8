"""Lower-precision copies of exported ONNX graphs: INT8 (static quantization calibrated on real images) and FP16.

A copy keeps its source's interface: the same uint8 pixel input and FP32 outputs with the same names. In a fused
ensemble graph only the members run at the lower precision; the tail after them (tempered softmax, mean, entropy
and the other uncertainty outputs) stays FP32, because rounding there moves probabilities near 0 and 1, where NLL
and entropy are most sensitive, and saves next to nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from artefact.manifest import QuantizationScheme
from training.config import Precision

CALIBRATION_BATCH = 64


def describe_int8(scheme: QuantizationScheme, images: int) -> str:
    """The scheme in words, for the variant's `method`."""
    weights = "per-channel" if scheme.per_channel else "per-tensor"
    bits = "" if scheme.weight_bits == 8 else f", reduced to {scheme.weight_bits} bits"
    return (f"onnxruntime static quantization, {scheme.format.upper()} format: {scheme.weights} weights ({weights}"
            f"{bits}), {scheme.activations} activations calibrated ({scheme.calibration}) on {images} validation "
            "images; the members' logits layers and the ensemble tail stay FP32")


# Measured on Fashion-MNIST FGE ensembles (docs/training.md), on CPUs with and without VNNI: weights in 7 bits
# (onnxruntime's reduce_range) keep every sum of two u8 x s8 products inside 16 bits, so the graph computes the same
# on every x86 CPU (`artefact.cpu`), at the speed of 8-bit weights and within the default tolerances.
INT8_SCHEME = QuantizationScheme()

FP16_METHOD = ("onnxruntime.transformers float16 conversion: FP16 weights and activations, uint8 input and FP32 "
               "outputs kept; the ensemble tail stays FP32. Meant for the CUDA provider; measured on the CPU provider "
               "with every FP16 tensor between nodes rounded to FP16 (FP32 inside a node)")


def ensemble_tail(model: onnx.ModelProto) -> set[str]:
    """Names of the Softmax nodes and every node after them (a fused graph's ensemble outputs); empty for a member
    graph."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tail: set[str] = set()
    frontier = [node for node in model.graph.node if node.op_type == "Softmax"]
    while frontier:
        node = frontier.pop()
        if node.name in tail:
            continue
        tail.add(node.name)
        frontier.extend(consumer for output in node.output for consumer in consumers.get(output, []))
    return tail


def logits_path(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes computing the members' logits, the last Gemm, MatMul or Conv before the graph's outputs
    (a member graph) or before its Softmax (a fused graph), and of the ops that only move or scale values after
    them."""
    producers = {output: node for node in model.graph.node for output in node.output}
    passing = {"Add", "Concat", "Div", "Flatten", "Identity", "Mul", "Reshape", "Squeeze", "Unsqueeze"}
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    frontier = [name for node in softmaxes for name in node.input] or [output.name for output in model.graph.output]
    path: set[str] = set()
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in path or node.op_type not in {"Gemm", "MatMul", "Conv", *passing}:
            continue
        path.add(node.name)
        if node.op_type in passing:
            frontier.extend(node.input)
    return path


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every node named: quantization and FP16 conversion choose nodes by name."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    return model


def _pixel_batches(input_name: str, pixels: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(pixels), CALIBRATION_BATCH):
        yield {input_name: pixels[start:start + CALIBRATION_BATCH]}


def quantize_int8(source: Path, target: Path, calibration: np.ndarray,
                  scheme: QuantizationScheme = INT8_SCHEME) -> None:
    """Write `source` statically quantized to INT8 at `target`, its activation ranges measured on `calibration`
    (uint8 pixels [N, C, H, W], real images the graph's input takes)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, input_name: str) -> None:
            self.batches = _pixel_batches(input_name, calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    weight_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=target.parent) as scratch:
        # Shape inference and onnxruntime's basic graph optimisations first: the quantizer needs every tensor's
        # shape, and it quantizes the folded graph rather than the exporter's.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        model = _named(onnx.load(str(prepared)))
        onnx.save(model, str(prepared))
        # Logits in 8 bits would be steps of a tenth of a nat or more once divided by the temperature: the layers
        # computing them run in FP32 on dequantized inputs, as does the ensemble tail.
        excluded = sorted(ensemble_tail(model) | logits_path(model))
        quantize_static(
            str(prepared), str(target), Reader(model.graph.input[0].name),
            quant_format=formats[scheme.format], per_channel=scheme.per_channel, reduce_range=scheme.weight_bits == 7,
            activation_type=QuantType.QUInt8, weight_type=weight_types[scheme.weights], nodes_to_exclude=excluded,
            calibrate_method=methods[scheme.calibration],
        )
    onnx.checker.check_model(onnx.load(str(target)), full_check=True)


def convert_fp16(source: Path, target: Path) -> None:
    """Write `source` with FP16 weights and activations at `target`; the input and outputs keep their types, and
    a fused graph's ensemble tail stays FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _named(onnx.load(str(source)))
    tail_names = ensemble_tail(model)
    if not tail_names:
        converted = convert_float_to_float16(model, keep_io_types=True)
    else:
        # The converter's own block list would still round every tensor between blocked nodes to FP16 and back:
        # convert the graph without its tail instead (its outputs, the tail's inputs, stay FP32), then put the
        # untouched tail back.
        tail = [node for node in model.graph.node if node.name in tail_names]
        head = _without_tail(model, tail)
        converted = convert_float_to_float16(head, keep_io_types=True)
        converted.graph.node.extend(tail)
        converted.graph.initializer.extend(_tail_initializers(model, tail, converted))
        del converted.graph.output[:]
        converted.graph.output.extend(model.graph.output)
    onnx.checker.check_model(converted, full_check=True)
    onnx.save(converted, str(target))


def _without_tail(model: onnx.ModelProto, tail: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A copy of `model` without the `tail` nodes, whose outputs are the tensors the tail reads from the rest."""
    head = onnx.ModelProto()
    head.CopyFrom(model)
    tail_names = {node.name for node in tail}
    produced = {output for node in model.graph.node if node.name not in tail_names for output in node.output}
    boundary = list(dict.fromkeys(name for node in tail for name in node.input if name in produced))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {info.name: info for info in inferred.graph.value_info}
    del head.graph.node[:]
    head.graph.node.extend(node for node in model.graph.node if node.name not in tail_names)
    del head.graph.output[:]
    head.graph.output.extend(types[name] for name in boundary)
    # The converter infers the remaining graph's types itself; entries for the tail's tensors would mislead it.
    del head.graph.value_info[:]
    used = {name for node in head.graph.node for name in node.input}
    kept = [initializer for initializer in head.graph.initializer if initializer.name in used]
    del head.graph.initializer[:]
    head.graph.initializer.extend(kept)
    return head


def _tail_initializers(model: onnx.ModelProto, tail: list[onnx.NodeProto],
                       converted: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The FP32 initializers the tail reads that the converted graph lacks or holds at FP16 (given the tail their
    own copy, renamed)."""
    originals = {initializer.name: initializer for initializer in model.graph.initializer}
    present = {initializer.name: initializer for initializer in converted.graph.initializer}
    added: list[onnx.TensorProto] = []
    for node in tail:
        for index, name in enumerate(node.input):
            if name not in originals:
                continue
            if name not in present:
                added.append(originals[name])
                present[name] = originals[name]
            elif present[name].data_type != originals[name].data_type:
                copy = onnx.TensorProto()
                copy.CopyFrom(originals[name])
                copy.name = f"{name}_fp32"
                node.input[index] = copy.name
                if copy.name not in present:
                    added.append(copy)
                    present[copy.name] = copy
    return added


def fp16_storage_emulated(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an FP16 graph in which onnxruntime's CPU provider rounds every FP16 tensor between nodes to FP16,
    as a CUDA run does (`measuring_session` runs it).

    The CPU provider has no FP16 kernels for most ops: it runs them in FP32 and drops the casts between them, so a
    plain CPU run rounds only the weights. An Identity, which has an FP16 kernel, after every FP16 output keeps that
    tensor at FP16, as long as the graph optimisations that would remove the Identity are off.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    half = {info.name for info in inferred.graph.value_info
            if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    nodes: list[onnx.NodeProto] = []
    for node in inferred.graph.node:
        nodes.append(node)
        for index, output in enumerate(node.output):
            if output in half:
                node.output[index] = f"{output}_unrounded"
                nodes.append(onnx.helper.make_node("Identity", [node.output[index]], [output],
                                                   name=f"{output}_fp16_storage"))
    del inferred.graph.node[:]
    inferred.graph.node.extend(nodes)
    return inferred


def measuring_session(path: Path, precision: Precision | None = None) -> Any:
    """An onnxruntime CPU session measuring a graph at its precision: FP16 graphs with FP16 storage between nodes
    (`fp16_storage_emulated`), the others as a server runs them."""
    import onnxruntime

    if precision != "fp16":
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    emulated = fp16_storage_emulated(onnx.load(str(path))).SerializeToString()
    return onnxruntime.InferenceSession(emulated, options, providers=["CPUExecutionProvider"])


def lower_precision(precision: Precision, source: Path, target: Path, calibration: np.ndarray) -> None:
    """Write `source` at `precision` to `target`; `calibration` (uint8 pixels) sets INT8's activation ranges."""
    if precision == "int8":
        quantize_int8(source, target, calibration)
    else:
        convert_fp16(source, target)


def method_of(precision: Precision, calibration_images: int) -> str:
    """How a variant of `precision` is made, for the manifest."""
    return describe_int8(INT8_SCHEME, calibration_images) if precision == "int8" else FP16_METHOD
