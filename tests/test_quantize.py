"""Lower-precision variants of an exported ensemble: INT8 and FP16 graphs, measured by running them on real images."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from pydantic import ValidationError

import training.export.variants as export_module
from artefact.cpu import cpu_features, cpu_model
from artefact.manifest import ManifestError, load_manifest, verify_files
from artefact.metrics import classification_metrics
from training.calibrate import tempered_ensemble_probabilities
from training.config import ExportConfig, Precision
from training.data import DataSplits, ImageTensors, load_data
from training.errors import UsageError
from training.export.ensemble import export_ensemble
from training.quantize import INT8_SCHEME, ensemble_tail, lower_precision, measuring_session
from training.runs import RunDir

NLL_TOLERANCE, ACCURACY_TOLERANCE = 0.02, 0.005  # the export's defaults
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@pytest.fixture
def exported(fashion_variants: Path) -> Path:
    """`fashion_fge` exported with INT8 and FP16 variants (the version directory)."""
    return fashion_variants


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
                       for file in files], axis=1)
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

    from service.control.recalibrate import TEMPERATURE_INITIALIZER, Suggestion, publish
    from service.core.ensemble import load_ensemble

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


def test_the_variant_records_its_scheme_and_the_cpu_it_was_validated_on(exported: Path) -> None:
    manifest = load_manifest(exported)
    int8, fp16 = manifest.variant("int8"), manifest.variant("fp16")
    assert int8 is not None and fp16 is not None
    assert int8.scheme == INT8_SCHEME and int8.scheme.weight_bits == 7 and fp16.scheme is None
    for variant in (int8, fp16):
        assert variant.validated_on is not None
        assert variant.validated_on.cpu == cpu_model() and variant.validated_on.cpu_features == cpu_features()
        assert variant.validated_on.onnxruntime == onnxruntime.__version__
    assert "reduced to 7 bits" in int8.method


def test_a_variant_whose_samples_do_not_reproduce_is_refused_and_fp32_serves(
        unreproducible_int8: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Loaded at INT8, a variant that misses its samples' tolerance on this CPU is refused with a reason naming this
    CPU and the one it was validated on, and the FP32 graphs answer, exactly as the FP32 ensemble does."""
    from service.core.ensemble import load_ensemble

    manifest = load_manifest(unreproducible_int8)
    variant = manifest.variant("int8")
    assert variant is not None and variant.validated_on is not None
    with caplog.at_level(logging.WARNING, logger="service.core.ensemble"):
        ensemble = load_ensemble(unreproducible_int8, device="cpu", precision="int8")
    assert ensemble.precision == "fp32" and ensemble.requested_precision == "int8"
    assert ensemble.fallback is not None
    reason = ensemble.fallback.reason
    assert "int8 variant is refused" in reason and f"beyond its tolerance {variant.samples_tolerance:.3g}" in reason
    assert f"This CPU: {cpu_model()} ({' '.join(cpu_features()) or 'no features listed'}" in reason
    assert f"Validated on: {variant.validated_on.cpu}" in reason and "--precision fp32" in reason
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [reason]
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    fp32 = load_ensemble(unreproducible_int8, device="cpu")
    np.testing.assert_array_equal(ensemble.infer(pixels, ["probabilities"])["probabilities"],
                                  fp32.infer(pixels, ["probabilities"])["probabilities"])
    assert ensemble.another_instance().fallback == ensemble.fallback
    # The variant really misses: run alone, its graphs are far from the samples.
    blank = measuring_session(unreproducible_int8 / variant.fused.file).run(["probabilities"], {"pixels": pixels})[0]
    assert np.max(np.abs(blank - np.asarray(manifest.samples.probabilities))) > variant.samples_tolerance


_RUN_GRAPHS = """
import sys
import numpy as np
import onnxruntime
pixels = np.load(sys.argv[1])
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
sessions = [onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for path in sys.argv[3:]]
outputs = [session.run(None, {"pixels": pixels})[0] for session in sessions]
np.save(sys.argv[2], np.stack(outputs))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86 CPU without VNNI")
def test_int8_graphs_answer_the_same_on_a_cpu_without_vnni(exported: Path, splits: DataSplits,
                                                           tmp_path: Path) -> None:
    """The INT8 member graphs on 256 validation images, run here and on an emulated AVX2 CPU without AVX-512 or
    VNNI (qemu-user, `make data` installs it), where onnxruntime adds u8 x s8 products in saturating 16-bit pairs:
    the logits agree to float rounding, so the manifest's figures hold on either. (8-bit weights instead of the
    scheme's 7 move this ensemble's probabilities by up to 0.65 there: docs/training.md.)"""
    qemu = shutil.which("qemu-x86_64")
    assert qemu is not None, "qemu-x86_64 is missing: `make data` installs Debian's qemu-user"
    variant = load_manifest(exported).variant("int8")
    assert variant is not None
    pixels, _ = _pixels_and_labels(splits, "val")
    np.save(tmp_path / "pixels.npy", pixels[:256])
    graphs = [str(exported / member.file) for member in variant.members]
    answers = {}
    for machine, prefix in (("here", []), ("avx2", [qemu, "-cpu", "EPYC-Rome"])):
        result = subprocess.run([*prefix, sys.executable, "-c", _RUN_GRAPHS, str(tmp_path / "pixels.npy"),
                                 str(tmp_path / f"{machine}.npy"), *graphs], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        answers[machine] = np.load(tmp_path / f"{machine}.npy")
    assert answers["here"].shape == (len(graphs), 256, 10)
    np.testing.assert_allclose(answers["avx2"], answers["here"], atol=1e-4)
