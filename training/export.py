"""Export an ensemble to ONNX with its manifest: `valley-train export`.

Writes `REPO/NAME/VERSION/` with one graph per member (`member-XX.onnx`: uint8 pixels in,
logits out), one fused graph (`ensemble.onnx`: every member, the fitted temperature, the
mean and the uncertainty outputs), `manifest.json` (schema in `artefact.manifest`), and two PNGs of the test split
(`reliability.png` before and after temperature scaling, `risk-coverage.png` with the abstention thresholds).
Every graph passes `onnx.checker`'s full check and matches PyTorch within 1e-4 on real
validation images before the version directory appears; it appears by a single rename.

With `front` (an SWA or distilled run), that network's graph too (`front.onnx`; `training.front`), fitted into
the cascade as its first stage where that pays on validation. The members are written best first by validation NLL
unless `member_order` says as trained: a request for N members, and each cascade stage, then gets the best N.

With `precisions`, every graph again at INT8 or FP16 (`member-XX.int8.onnx`, `ensemble.int8.onnx`, ...;
`training.quantize`), measured on the validation and test splits beside FP32 and recorded in the manifest's
`variants`. A variant whose validation NLL or accuracy misses its tolerance fails the export.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm import tqdm

from artefact.cascade import Cascade, fit_cascade, lead, quality, run_cascade
from artefact.cpu import this_machine
from artefact.drift import fit_baseline
from artefact.manifest import (
    OUTPUTS,
    SCHEMA_VERSION,
    AbstentionThreshold,
    CascadeQuality,
    CascadeSpec,
    DriftBaseline,
    EnsembleMetrics,
    FileEntry,
    FrontSpec,
    GainKept,
    InputSpec,
    Manifest,
    Member,
    Metrics,
    RiskCoverageCurve,
    Samples,
    SelectiveSpec,
    TensorSpec,
    Variant,
    sha256_of,
    write_manifest,
)
from artefact.metrics import classification_metrics
from artefact.repository import STAGING, next_version, publish, staging_folder
from artefact.selective import RiskCoverage, best_signal, fit_threshold, risk_coverage
from artefact.selective import score as selective_score
from artefact.uncertainty import LOG_FLOOR, ensemble_outputs, softmax
from training import checkpoint
from training.calibrate import fit_temperature, tempered_ensemble_probabilities
from training.config import ExportConfig, Precision, TrainConfig
from training.curve_train import TrainedCurve, open_curve
from training.curves import evenly_spaced
from training.data import DataSplits, SizedDataset, load_data, make_batches
from training.engine import build_model, predict_logits
from training.errors import UsageError
from training.front import FRONT_FILE, FrontNetwork, load_front, tempered
from training.quantize import INT8_SCHEME, lower_precision, measuring_session, method_of
from training.runs import DistillReport, RunDir, SWAReport

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 256
SAMPLE_COUNT = 4
INPUT_NAME = "pixels"
CALIBRATION_IMAGES = 1024
# A variant's samples tolerance: its own largest difference from FP32 on the samples, with room for another machine's
# kernels (another CPU, or CUDA for FP16) rounding differently.
SAMPLES_MARGIN = 2.0
MIN_SAMPLES_TOLERANCE = 1e-3
VARIANT_NLL_FLOOR = 1e-3
# Target accuracies whose abstention thresholds the manifest records, and the standard errors they keep in hand.
SELECTIVE_MARGIN = 2.0
# Live answers per drift window: what the baseline's clean level is fitted for (the server's default window).
DRIFT_WINDOW = 1000
# The PNGs an export writes beside its manifest: not graphs, so the manifest lists no checksum for them.
RELIABILITY_PLOT = "reliability.png"
RISK_COVERAGE_PLOT = "risk-coverage.png"


class PixelClassifier(nn.Module):
    """uint8 pixels [B, C, H, W] in 0..255 -> logits; the scaling to [0, 1] is part of the graph."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels.float() / 255.0)  # type: ignore[no-any-return]


class FusedEnsemble(nn.Module):
    """All members in one graph: tempered softmax per member, their mean, and uncertainty.

    Outputs, in `artefact.manifest.OUTPUTS` order: probabilities [B, C], predicted_class [B]
    (int64), confidence [B], entropy [B] (nats), mutual_information [B] (entropy of the mean
    minus mean member entropy), member_disagreement [B] (fraction of members whose own top
    class differs from the ensemble's), member_probabilities [B, K, C].
    """

    temperature: torch.Tensor

    def __init__(self, members: Sequence[nn.Module], temperature: float) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = pixels.float() / 255.0
        return ensemble_outputs_of(torch.stack([member(images) for member in self.members], dim=1), self.temperature)


def ensemble_outputs_of(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every ensemble output, in `OUTPUTS` order, from the members' logits [B, K, C]: what a fused graph computes
    after its members, whichever way they were run."""
    member_probabilities = torch.softmax(logits / temperature, dim=-1)
    probabilities = member_probabilities.mean(dim=1)
    confidence, predicted = probabilities.max(dim=-1)
    entropy = -(probabilities * probabilities.clamp_min(LOG_FLOOR).log()).sum(dim=-1)
    member_entropy = -(member_probabilities * member_probabilities.clamp_min(LOG_FLOOR).log()).sum(dim=-1)
    mutual_information = (entropy - member_entropy.mean(dim=1)).clamp_min(0.0)
    disagreement = (member_probabilities.argmax(dim=-1) != predicted.unsqueeze(1)).float().mean(dim=1)
    return (probabilities, predicted, confidence, entropy, mutual_information, disagreement, member_probabilities)


@dataclass
class MemberSource:
    """One member: where it comes from, and how to build its network (eval mode, on the CPU) for the data."""

    provenance: dict[str, Any]
    build: Callable[[DataSplits], nn.Module]


@dataclass
class Sources:
    method: Literal["fge", "sse", "curve", "independent", "swa", "distilled"]
    config: TrainConfig
    members: list[MemberSource]
    # Curves: the two base runs' own networks, the baselines the export report compares the curve ensemble with.
    endpoints: list[MemberSource] = field(default_factory=list)


def _from_checkpoint(path: Path, model_name: str, provenance: dict[str, Any]) -> MemberSource:
    def build(splits: DataSplits) -> nn.Module:
        model = build_model(model_name, splits.info, torch.device("cpu"))
        checkpoint.load_model_weights(model, checkpoint.load(path), model_name, path)
        return model.eval()

    return MemberSource(provenance, build)


def _final_network(run: RunDir, config: TrainConfig) -> MemberSource:
    provenance = {"run": str(run.path), "epoch": config.epochs, "seed": config.seed}
    return _from_checkpoint(run.final_checkpoint(config), config.model, provenance)


def curve_points(points: list[float] | None, num_points: int | None) -> list[float]:
    """The members' t: as listed, or K evenly spaced from 0 to 1 (both endpoints included; K = 1 is t = 0.5)."""
    if points is None and num_points is None:
        raise UsageError("a curve export needs the members' t: --points t1,t2,... or --num-points K")
    if points is None:
        assert num_points is not None
        return [0.5] if num_points == 1 else evenly_spaced(num_points)
    outside = [t for t in points if not 0.0 <= t <= 1.0]
    if outside:
        raise UsageError(f"--points must lie in [0, 1] (0 is --start, 1 is --end), got {outside[0]}")
    if len(set(points)) != len(points):
        raise UsageError(f"--points lists a t twice ({','.join(map(str, points))}): each member needs its own t")
    return points


def _curve_sources(run: RunDir, export: ExportConfig) -> Sources:
    config = run.read_curve_config()
    ts = curve_points(export.points, export.num_points)
    opened: list[TrainedCurve] = []

    def network(t: float) -> Callable[[DataSplits], nn.Module]:
        def build(splits: DataSplits) -> nn.Module:
            if not opened:  # read the curve once, for all its members and endpoints
                opened.append(open_curve(run.path, "cpu", splits))
            return opened[0].network_at(t)

        return build

    def endpoint(which: Literal["start", "end"]) -> Callable[[DataSplits], nn.Module]:
        def build(splits: DataSplits) -> nn.Module:
            if not opened:
                opened.append(open_curve(run.path, "cpu", splits))
            return opened[0].curve.endpoint_network(which)

        return build

    members = [MemberSource({"run": str(run.path), "t": t, "curve": config.curve, "bends": config.bends},
                            network(t)) for t in ts]
    # The endpoints as trained, from the curve's own checkpoint: their runs need not be around any more.
    endpoints = [MemberSource({"run": str(config.start_run)}, endpoint("start")),
                 MemberSource({"run": str(config.end_run)}, endpoint("end"))]
    return Sources("curve", config.base, members, endpoints)


def one_network(run: RunDir) -> Sources:
    """An SWA run's averaged network or a distilled student, as a one-member model."""
    if not run.report_file.is_file() or not run.network_file.is_file():
        command = "swa" if run.is_swa else "distill ... --resume"
        raise UsageError(f"{run.path} has no finished network: run `valley-train {command}` first")
    if run.is_swa:
        swa = run.read_report(SWAReport)
        provenance: dict[str, Any] = {"run": str(run.path), "source_run": str(swa.config.source_run),
                                      "averaged": swa.config.members}
        return Sources("swa", swa.config.base, [_from_checkpoint(run.network_file, swa.config.base.model, provenance)])
    student = run.read_report(DistillReport)
    provenance = {"run": str(run.path), "teacher_run": str(student.config.teacher_run),
                  "teacher_members": student.config.members, "temperature": student.config.temperature,
                  "seed": student.config.base.seed}
    return Sources("distilled", student.config.base,
                   [_from_checkpoint(run.network_file, student.config.base.model, provenance)])


def collect_sources(export: ExportConfig) -> Sources:
    """One FGE run (its snapshots), one curve run (points on it) or one or more base runs (their final networks)."""
    dirs = [RunDir(path) for path in export.runs]
    is_curve = [run.is_curve for run in dirs]
    if any(is_curve):
        if len(dirs) > 1:
            raise UsageError("export one curve run at a time: --from CURVE_DIR with --points or --num-points")
        return _curve_sources(dirs[0], export)
    if export.points is not None or export.num_points is not None:
        raise UsageError("--points and --num-points choose points on a curve: --from must be a curve run "
                         "(`valley-train curve --out`)")
    if len(dirs) == 1 and (dirs[0].is_swa or dirs[0].is_distilled):
        return one_network(dirs[0])
    if any(run.is_swa or run.is_distilled for run in dirs):
        raise UsageError("an SWA or distilled run is one network: export it alone (--from RUN_DIR)")
    if len(dirs) == 1 and dirs[0].has_snapshots:
        run = dirs[0]
        command = "sse" if run.is_sse else "fge"
        if not run.report_file.is_file():
            raise UsageError(f"{command.upper()} run {run.path} has no {run.report_file.name}: finish it first "
                             f"(valley-train {command} ... --resume)")
        config = run.read_config()
        report = run.read_snapshot_report()
        members = [_from_checkpoint(run.path / m.file, config.model,
                                    {"run": str(run.path), "index": m.index, "epoch": m.epoch, "lr": m.lr})
                   for m in report.members]
        return Sources("sse" if run.is_sse else "fge", config, members)

    configs = [run.read_config() for run in dirs]
    members = [_final_network(run, config) for run, config in zip(dirs, configs, strict=True)]
    first = configs[0]
    for run, config in zip(dirs[1:], configs[1:], strict=True):
        if config.model != first.model:
            raise UsageError(f"members must share one architecture: {dirs[0].path} is {first.model!r}, "
                             f"{run.path} is {config.model!r}")
        if config.data.dataset != first.data.dataset:
            raise UsageError(f"members must share one dataset: {dirs[0].path} is {first.data.dataset!r}, "
                             f"{run.path} is {config.data.dataset!r}")
    return Sources("independent", first, members)


def _uint8_batches(data: SizedDataset, splits: DataSplits) -> Iterator[np.ndarray]:
    """A split in order, in batches of uint8 pixels (what a client sends)."""
    for batch, _ in make_batches(data, splits.info, 256, train=False):
        yield (batch * 255.0).round().to(torch.uint8).numpy()


def _uint8_images(data: SizedDataset, splits: DataSplits, count: int) -> np.ndarray:
    """The first `count` images of a split as uint8 pixels."""
    images = []
    seen = 0
    for batch in _uint8_batches(data, splits):
        images.append(batch)
        seen += batch.shape[0]
        if seen >= count:
            break
    return np.concatenate(images)[:count]


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str]) -> None:
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        # The exporter reports its own progress and optimisation notes as warnings.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                          dynamo=True, dynamic_shapes={"pixels": {0: batch}}, external_data=False, verbose=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_parity(name: str, expected: np.ndarray, actual: np.ndarray) -> float:
    difference = float(np.max(np.abs(expected - actual)))
    if not difference <= PARITY_TOLERANCE:
        raise RuntimeError(f"{name}: onnxruntime and PyTorch probabilities differ by {difference:.3g} "
                           f"(> {PARITY_TOLERANCE}); the export is wrong, nothing was written")
    log.info("%s: max |onnxruntime - PyTorch| probability difference %.2e on %d images", name, difference,
             len(expected))
    return difference


class CalibrationEffect(BaseModel):
    """One test metric of the ensemble before and after temperature scaling."""

    uncalibrated: float
    calibrated: float


class Comparison(BaseModel):
    """An ensemble or a network scored on the same images as the exported ensemble (probabilities averaged)."""

    name: str
    members: int
    test: Metrics
    val: Metrics


class VariantComparison(BaseModel):
    """A lower-precision variant beside the FP32 ensemble, both with the manifest's temperature, on both splits."""

    precision: Precision
    validation: Metrics
    validation_fp32: Metrics
    test: Metrics
    test_fp32: Metrics
    samples_difference: float = Field(description="largest |variant - FP32| of the fused graphs' sample "
                                      "probabilities")


class ExportReport(BaseModel):
    """What `valley-train export` prints (one JSON line): where the version went and what calibration did."""

    exported: Path
    members: int
    temperature: float
    test_nll: CalibrationEffect
    test_ece: CalibrationEffect
    comparison: list[Comparison] | None = Field(None, description="curves: the ensemble against its endpoints")
    cascade: CascadeSpec | None = Field(None, description="the anytime ensemble fitted on validation, with its "
                                        "validation and test figures")
    variants: list[VariantComparison] | None = Field(None, description="the lower-precision variants beside FP32")
    plots: list[Path] | None = Field(None, description="the PNGs in the version folder: the test split's reliability "
                                     "diagram and risk-coverage curves")


@dataclass(frozen=True)
class Exported:
    """The version directory written, its manifest, (curves) the comparison with the endpoints, and the
    lower-precision variants beside FP32."""

    target: Path
    manifest: Manifest
    comparison: list[Comparison] | None = None
    variants: list[VariantComparison] | None = None
    plots: list[Path] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as `target, manifest`, as the earlier two-field tuple did."""
        return iter((self.target, self.manifest))

    def report(self) -> ExportReport:
        """The summary the CLI prints."""
        metrics = self.manifest.metrics
        return ExportReport(
            exported=self.target, members=len(self.manifest.members), temperature=self.manifest.temperature,
            test_nll=CalibrationEffect(uncalibrated=metrics.uncalibrated.nll, calibrated=metrics.calibrated.nll),
            test_ece=CalibrationEffect(uncalibrated=metrics.uncalibrated.ece, calibrated=metrics.calibrated.ece),
            comparison=self.comparison, cascade=self.manifest.cascade, variants=self.variants,
            plots=self.plots or None,
        )


def endpoint_logits(sources: Sources, splits: DataSplits) -> tuple[np.ndarray, np.ndarray] | None:
    """Curves: the two endpoints' logits [2, N, C] on the validation and test splits, each network with its own
    trained batch-norm statistics; None for other exports."""
    if not sources.endpoints:
        return None
    device = torch.device("cpu")
    networks = [endpoint.build(splits) for endpoint in sources.endpoints]
    return (np.stack([predict_logits(network, splits.val, splits, device)[0] for network in networks]),
            np.stack([predict_logits(network, splits.test, splits, device)[0] for network in networks]))


def compare_with_endpoints(endpoints: tuple[np.ndarray, np.ndarray] | None, member_val: np.ndarray,
                           member_test: np.ndarray, val_labels: np.ndarray, test_labels: np.ndarray,
                           temperature: float) -> list[Comparison] | None:
    """Curves: the exported ensemble (before and after temperature scaling) against the ensemble of its two
    endpoints and each endpoint alone (`endpoint_logits`)."""
    if endpoints is None:
        return None
    ends_val, ends_test = endpoints

    def row(name: str, val: np.ndarray, test: np.ndarray, t: float = 1.0) -> Comparison:
        return Comparison(name=name, members=len(val),
                          test=classification_metrics(tempered_ensemble_probabilities(test, t), test_labels),
                          val=classification_metrics(tempered_ensemble_probabilities(val, t), val_labels))

    count = len(member_val)
    return [
        row(f"curve ensemble ({count} points)", member_val, member_test),
        row(f"curve ensemble ({count} points), temperature {temperature:.3f}", member_val, member_test, temperature),
        row("endpoint ensemble (2 networks)", ends_val, ends_test),
        row("start network alone", ends_val[:1], ends_test[:1]),
        row("end network alone", ends_val[1:], ends_test[1:]),
    ]


def fit_cascade_spec(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray, test_labels: np.ndarray,
                     temperature: float, max_nll_increase: float, max_accuracy_drop: float,
                     min_gain_kept: float, front: FrontNetwork | None = None) -> CascadeSpec:
    """The anytime ensemble of tempered members (behind the front network, where it pays), fitted on the validation
    logits [K, N, C] alone and then measured on the test logits: the test split never takes part in choosing it."""
    val, test = tempered_members(member_val, temperature), tempered_members(member_test, temperature)
    front_val, front_test = (front.val, front.test) if front is not None else (None, None)
    fitted = fit_cascade(val, val_labels, max_nll_increase, max_accuracy_drop, min_gain_kept,
                         front_probabilities=front_val)
    cascade = fitted.cascade
    answers, used = run_cascade(test, cascade, front_test)
    test_kept = lead(test, test_labels).kept(quality(answers, test_labels, used))
    full = Cascade.full(cascade.members)
    return CascadeSpec(
        stages=list(cascade.stages), thresholds=list(cascade.thresholds), max_nll_increase=max_nll_increase,
        max_accuracy_drop=max_accuracy_drop, min_gain_kept=min_gain_kept, front=cascade.front,
        validation=_cascade_quality(val, val_labels, cascade, front_val),
        validation_full=_cascade_quality(val, val_labels, full),
        test=_cascade_quality(test, test_labels, cascade, front_test),
        test_full=_cascade_quality(test, test_labels, full),
        gain_kept_validation=_gain_kept(fitted.lead.kept(fitted.quality)), gain_kept_test=_gain_kept(test_kept))


def member_order(member_val: np.ndarray, val_labels: np.ndarray, order: Literal["best-first", "as-trained"]
                 ) -> list[int]:
    """The members' indices in the order export writes them: by each one's validation NLL, best first (ties keep the
    trained order), or as trained."""
    if order == "as-trained":
        return list(range(len(member_val)))
    nll = [classification_metrics(softmax(logits), val_labels).nll for logits in member_val]
    return sorted(range(len(member_val)), key=lambda index: nll[index])


def _gain_kept(kept: tuple[float | None, float | None]) -> GainKept:
    return GainKept(nll=kept[0], ece=kept[1])


def _kept_in_words(kept: GainKept | None) -> str:
    """'NLL 96 %, ECE 100 %' (a metric the ensemble does not lead on: 'no lead')."""
    if kept is None:
        return "nothing measured"
    return ", ".join(f"{name} {'no lead' if value is None else f'{100 * value:.0f} %'}"
                     for name, value in (("NLL", kept.nll), ("ECE", kept.ece)))


def fit_selective_spec(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray,
                       test_labels: np.ndarray, temperature: float, targets: Sequence[float] = (0.95, 0.97, 0.99),
                       default_target: float = 0.99, signal: str | None = None) -> SelectiveSpec:
    """The signal (the best on validation, unless `signal` names one) and thresholds of selective prediction,
    fitted on the validation logits [K, N, C] alone, then measured on the test logits: the test split never takes
    part in choosing them."""
    val, test = tempered_members(member_val, temperature), tempered_members(member_test, temperature)
    val_probabilities, test_probabilities = val.mean(axis=1), test.mean(axis=1)
    best, curves = best_signal(val_probabilities, val, val_labels)
    signal = best if signal is None else signal
    val_scores = selective_score(signal, val_probabilities, val)
    test_scores = selective_score(signal, test_probabilities, test)
    val_correct = val_probabilities.argmax(axis=-1) == val_labels
    test_correct = test_probabilities.argmax(axis=-1) == test_labels
    thresholds = []
    for target in targets:
        threshold = fit_threshold(curves[signal], target, SELECTIVE_MARGIN)
        val_kept = val_scores >= threshold if threshold is not None else np.zeros(len(val_scores), dtype=bool)
        test_kept = test_scores >= threshold if threshold is not None else np.zeros(len(test_scores), dtype=bool)
        thresholds.append(AbstentionThreshold(
            target_accuracy=target, threshold=threshold, validation_coverage=float(val_kept.mean()),
            validation_accuracy=float(val_correct[val_kept].mean()) if val_kept.any() else None,
            test_coverage=float(test_kept.mean()),
            test_accuracy=float(test_correct[test_kept].mean()) if test_kept.any() else None))
    sampled = {name: curve.sampled() for name, curve in curves.items()}
    return SelectiveSpec(signal=signal, margin=SELECTIVE_MARGIN, thresholds=thresholds, default_target=default_target,
                         curves=[RiskCoverageCurve(signal=name, area=curve.area, coverage=points.coverage.tolist(),
                                                   accuracy=points.accuracy.tolist(),
                                                   thresholds=points.thresholds.tolist(), count=points.count)
                                 for name, curve in curves.items() for points in [sampled[name]]])


def selective_curve(member_logits: np.ndarray, labels: np.ndarray, temperature: float, signal: str) -> RiskCoverage:
    """The risk-coverage curve of the tempered ensemble of member logits [K, N, C] ranked by `signal`."""
    members = tempered_members(member_logits, temperature)
    probabilities = members.mean(axis=1)
    return risk_coverage(selective_score(signal, probabilities, members), probabilities.argmax(axis=-1) == labels)


def write_plots(folder: Path, title: str, member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray,
                test_labels: np.ndarray, temperature: float, selective: SelectiveSpec,
                endpoints: tuple[np.ndarray, np.ndarray] | None = None) -> list[str]:
    """The test split's reliability diagram before and after temperature scaling, and its risk-coverage curves (the
    first member alone, the ensemble, curves' endpoints) with the thresholds fitted on validation, as PNGs in
    `folder`; returns their file names."""
    # matplotlib loads only when plots are drawn, not wherever the exporter's helpers are imported.
    from training.plots import SelectiveLine, plot_reliability, plot_risk_coverage

    panels = {f"{when} temperature scaling (T = {t:.3f})": tempered_ensemble_probabilities(member_test, t)
              for when, t in (("before", 1.0), ("after", temperature))}
    plot_reliability(panels, test_labels, folder / RELIABILITY_PLOT, f"{title}: test split, {len(test_labels)} images")
    targets = [threshold.target_accuracy for threshold in selective.thresholds]
    # One network's members never disagree: its mutual information is 0 for every image and ranks nothing.
    alone = "confidence" if selective.signal == "negative_mutual_information" else selective.signal

    def line(label: str, val: np.ndarray, test: np.ndarray) -> SelectiveLine:
        signal = alone if len(val) == 1 else selective.signal
        fitted = fit_selective_spec(val, val_labels, test, test_labels, temperature, targets,
                                    selective.default_target, signal)
        curve = selective_curve(test, test_labels, temperature, signal)
        return SelectiveLine(f"{label}, {signal}", curve.coverage, curve.accuracy, fitted.thresholds)

    ensemble = selective_curve(member_test, test_labels, temperature, selective.signal)
    lines = [line("first member alone", member_val[:1], member_test[:1])] if len(member_val) > 1 else []
    lines.append(SelectiveLine(f"the ensemble ({len(member_val)}), {selective.signal}", ensemble.coverage,
                               ensemble.accuracy, selective.thresholds))
    if endpoints is not None:
        ends_val, ends_test = endpoints
        lines += [line("endpoint ensemble (2)", ends_val, ends_test), line("start network alone", ends_val[:1],
                  ends_test[:1]), line("end network alone", ends_val[1:], ends_test[1:])]
    plot_risk_coverage(lines, targets, folder / RISK_COVERAGE_PLOT,
                       f"{title}: test split, temperature {temperature:.3f}; thresholds fitted on validation")
    return [RELIABILITY_PLOT, RISK_COVERAGE_PLOT]


def fit_drift_baseline(member_val: np.ndarray, temperature: float, window: int = DRIFT_WINDOW) -> DriftBaseline:
    """The drift score's baseline: the tempered ensemble's answers on the validation logits [K, N, C]."""
    outputs = ensemble_outputs(tempered_members(member_val, temperature).astype(np.float32))
    baseline = fit_baseline(outputs, member_val.shape[-1], window)
    return DriftBaseline(histograms=baseline.histograms, predicted=baseline.predicted,
                         clean_level=baseline.clean_level, window=window)


def tempered_members(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Member logits [K, N, C] as the served members' tempered probabilities [N, K, C]."""
    return np.ascontiguousarray(softmax(logits.astype(np.float64) / temperature).transpose(1, 0, 2))


def _cascade_quality(members: np.ndarray, labels: np.ndarray, cascade: Cascade, front: np.ndarray | None = None
                     ) -> CascadeQuality:
    answers, used = run_cascade(members, cascade, front)
    metrics = classification_metrics(answers, labels)
    return CascadeQuality(accuracy=metrics.accuracy, nll=metrics.nll, ece=metrics.ece,
                          members_per_image=float(np.mean(used)))


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
    """Logits [K, N, C] of member graphs run by onnxruntime on the CPU over a split, in order; `precision` says
    how to measure them (`training.quantize.measuring_session`)."""
    sessions = [measuring_session(path, precision) for path in paths]
    batches = [np.stack([session.run(None, {INPUT_NAME: pixels})[0] for session in sessions])
               for pixels in _uint8_batches(data, splits)]
    return np.concatenate(batches, axis=1).astype(np.float64)


def export_variant(precision: Precision, folder: Path, members: Sequence[Member], splits: DataSplits,
                   reference: Reference, export: ExportConfig) -> tuple[Variant, VariantComparison]:
    """Write every graph in `folder` again at `precision`, measure the ensemble the variant's member graphs make
    on both splits, and refuse it (UsageError) when its validation figures miss the export's tolerances."""
    import onnxruntime

    calibration = _uint8_images(splits.val, splits, CALIBRATION_IMAGES)
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
    fused = [_session(folder / fused_file)]
    if precision == "fp16":  # as the CPU provider runs the file (FP16 weights only), and as measured
        fused.append(measuring_session(folder / fused_file, precision))
    difference = max(float(np.max(np.abs(session.run(["probabilities"], {INPUT_NAME: reference.sample_pixels})[0]
                                         - reference.sample_probabilities))) for session in fused)
    front: FileEntry | None = None
    if reference.front is not None:
        logits = _session(folder / front_file).run(None, {INPUT_NAME: reference.sample_pixels})[0]
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


def export_ensemble(export: ExportConfig) -> Exported:
    """Export the ensemble of `export.runs` to `repository/name/version`; returns that directory and its manifest."""
    sources = collect_sources(export)
    config = sources.config
    name = export.name
    name_dir = export.repository / name
    version = next_version(name_dir) if export.version is None else export.version
    target = name_dir / str(version)
    if target.exists() and not export.overwrite:
        raise UsageError(f"{target} already exists: pass --overwrite to replace it, or another --version")
    splits = load_data(config.data)
    if len(splits.val) == 0:
        raise UsageError("the temperature is fitted on the validation split, which is empty (--val-size 0)")
    device = torch.device("cpu")
    models = [source.build(splits) for source in tqdm(sources.members, desc="members", unit="member", disable=None)]

    val_logits, val_labels = zip(*(predict_logits(m, splits.val, splits, device) for m in models), strict=True)
    test_logits, test_labels = zip(*(predict_logits(m, splits.test, splits, device) for m in models), strict=True)
    order = member_order(np.stack(val_logits), val_labels[0], export.member_order)
    models = [models[index] for index in order]
    member_sources = [sources.members[index] for index in order]
    member_val, member_test = np.stack(val_logits)[order], np.stack(test_logits)[order]
    front = load_front(export.front, config, splits) if export.front is not None else None
    temperature = fit_temperature(member_val, val_labels[0])
    uncalibrated = classification_metrics(tempered_ensemble_probabilities(member_test, 1.0), test_labels[0])
    calibrated = classification_metrics(tempered_ensemble_probabilities(member_test, temperature), test_labels[0])
    log.info("temperature %.4f: test NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature, uncalibrated.nll,
             calibrated.nll, uncalibrated.ece, calibrated.ece)
    endpoints = endpoint_logits(sources, splits)
    comparison = compare_with_endpoints(endpoints, member_val, member_test, val_labels[0], test_labels[0],
                                        temperature)
    cascade = fit_cascade_spec(member_val, val_labels[0], member_test, test_labels[0], temperature,
                               export.cascade_nll_tolerance, export.cascade_accuracy_tolerance,
                               export.cascade_min_gain_kept, front)
    log.info("cascade: front %s, stages %s, thresholds %s: %.2f of %d members per test image, test NLL %.4f (full "
             "%.4f), accuracy %.4f (full %.4f); of the ensemble's lead over its best member it keeps %s on "
             "validation, %s on test", "none" if front is None else cascade.front if cascade.front is not None
             else "does not pay", cascade.stages, cascade.thresholds, cascade.test.members_per_image, len(models),
             cascade.test.nll, cascade.test_full.nll, cascade.test.accuracy, cascade.test_full.accuracy,
             _kept_in_words(cascade.gain_kept_validation), _kept_in_words(cascade.gain_kept_test))
    selective = fit_selective_spec(member_val, val_labels[0], member_test, test_labels[0], temperature,
                                   export.target_accuracies, export.default_target_accuracy)
    drift = fit_drift_baseline(member_val, temperature)
    log.info("selective prediction on %s: %s", selective.signal, ", ".join(
        f"{t.target_accuracy:.0%} -> test coverage {t.test_coverage:.1%}" for t in selective.thresholds))

    staging = staging_folder(name_dir, STAGING, version)
    try:
        parity_pixels = _uint8_images(splits.val, splits, PARITY_IMAGES)
        example = torch.from_numpy(parity_pixels[:2])
        members = []
        for index, (model, source) in enumerate(zip(models, member_sources, strict=True)):
            file = f"member-{index:02d}.onnx"
            _network_graph(model, example, parity_pixels, staging / file)
            member_metrics = classification_metrics(softmax(member_test[index]), test_labels[0])
            members.append(Member(file=file, sha256=sha256_of(staging / file), provenance=source.provenance,
                                  metrics=member_metrics))

        fused = FusedEnsemble(models, temperature).eval()
        export_graph(fused, example, staging / "ensemble.onnx", list(OUTPUTS))
        session = _session(staging / "ensemble.onnx")
        with torch.no_grad():
            expected = fused(torch.from_numpy(parity_pixels))[0].double().numpy()
        _check_parity("ensemble.onnx", expected, session.run(["probabilities"], {INPUT_NAME: parity_pixels})[0])

        sample_pixels = _uint8_images(splits.test, splits, SAMPLE_COUNT)
        sample_probabilities = session.run(["probabilities"], {INPUT_NAME: sample_pixels})[0]
        front_spec = None
        if front is not None:
            _network_graph(front.network, example, parity_pixels, staging / FRONT_FILE)
            front_samples = tempered(_session(staging / FRONT_FILE).run(None, {INPUT_NAME: sample_pixels})[0],
                                     front.temperature)
            front_spec = FrontSpec(file=FRONT_FILE, sha256=sha256_of(staging / FRONT_FILE), method=front.method,
                                   provenance=front.provenance, temperature=front.temperature,
                                   validation=front.validation, test=front.test_metrics,
                                   sample_probabilities=front_samples.tolist())
        reference = Reference(
            temperature=temperature, val_labels=val_labels[0], test_labels=test_labels[0],
            validation=classification_metrics(tempered_ensemble_probabilities(member_val, temperature),
                                              val_labels[0]),
            test=calibrated, sample_pixels=sample_pixels, sample_probabilities=sample_probabilities, front=front_spec)
        variants = [export_variant(precision, staging, members, splits, reference, export)
                    for precision in export.precisions]
        info = splits.info
        shape = [-1, info.in_channels, info.image_size, info.image_size]
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, name=name, version=version, created=datetime.now(timezone.utc),
            method=sources.method,
            model=config.model,
            input=InputSpec(name=INPUT_NAME, datatype="UINT8", shape=shape, mean=list(info.mean), std=list(info.std),
                            description="pixels 0..255, NCHW; scaling to [0, 1] and per-channel (x - mean) / std "
                                        "happen inside the graphs"),
            outputs=_output_specs(len(models), info.num_classes),
            classes=list(info.classes),
            members=members,
            fused=FileEntry(file="ensemble.onnx", sha256=sha256_of(staging / "ensemble.onnx")),
            temperature=temperature,
            metrics=EnsembleMetrics(uncalibrated=uncalibrated, calibrated=calibrated),
            samples=Samples(inputs=sample_pixels.tolist(), probabilities=sample_probabilities.tolist()),
            cascade=cascade,
            front=front_spec,
            selective=selective,
            drift=drift,
            variants=[variant for variant, _ in variants],
        )
        plots = write_plots(staging, f"{name} version {version}", member_val, val_labels[0], member_test,
                            test_labels[0], temperature, selective, endpoints)
        write_manifest(manifest, staging)
        publish(staging, target, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(target, manifest, comparison, [comparison for _, comparison in variants] or None,
                    [target / plot for plot in plots])


def _network_graph(network: nn.Module, example: torch.Tensor, parity_pixels: np.ndarray, path: Path) -> None:
    """One network's graph (pixels in, logits out), its probabilities checked against PyTorch's."""
    wrapped = PixelClassifier(network)
    export_graph(wrapped, example, path, ["logits"])
    with torch.no_grad():
        expected = softmax(wrapped(torch.from_numpy(parity_pixels)).double().numpy())
    actual = softmax(_session(path).run(None, {INPUT_NAME: parity_pixels})[0].astype(np.float64))
    _check_parity(path.name, expected, actual)


def _output_specs(members: int, classes: int) -> list[TensorSpec]:
    """The fused graph's outputs: per-image scalars unless named here."""
    specs = {name: TensorSpec(name=name, datatype="FP32", shape=[-1]) for name in OUTPUTS}
    specs["probabilities"] = TensorSpec(name="probabilities", datatype="FP32", shape=[-1, classes])
    specs["predicted_class"] = TensorSpec(name="predicted_class", datatype="INT64", shape=[-1])
    specs["member_probabilities"] = TensorSpec(name="member_probabilities", datatype="FP32",
                                               shape=[-1, members, classes])
    return [specs[name] for name in OUTPUTS]
