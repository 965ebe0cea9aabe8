"""Lower-precision variants of an exported ensemble: INT8 and FP16 graphs, measured by running them on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from pydantic import ValidationError

import training.export as export_module
from artefact.manifest import ManifestError, load_manifest, verify_files
from tests.conftest import cli
from training.calibrate import tempered_ensemble_probabilities
from training.config import ExportConfig, Precision
from training.data import DataSplits, ImageTensors, load_data
from training.errors import UsageError
from training.export import export_ensemble
from training.metrics import classification_metrics
from training.quantize import ensemble_tail, lower_precision, measuring_session
from training.runs import RunDir

NLL_TOLERANCE, ACCURACY_TOLERANCE = 0.02, 0.005  # the export's defaults
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@pytest.fixture(scope="module")
def fashion_fge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-member FGE run of the small CNN on 2000 Fashion-MNIST images (of each split): real images, seconds."""
    runs = tmp_path_factory.mktemp("fashion")
    cli("train", "--dataset", "fashion-mnist", "--subset", "2000", "--epochs", "3", "--seed", "0", "--out",
        runs / "base")
    cli("fge", "--from", runs / "base", "--cycles", "3", "--cycle-epochs", "1", "--lr1", "0.02", "--lr2", "0.002",
        "--out", runs / "fge")
    return runs / "fge"


@pytest.fixture(scope="module")
def exported(fashion_fge: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fashion_fge` exported with INT8 and FP16 variants through the CLI; returns the version directory."""
    repository = tmp_path_factory.mktemp("repository")
    result = cli("export", "--from", fashion_fge, "--name", "fashion", "--out", repository,
                 "--precision", "int8", "--precision", "fp16", "--precision", "int8")
    report = json.loads(result.stdout)
    assert [variant["precision"] for variant in report["variants"]] == ["int8", "fp16"]
    return repository / "fashion" / "1"


@pytest.fixture(scope="module")
def splits(fashion_fge: Path) -> DataSplits:
    return load_data(RunDir(fashion_fge).read_config().data)


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pixels_and_labels(splits: DataSplits, split: str) -> tuple[np.ndarray, np.ndarray]:
    data = getattr(splits, split)
    assert isinstance(data, ImageTensors)
    return data.images.numpy(), data.labels.numpy()


def _members_ensemble(version: Path, files: list[str], pixels: np.ndarray, temperature: float,
                      precision: Precision | None = None) -> np.ndarray:
    """The tempered ensemble of member graphs run by onnxruntime: probabilities [N, C]."""
    logits = np.stack([measuring_session(version / file, precision).run(None, {"pixels": pixels})[0]
                       for file in files])
    return tempered_ensemble_probabilities(logits.astype(np.float64), temperature)


def test_variants_are_in_the_manifest_and_their_files_verified(exported: Path, tmp_path: Path) -> None:
    manifest = load_manifest(exported)
    int8, fp16 = manifest.variant("int8"), manifest.variant("fp16")
    assert int8 is not None and fp16 is not None and [v.precision for v in manifest.variants] == ["int8", "fp16"]
    assert [entry.file for entry in int8.members] == ["member-00.int8.onnx", "member-01.int8.onnx",
                                                      "member-02.int8.onnx"]
    assert int8.fused.file == "ensemble.int8.onnx" and fp16.fused.file == "ensemble.fp16.onnx"
    assert "QDQ" in int8.method and "float16" in fp16.method
    verify_files(manifest, exported)

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "ensemble.int8.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match=r"ensemble\.int8\.onnx has sha256"):
        verify_files(load_manifest(copy), copy)
    shutil.copy(exported / "ensemble.int8.onnx", copy)
    (copy / "member-02.fp16.onnx").unlink()
    with pytest.raises(ManifestError, match=r"member-02\.fp16\.onnx is named in the manifest but missing"):
        verify_files(load_manifest(copy), copy)


def test_int8_graphs_are_quantized_and_fp16_graphs_halved(exported: Path) -> None:
    manifest = load_manifest(exported)
    for precision, weight_type in (("int8", onnx.TensorProto.INT8), ("fp16", onnx.TensorProto.FLOAT16)):
        variant = manifest.variant(precision)
        assert variant is not None
        for entry in (*variant.members, variant.fused):
            model = onnx.load(str(exported / entry.file))
            weight_types = {initializer.data_type for initializer in model.graph.initializer}
            assert weight_type in weight_types, f"{entry.file} holds no {precision} weights"
            if precision == "int8":
                assert QUANTIZED_OPS & {node.op_type for node in model.graph.node}, f"{entry.file} is not quantized"
            session = _session(exported / entry.file)
            assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
            assert {o.type for o in session.get_outputs()} <= {"tensor(float)", "tensor(int64)"}
        fused_outputs = [output.name for output in _session(exported / variant.fused.file).get_outputs()]
        assert fused_outputs == [output.name for output in manifest.outputs]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_variant_keeps_its_tolerance_on_real_images(exported: Path, splits: DataSplits, precision: Precision) -> None:
    """The variant's graphs, run on the validation and test images, score within the tolerance of the FP32 graphs,
    and the manifest records what running them measures."""
    manifest = load_manifest(exported)
    variant = manifest.variant(precision)
    assert variant is not None
    for split, recorded in (("val", variant.validation), ("test", variant.test)):
        pixels, labels = _pixels_and_labels(splits, split)
        fp32 = classification_metrics(_members_ensemble(exported, [m.file for m in manifest.members], pixels,
                                                        manifest.temperature), labels)
        members = classification_metrics(_members_ensemble(exported, [m.file for m in variant.members], pixels,
                                                           manifest.temperature, precision), labels)
        # The fused graph as measured and (the same for INT8) as the CPU provider runs the file.
        fused = [classification_metrics(session.run(["probabilities"], {"pixels": pixels})[0], labels)
                 for session in (measuring_session(exported / variant.fused.file, precision),
                                 _session(exported / variant.fused.file))]
        for measured in (members, *fused):
            assert measured.nll <= fp32.nll * (1 + NLL_TOLERANCE), f"{precision} {split}: {measured} vs {fp32}"
            assert measured.accuracy >= fp32.accuracy - ACCURACY_TOLERANCE, f"{precision} {split}: {measured}"
        assert members.nll == pytest.approx(recorded.nll, rel=1e-4)
        assert members.accuracy == recorded.accuracy and members.count == recorded.count == len(labels)
    assert manifest.metrics.calibrated.nll == pytest.approx(fp32.nll, rel=1e-4), "FP32 test figures as recorded"


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_variant_reproduces_the_samples_within_its_tolerance(exported: Path, precision: Precision) -> None:
    manifest = load_manifest(exported)
    variant = manifest.variant(precision)
    assert variant is not None
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    fused = exported / variant.fused.file
    for session in (measuring_session(fused, precision), _session(fused)):
        replayed = session.run(["probabilities"], {"pixels": pixels})[0]
        assert np.max(np.abs(replayed - np.asarray(manifest.samples.probabilities))) <= variant.samples_tolerance
    assert variant.samples_tolerance >= 1e-3


def test_fp16_is_measured_with_fp16_activations(exported: Path, splits: DataSplits) -> None:
    """The CPU provider runs an FP16 graph's ops in FP32 (only the weights are rounded); the measurement also rounds
    every tensor between nodes to FP16, which moves the logits further, but not far."""
    manifest = load_manifest(exported)
    variant = manifest.variant("fp16")
    assert variant is not None
    pixels, _ = _pixels_and_labels(splits, "val")
    fp32 = _session(exported / manifest.members[0].file).run(None, {"pixels": pixels})[0]
    weights_only = _session(exported / variant.members[0].file).run(None, {"pixels": pixels})[0]
    measured = measuring_session(exported / variant.members[0].file, "fp16").run(None, {"pixels": pixels})[0]
    assert 0 < np.max(np.abs(measured - weights_only)) < 0.1
    assert 0 < np.max(np.abs(measured - fp32)) < 0.2


def test_the_ensemble_tail_stays_fp32(exported: Path) -> None:
    """Only the members run at the lower precision: the fused graphs' softmax and everything after it are FP32."""
    for variant in load_manifest(exported).variants:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(exported / variant.fused.file)))
        types = {info.name: info.type.tensor_type.elem_type for info in (*model.graph.value_info, *model.graph.output)}
        types |= {initializer.name: initializer.data_type for initializer in model.graph.initializer}
        tail = [node for node in model.graph.node if node.name in ensemble_tail(model)]
        assert "Softmax" in {node.op_type for node in tail}
        assert not {node.op_type for node in tail} & QUANTIZED_OPS, variant.precision
        tensors = {name for node in tail for name in (*node.input, *node.output) if name in types}
        assert {types[name] for name in tensors} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                     onnx.TensorProto.BOOL}, variant.precision


def test_a_variant_missing_its_tolerance_fails_the_export(fashion_fge: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrated on blank images, INT8 ranges clip real ones: the export refuses the variant and writes nothing."""

    def blank_calibration(precision: Precision, source: Path, target: Path, calibration: np.ndarray) -> None:
        lower_precision(precision, source, target, np.zeros_like(calibration))

    monkeypatch.setattr(export_module, "lower_precision", blank_calibration)
    with pytest.raises(UsageError, match=r"int8 ensemble misses its tolerance on the validation split.*"
                                         r"--variant-nll-tolerance"):
        export_ensemble(ExportConfig(runs=[fashion_fge], name="fashion", repository=tmp_path, precisions=["int8"]))
    assert list((tmp_path / "fashion").iterdir()) == []


def test_precisions_are_asked_for_once_and_none_by_default(fashion_fge: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="each precision once"):
        ExportConfig(runs=[fashion_fge], name="x", repository=tmp_path, precisions=["fp16", "fp16"])
    assert ExportConfig(runs=[fashion_fge], name="x", repository=tmp_path).precisions == []
    with pytest.raises(ValidationError):
        ExportConfig(runs=[fashion_fge], name="x", repository=tmp_path, precisions=["int4"])


def test_a_recalibrated_version_rewrites_every_precisions_fused_graph(exported: Path, tmp_path: Path) -> None:
    """Recalibration's publication on a real export with variants: each fused graph carries the new temperature in
    its own precision, and each precision loads (its samples check the rewritten graph)."""
    from onnx import numpy_helper

    from service.ensemble import load_ensemble
    from service.recalibrate import TEMPERATURE_INITIALIZER, Suggestion, publish

    parent = tmp_path / "fashion" / "1"
    shutil.copytree(exported, parent)
    temperature = 1.7 * load_manifest(parent).temperature
    live = {"nll": 1.0, "ece": 0.1, "accuracy": 0.8}
    published = publish(parent, temperature, Suggestion(500, load_manifest(parent).temperature, temperature, live,
                                                        live), live, caller="operator")
    assert published == tmp_path / "fashion" / "2" and not list((tmp_path / "fashion").glob(".*"))
    manifest = load_manifest(published)
    verify_files(manifest, published)
    assert manifest.version == 2 and manifest.temperature == temperature
    assert manifest.recalibration is not None and manifest.recalibration.created_by == "operator"
    for entry, dtype in ((manifest.fused, np.float32), *((v.fused, {"int8": np.float32, "fp16": np.float16}[
            v.precision]) for v in manifest.variants)):
        graph = onnx.load(str(published / entry.file))
        value = [numpy_helper.to_array(t) for t in graph.graph.initializer if t.name == TEMPERATURE_INITIALIZER]
        assert len(value) == 1 and value[0].dtype == dtype
        assert float(value[0]) == pytest.approx(temperature, rel=1e-3)
    for precision in ("fp32", "int8"):  # FP16 graphs load on the CUDA provider only
        ensemble = load_ensemble(published, device="cpu", precision=precision)
        assert ensemble.manifest.version == 2
