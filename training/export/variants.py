"""Lower-precision variants of an export (INT8, FP16): every graph again, measured beside FP32 on the validation
and test splits, refused where it misses its tolerance (`training.quantize` makes the graphs)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artefact.cpu import this_machine
from artefact.manifest import (
    FileEntry,
    FrontSpec,
    Member,
    Metrics,
    Variant,
    sha256_of,
)
from artefact.metrics import classification_metrics
from training.calibrate import tempered_ensemble_probabilities
from training.config import ExportConfig, Precision
from training.data import DataSplits, SizedDataset
from training.errors import UsageError
from training.export.graphs import INPUT_NAME, open_session
from training.export.report import VariantComparison
from training.export.sources import uint8_batches, uint8_images
from training.front import FRONT_FILE, tempered
from training.quantize import INT8_SCHEME, lower_precision, measuring_session, method_of

log = logging.getLogger(__name__)


SAMPLE_COUNT = 4

CALIBRATION_IMAGES = 1024


# A variant's samples tolerance: its own largest difference from FP32 on the samples, with room for another machine's
# kernels (another CPU, or CUDA for FP16) rounding differently.
SAMPLES_MARGIN = 2.0

MIN_SAMPLES_TOLERANCE = 1e-3

VARIANT_NLL_FLOOR = 1e-3


@dataclass(frozen=True)
class Reference:
    """What a variant is measured against: the FP32 ensemble's labels and tempered metrics on both splits, and the
    fused graph's sample inputs and probabilities."""

    temperature: float
    val_labels: np.ndarray
    test_labels: np.ndarray
    validation: Metrics
    test: Metrics
    sample_pixels: np.ndarray
    sample_probabilities: np.ndarray
    front: FrontSpec | None = None
    """The front network, its temperature and its sample probabilities, where the version has one."""


def onnx_member_logits(paths: Sequence[Path], data: SizedDataset, splits: DataSplits,
                       precision: Precision | None = None) -> np.ndarray:
    """Logits [N, K, C] of member graphs run by onnxruntime on the CPU over a split, in order; `precision` says
    how to measure them (`training.quantize.measuring_session`)."""
    sessions = [measuring_session(path, precision) for path in paths]
    batches = [np.stack([session.run(None, {INPUT_NAME: pixels})[0] for session in sessions], axis=1)
               for pixels in uint8_batches(data, splits)]
    return np.concatenate(batches).astype(np.float64)


def export_variant(precision: Precision, folder: Path, members: Sequence[Member], splits: DataSplits,
                   reference: Reference, export: ExportConfig) -> tuple[Variant, VariantComparison]:
    """Write every graph in `folder` again at `precision`, measure the ensemble the variant's member graphs make
    on both splits, and refuse it (UsageError) when its validation figures miss the export's tolerances."""
    import onnxruntime

    calibration = uint8_images(splits.val, splits, CALIBRATION_IMAGES)
    files = [member.file.removesuffix(".onnx") + f".{precision}.onnx" for member in members]
    fused_file = f"ensemble.{precision}.onnx"
    for member, file in zip(members, files, strict=True):
        lower_precision(precision, folder / member.file, folder / file, calibration)
    lower_precision(precision, folder / "ensemble.onnx", folder / fused_file, calibration)
    front_file = FRONT_FILE.removesuffix(".onnx") + f".{precision}.onnx"
    if reference.front is not None:
        lower_precision(precision, folder / reference.front.file, folder / front_file, calibration)

    def measure(data: SizedDataset, labels: np.ndarray) -> Metrics:
        logits = onnx_member_logits([folder / file for file in files], data, splits, precision)
        return classification_metrics(tempered_ensemble_probabilities(logits, reference.temperature), labels)

    validation = measure(splits.val, reference.val_labels)
    fp32 = reference.validation
    # Relative, with an absolute floor: an ensemble whose NLL is near 0 would otherwise allow no rounding at all.
    nll_limit = max(fp32.nll * (1 + export.variant_nll_tolerance), fp32.nll + VARIANT_NLL_FLOOR)
    accuracy_limit = fp32.accuracy - export.variant_accuracy_tolerance
    if not (validation.nll <= nll_limit and validation.accuracy >= accuracy_limit):
        raise UsageError(
            f"the {precision} ensemble misses its tolerance on the validation split: NLL {validation.nll:.4f} "
            f"(FP32 {fp32.nll:.4f}, at most {nll_limit:.4f} allowed by --variant-nll-tolerance "
            f"{export.variant_nll_tolerance}), accuracy {validation.accuracy:.4f} (FP32 {fp32.accuracy:.4f}, at "
            f"least {accuracy_limit:.4f} allowed by --variant-accuracy-tolerance {export.variant_accuracy_tolerance})"
            f"; nothing was written: loosen the tolerances or export without --precision {precision}")
    test = measure(splits.test, reference.test_labels)
    fused = [open_session(folder / fused_file)]
    if precision == "fp16":  # as the CPU provider runs the file (FP16 weights only), and as measured
        fused.append(measuring_session(folder / fused_file, precision))
    difference = max(float(np.max(np.abs(session.run(["probabilities"], {INPUT_NAME: reference.sample_pixels})[0]
                                         - reference.sample_probabilities))) for session in fused)
    front: FileEntry | None = None
    if reference.front is not None:
        logits = open_session(folder / front_file).run(None, {INPUT_NAME: reference.sample_pixels})[0]
        front_difference = float(np.max(np.abs(tempered(logits, reference.front.temperature)
                                                - np.asarray(reference.front.sample_probabilities))))
        log.info("%s front network: samples within %.2e", precision, front_difference)
        difference = max(difference, front_difference)
        front = FileEntry(file=front_file, sha256=sha256_of(folder / front_file))
    log.info("%s vs FP32, temperature applied: test accuracy %.4f vs %.4f, NLL %.4f vs %.4f, ECE %.4f vs %.4f; "
             "validation accuracy %.4f vs %.4f, NLL %.4f vs %.4f; samples within %.2e", precision, test.accuracy,
             reference.test.accuracy, test.nll, reference.test.nll, test.ece, reference.test.ece,
             validation.accuracy, fp32.accuracy, validation.nll, fp32.nll, difference)
    variant = Variant(
        precision=precision,
        members=[FileEntry(file=file, sha256=sha256_of(folder / file)) for file in files],
        fused=FileEntry(file=fused_file, sha256=sha256_of(folder / fused_file)),
        method=method_of(precision, len(calibration)), validation=validation, test=test,
        samples_tolerance=max(SAMPLES_MARGIN * difference, MIN_SAMPLES_TOLERANCE),
        scheme=INT8_SCHEME if precision == "int8" else None, validated_on=this_machine(onnxruntime.__version__),
        front=front,
    )
    comparison = VariantComparison(precision=precision, validation=validation, validation_fp32=fp32, test=test,
                                   test_fp32=reference.test, samples_difference=difference)
    return variant, comparison
