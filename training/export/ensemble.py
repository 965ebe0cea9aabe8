"""`valley-train export`, end to end: sources read, temperature and the rest fitted, graphs written and checked in a
staging folder, the manifest and plots written, the version published by one rename (`artefact.repository`)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artefact.manifest import (
    OUTPUTS,
    SCHEMA_VERSION,
    CascadeSpec,
    ConformalSpec,
    DriftBaseline,
    EnsembleMetrics,
    FileEntry,
    FrontSpec,
    InputSpec,
    Manifest,
    Member,
    Metrics,
    Samples,
    SelectiveSpec,
    sha256_of,
    write_manifest,
)
from artefact.metrics import classification_metrics
from artefact.repository import STAGING, next_version, publish, staging_folder
from artefact.uncertainty import softmax
from training.calibrate import fit_temperature, tempered_ensemble_probabilities
from training.config import ExportConfig
from training.data import DataSplits, load_data
from training.engine import predict_logits
from training.errors import UsageError
from training.export.external import ExternalGraph, adapted_graph, check_compatible, fused_graph, inspect_graph
from training.export.fits import (
    compare_with_endpoints,
    fit_cascade_spec,
    fit_conformal_spec,
    fit_drift_baseline,
    fit_selective_spec,
    kept_in_words,
    member_order,
    selective_curve,
)
from training.export.graphs import (
    INPUT_NAME,
    PARITY_IMAGES,
    FusedEnsemble,
    check_parity,
    export_graph,
    network_graph,
    open_session,
    output_specs,
)
from training.export.report import Comparison, Exported
from training.export.sources import collect_sources, endpoint_logits, split_labels, uint8_images
from training.export.variants import SAMPLE_COUNT, Reference, export_variant, onnx_member_logits
from training.front import FRONT_FILE, FrontNetwork, load_front, tempered

log = logging.getLogger(__name__)


# The PNGs an export writes beside its manifest: not graphs, so the manifest lists no checksum for them.
RELIABILITY_PLOT = "reliability.png"
RISK_COVERAGE_PLOT = "risk-coverage.png"


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
        signal = alone if val.shape[1] == 1 else selective.signal
        fitted = fit_selective_spec(val, val_labels, test, test_labels, temperature, targets,
                                    selective.default_target, signal)
        curve = selective_curve(test, test_labels, temperature, signal)
        return SelectiveLine(f"{label}, {signal}", curve.coverage, curve.accuracy, fitted.thresholds)

    ensemble = selective_curve(member_test, test_labels, temperature, selective.signal)
    lines = [line("first member alone", member_val[:, :1], member_test[:, :1])] if member_val.shape[1] > 1 else []
    lines.append(SelectiveLine(f"the ensemble ({member_val.shape[1]}), {selective.signal}", ensemble.coverage,
                               ensemble.accuracy, selective.thresholds))
    if endpoints is not None:
        ends_val, ends_test = endpoints
        lines += [line("endpoint ensemble (2)", ends_val, ends_test), line("start network alone", ends_val[:, :1],
                  ends_test[:, :1]), line("end network alone", ends_val[:, 1:], ends_test[:, 1:])]
    plot_risk_coverage(lines, targets, folder / RISK_COVERAGE_PLOT,
                       f"{title}: test split, temperature {temperature:.3f}; thresholds fitted on validation")
    return [RELIABILITY_PLOT, RISK_COVERAGE_PLOT]


def _target(export: ExportConfig) -> tuple[Path, int]:
    """The version folder the export writes, refused where it exists and may not be overwritten."""
    name_dir = export.repository / export.name
    version = next_version(name_dir) if export.version is None else export.version
    target = name_dir / str(version)
    if target.exists() and not export.overwrite:
        raise UsageError(f"{target} already exists: pass --overwrite to replace it, or another --version")
    return target, version


@dataclass(frozen=True)
class Fitted:
    """What an export fits on the validation split and measures on the test split, from the members' logits."""

    temperature: float
    uncalibrated: Metrics
    calibrated: Metrics
    validation: Metrics
    cascade: CascadeSpec
    selective: SelectiveSpec
    drift: DriftBaseline
    conformal: ConformalSpec


def fit_all(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray, test_labels: np.ndarray,
            export: ExportConfig, front: FrontNetwork | None) -> Fitted:
    """The temperature, the cascade, selective prediction, the drift baseline and the prediction sets of the members'
    logits [N, K, C], fitted on validation alone and measured on test."""
    temperature = fit_temperature(member_val, val_labels)
    uncalibrated = classification_metrics(tempered_ensemble_probabilities(member_test, 1.0), test_labels)
    calibrated = classification_metrics(tempered_ensemble_probabilities(member_test, temperature), test_labels)
    log.info("temperature %.4f: test NLL %.4f -> %.4f, ECE %.4f -> %.4f", temperature, uncalibrated.nll,
             calibrated.nll, uncalibrated.ece, calibrated.ece)
    cascade = fit_cascade_spec(member_val, val_labels, member_test, test_labels, temperature,
                               export.cascade_nll_tolerance, export.cascade_accuracy_tolerance,
                               export.cascade_min_gain_kept, front)
    log.info("cascade: front %s, stages %s, thresholds %s: %.2f of %d members per test image, test NLL %.4f (full "
             "%.4f), accuracy %.4f (full %.4f); of the ensemble's lead over its best member it keeps %s on "
             "validation, %s on test", "none" if front is None else cascade.front if cascade.front is not None
             else "does not pay", cascade.stages, cascade.thresholds, cascade.test.members_per_image,
             member_val.shape[1], cascade.test.nll, cascade.test_full.nll, cascade.test.accuracy,
             cascade.test_full.accuracy, kept_in_words(cascade.gain_kept_validation),
             kept_in_words(cascade.gain_kept_test))
    selective = fit_selective_spec(member_val, val_labels, member_test, test_labels, temperature,
                                   export.target_accuracies, export.default_target_accuracy)
    drift = fit_drift_baseline(member_val, val_labels, temperature)
    conformal = fit_conformal_spec(member_val, val_labels, member_test, test_labels, temperature,
                                   export.conformal_score, export.coverage)
    log.info("selective prediction on %s: %s", selective.signal, ", ".join(
        f"{t.target_accuracy:.0%} -> test coverage {t.test_coverage:.1%}" for t in selective.thresholds))
    log.info("prediction sets (%s) on test: %s", conformal.default_score, ", ".join(
        f"{q.coverage:.0%} -> coverage {q.marginal:.1%}, {q.mean_size:.2f} classes"
        for q in next(e for e in conformal.scores if e.score == conformal.default_score).test))
    validation = classification_metrics(tempered_ensemble_probabilities(member_val, temperature), val_labels)
    return Fitted(temperature, uncalibrated, calibrated, validation, cascade, selective, drift, conformal)


@dataclass(frozen=True)
class Staged:
    """What the source-specific half of an export wrote into the staging folder and measured."""

    method: str
    model: str
    members: list[Member]
    member_val: np.ndarray
    member_test: np.ndarray
    val_labels: np.ndarray
    test_labels: np.ndarray
    fitted: Fitted
    input: InputSpec
    front: FrontSpec | None = None
    endpoints: tuple[np.ndarray, np.ndarray] | None = None
    comparison: list[Comparison] | None = None


def _finish(export: ExportConfig, staging: Path, target: Path, version: int, splits: DataSplits,
            staged: Staged) -> Exported:
    """The shared tail of every export: samples, variants, manifest and plots written, the version published."""
    fitted = staged.fitted
    sample_pixels = uint8_images(splits.test, splits, SAMPLE_COUNT)
    sample_probabilities = open_session(staging / "ensemble.onnx").run(["probabilities"],
                                                                       {INPUT_NAME: sample_pixels})[0]
    reference = Reference(
        temperature=fitted.temperature, val_labels=staged.val_labels, test_labels=staged.test_labels,
        validation=fitted.validation, test=fitted.calibrated, sample_pixels=sample_pixels,
        sample_probabilities=sample_probabilities, front=staged.front)
    variants = [export_variant(precision, staging, staged.members, splits, reference, export)
                for precision in export.precisions]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, name=export.name, version=version, created=datetime.now(timezone.utc),
        method=staged.method,
        model=staged.model, input=staged.input,
        outputs=output_specs(len(staged.members), splits.info.num_classes),
        classes=list(splits.info.classes),
        members=staged.members,
        fused=FileEntry(file="ensemble.onnx", sha256=sha256_of(staging / "ensemble.onnx")),
        temperature=fitted.temperature,
        metrics=EnsembleMetrics(uncalibrated=fitted.uncalibrated, calibrated=fitted.calibrated),
        samples=Samples(inputs=sample_pixels.tolist(), probabilities=sample_probabilities.tolist()),
        cascade=fitted.cascade,
        front=staged.front,
        selective=fitted.selective,
        drift=fitted.drift,
        conformal=fitted.conformal,
        variants=[variant for variant, _ in variants],
    )
    plots = write_plots(staging, f"{export.name} version {version}", staged.member_val, staged.val_labels,
                        staged.member_test, staged.test_labels, fitted.temperature, fitted.selective,
                        staged.endpoints)
    write_manifest(manifest, staging)
    publish(staging, target, replace=True)
    return Exported(target, manifest, staged.comparison, [comparison for _, comparison in variants] or None,
                    [target / plot for plot in plots])


def _input_spec(splits: DataSplits, description: str, mean: Sequence[float], std: Sequence[float]) -> InputSpec:
    info = splits.info
    return InputSpec(name=INPUT_NAME, datatype="UINT8", shape=[-1, info.in_channels, info.image_size, info.image_size],
                     mean=list(mean), std=list(std), description=description)


def export_ensemble(export: ExportConfig) -> Exported:
    """Export the ensemble of `export.runs` (or of `export.onnx`'s graphs) to `repository/name/version`; returns
    that directory and its manifest."""
    if export.onnx is not None:
        return export_external(export)
    sources = collect_sources(export)
    config = sources.config
    target, version = _target(export)
    splits = load_data(config.data)
    if len(splits.val) == 0:
        raise UsageError("the temperature is fitted on the validation split, which is empty (--val-size 0)")
    device = torch.device("cpu")
    models = [source.build(splits) for source in tqdm(sources.members, desc="members", unit="member", disable=None)]

    val_logits, val_labels = zip(*(predict_logits(m, splits.val, splits, device) for m in models), strict=True)
    test_logits, test_labels = zip(*(predict_logits(m, splits.test, splits, device) for m in models), strict=True)
    # Member logits are [N, K, C] here as everywhere: images first, then members, then classes.
    member_val, member_test = np.stack(val_logits, axis=1), np.stack(test_logits, axis=1)
    order = member_order(member_val, val_labels[0], export.member_order)
    models = [models[index] for index in order]
    member_sources = [sources.members[index] for index in order]
    member_val, member_test = member_val[:, order], member_test[:, order]
    front = load_front(export.front, config, splits) if export.front is not None else None
    fitted = fit_all(member_val, val_labels[0], member_test, test_labels[0], export, front)
    temperature = fitted.temperature
    endpoints = endpoint_logits(sources, splits)
    comparison = compare_with_endpoints(endpoints, member_val, member_test, val_labels[0], test_labels[0],
                                        temperature)

    staging = staging_folder(export.repository / export.name, STAGING, version)
    try:
        parity_pixels = uint8_images(splits.val, splits, PARITY_IMAGES)
        example = torch.from_numpy(parity_pixels[:2])
        members = []
        for index, (model, source) in enumerate(zip(models, member_sources, strict=True)):
            file = f"member-{index:02d}.onnx"
            network_graph(model, example, parity_pixels, staging / file)
            member_metrics = classification_metrics(softmax(member_test[:, index]), test_labels[0])
            members.append(Member(file=file, sha256=sha256_of(staging / file), provenance=source.provenance,
                                  metrics=member_metrics))

        fused = FusedEnsemble(models, temperature).eval()
        export_graph(fused, example, staging / "ensemble.onnx", list(OUTPUTS))
        session = open_session(staging / "ensemble.onnx")
        with torch.no_grad():
            expected = fused(torch.from_numpy(parity_pixels))[0].double().numpy()
        check_parity("ensemble.onnx", expected, session.run(["probabilities"], {INPUT_NAME: parity_pixels})[0])

        front_spec = None
        if front is not None:
            sample_pixels = uint8_images(splits.test, splits, SAMPLE_COUNT)
            network_graph(front.network, example, parity_pixels, staging / FRONT_FILE)
            front_samples = tempered(open_session(staging / FRONT_FILE).run(None, {INPUT_NAME: sample_pixels})[0],
                                     front.temperature)
            front_spec = FrontSpec(file=FRONT_FILE, sha256=sha256_of(staging / FRONT_FILE), method=front.method,
                                   provenance=front.provenance, temperature=front.temperature,
                                   validation=front.validation, test=front.test_metrics,
                                   sample_probabilities=front_samples.tolist())
        info = splits.info
        staged = Staged(sources.method, config.model, members, member_val, member_test, val_labels[0],
                        test_labels[0], fitted,
                        _input_spec(splits, "pixels 0..255, NCHW; scaling to [0, 1] and per-channel (x - mean) / std "
                                            "happen inside the graphs", info.mean, info.std),
                        front_spec, endpoints, comparison)
        return _finish(export, staging, target, version, splits, staged)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_outputs(member_logits: np.ndarray, graphs: Sequence[ExternalGraph], outputs: str) -> None:
    """Graphs said to give probabilities must give rows that sum to 1 (their exp, as adapted); graphs said to give
    logits that look like probabilities are worth a warning (a softmax would then be taken twice)."""
    sums = np.exp(member_logits).sum(axis=-1)  # [N, K]: 1 for probabilities
    for index, graph in enumerate(graphs):
        summed = sums[:, index]
        if outputs == "probabilities" and not np.allclose(summed, 1.0, atol=1e-3):
            raise UsageError(f"--outputs probabilities: {graph.path.name}'s rows sum to {summed.min():.3g} .. "
                             f"{summed.max():.3g}, not 1 on the validation split; pass --outputs logits")
        raw = member_logits[:, index]
        if outputs == "logits" and raw.min() >= 0 and np.allclose(raw.sum(axis=-1), 1.0, atol=1e-3):
            log.warning("%s: its outputs look like probabilities (in [0, 1], rows summing to 1); pass --outputs "
                        "probabilities if they are", graph.path.name)


def export_external(export: ExportConfig) -> Exported:
    """Export ONNX classifiers trained elsewhere (`export.onnx`, `training.export.external`) as an ensemble, fitted
    on the validation split of its dataset like any other."""
    source = export.onnx
    assert source is not None
    splits = load_data(source.data)
    if len(splits.val) == 0:
        raise UsageError("the temperature is fitted on the validation split, which is empty (--val-size 0)")
    info = splits.info
    if source.input_mean is not None and len(source.input_mean) != info.in_channels:
        raise UsageError(f"--input-mean and --input-std give {len(source.input_mean)} values; {info.name}'s images "
                         f"have {info.in_channels} channel(s): one value per channel")
    graphs = [inspect_graph(path, info.in_channels, info.image_size, info.num_classes) for path in source.graphs]
    check_compatible(graphs)
    target, version = _target(export)
    staging = staging_folder(export.repository / export.name, STAGING, version)
    try:
        adapted = staging / "adapted"
        adapted.mkdir()
        paths = [adapted / f"{index:02d}.onnx" for index in range(len(graphs))]
        for graph, path in zip(graphs, paths, strict=True):
            adapted_graph(graph, source.outputs, source.input_mean, source.input_std, info.in_channels,
                          info.image_size, path)
        member_val = onnx_member_logits(paths, splits.val, splits)
        member_test = onnx_member_logits(paths, splits.test, splits)
        _check_outputs(member_val, graphs, source.outputs)
        val_labels, test_labels = split_labels(splits.val, splits), split_labels(splits.test, splits)
        order = member_order(member_val, val_labels, export.member_order)
        member_val, member_test = member_val[:, order], member_test[:, order]
        fitted = fit_all(member_val, val_labels, member_test, test_labels, export, None)
        members = []
        for index, original in enumerate(order):
            file = f"member-{index:02d}.onnx"
            paths[original].rename(staging / file)
            graph = graphs[original]
            members.append(Member(file=file, sha256=sha256_of(staging / file), provenance={
                "onnx": str(graph.path.resolve()), "sha256": sha256_of(graph.path), "input": graph.input_type,
                "outputs": source.outputs},
                metrics=classification_metrics(softmax(member_test[:, index]), test_labels)))
        adapted.rmdir()
        fused_graph([staging / member.file for member in members], info.num_classes, fitted.temperature,
                    staging / "ensemble.onnx")
        parity_pixels = uint8_images(splits.val, splits, PARITY_IMAGES)
        logits = onnx_member_logits([staging / member.file for member in members], splits.val, splits)
        expected = tempered_ensemble_probabilities(logits[:PARITY_IMAGES], fitted.temperature)
        check_parity("ensemble.onnx", expected, open_session(staging / "ensemble.onnx").run(
            ["probabilities"], {INPUT_NAME: parity_pixels})[0])
        if source.input_mean is not None and source.input_std is not None:
            described, mean, std = ("pixels 0..255, NCHW; scaling to [0, 1] and (x - mean) / std happen inside the "
                                    "graphs, as the ONNX classifiers expect"), source.input_mean, source.input_std
        else:
            described, mean, std = ("pixels 0..255, NCHW; the graphs take them as the ONNX classifiers do (scaled "
                                    "to [0, 1] for float inputs)"), [0.0] * info.in_channels, [1.0] * info.in_channels
        staged = Staged("external", "onnx", members, member_val, member_test, val_labels, test_labels, fitted,
                        _input_spec(splits, described, mean, std))
        return _finish(export, staging, target, version, splits, staged)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
