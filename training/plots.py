"""PNG plots of ensemble reports (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

from artefact.calibration import ECE_BINS, bin_upper_edges, binned_ece, confidence_bin
from artefact.manifest import AbstentionThreshold, Metrics
from training.runs import CurveReport, CurveSide, FGEReport, SSEReport


def save(figure: Any, path: Path, dpi: int = 120) -> None:
    """Write `figure` to `path` (its folder made if needed) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def chart() -> tuple[Any, Any]:
    """A figure with one axes, the size of the benchmarks' charts."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    return figure, axes


def save_chart(figure: Any, axes: Any, title: str, path: Path) -> None:
    """Title, grid and legend of a `chart`, then `save` it."""
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save(figure, path)


def plot_ensemble_sizes(report: FGEReport | SSEReport, path: Path) -> None:
    """Test error and NLL against ensemble size: the prefixes of the run's snapshots, each snapshot alone, and (FGE)
    the single network of the base run."""
    method = "FGE" if isinstance(report, FGEReport) else "SSE"
    sizes = [entry.size for entry in report.ensembles]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, key, label in ((axes[0], "accuracy", "test error (%)"), (axes[1], "nll", "test NLL")):

        def value(metrics: Metrics, key: str = key) -> float:
            return 100 * (1 - metrics.accuracy) if key == "accuracy" else metrics.nll

        axis.plot(sizes, [value(e.test) for e in report.ensembles], "o-", label=f"{method} ensemble of first K")
        axis.plot([m.index + 1 for m in report.members], [value(m.test) for m in report.members],
                  "x", color="gray", label=f"{method} member K alone")
        single = report.single if isinstance(report, FGEReport) else None
        if single:
            axis.axhline(value(single.test), color="C3", linestyle="--",
                         label="the starting network (trained elsewhere)" if single.trained_elsewhere
                         else f"single network, {single.epochs} epochs")
        axis.set_xlabel("ensemble size K")
        axis.set_ylabel(label)
        axis.set_xticks(sizes)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    if isinstance(report, FGEReport):
        fge = report.config
        title = (f"FGE from epoch {fge.start_epoch}: {fge.cycles} cycles of {fge.cycle_epochs} epochs, "
                 f"lr {fge.lr1} -> {fge.lr2}")
    else:
        sse = report.config
        title = f"SSE: {sse.cycles} cosine cycles of {sse.cycle_epochs} epochs from lr {sse.base.lr}"
    figure.suptitle(title)
    save(figure, path)


def plot_curve(report: CurveReport, path: Path) -> None:
    """Training loss and test error along t: the trained curve against the straight line."""
    evaluation = report.evaluation
    if evaluation is None:
        raise ValueError("the curve has no evaluation to plot")
    ts = [point.t for point in evaluation.points]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    config = report.config

    def train_loss(side: CurveSide) -> float:
        return side.train_loss

    def test_error(side: CurveSide) -> float:
        return 100 * (1 - side.test.accuracy)

    for axis, label, value in ((axes[0], "training loss", train_loss), (axes[1], "test error (%)", test_error)):
        axis.plot(ts, [value(point.curve) for point in evaluation.points], "o-", markersize=3,
                  label=f"{config.curve} curve, {config.bends} bend{'s' if config.bends > 1 else ''}")
        axis.plot(ts, [value(point.line) for point in evaluation.points], "s--", markersize=3, color="C3",
                  label="straight line")
        axis.set_xlabel("t")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    # Log scale: the line's barrier is many times the curve's error; plain numbers on the ticks.
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axes[1].yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    axes[0].legend(loc="best", fontsize="small")
    figure.suptitle(f"{config.base.model} on {config.base.data.dataset}: {config.start_run.name} (t=0) to "
                    f"{config.end_run.name} (t=1), batch norm recomputed at every t")
    save(figure, path)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin (`artefact.calibration`): image count, mean confidence and accuracy (NaN where
    empty), and the ECE they make."""

    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    ece: float


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> ReliabilityBins:
    """The reliability diagram's bins of predictions (probabilities [N, C]) against their labels [N]."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = confidence_bin(confidence, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return ReliabilityBins(count, mean_confidence, accuracy, binned_ece(index, confidence, correct, bins))


def plot_reliability(probabilities: Mapping[str, np.ndarray], labels: np.ndarray, path: Path, title: str) -> None:
    """One reliability diagram per named set of predictions (probabilities [N, C] of the same images, `labels` [N]):
    accuracy against confidence per bin, the diagonal, the ECE, and below it how many images each bin holds."""
    edges = np.concatenate([[0.0], bin_upper_edges()])
    width = edges[1] - edges[0]
    figure, axes = plt.subplots(2, len(probabilities), figsize=(4.5 * len(probabilities), 5.5), squeeze=False,
                                sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True)
    for column, (name, predicted) in enumerate(probabilities.items()):
        binned = reliability_bins(predicted, labels)
        diagram, histogram = axes[0, column], axes[1, column]
        filled = binned.count > 0
        diagram.bar(edges[:-1][filled], binned.accuracy[filled], width=width, align="edge", edgecolor="black",
                    linewidth=0.5, label="accuracy")
        # The gap to each bin's own mean confidence is what ECE weighs, not the gap to the bin's centre.
        diagram.plot(binned.confidence[filled], binned.confidence[filled], "_", color="C3", markersize=12,
                     markeredgewidth=2, label="mean confidence")
        diagram.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        diagram.set_title(f"{name}\nECE {100 * binned.ece:.2f} %", fontsize=10)
        diagram.set_ylabel("accuracy")
        diagram.set_xlim(0, 1)
        diagram.set_ylim(0, 1)
        diagram.grid(alpha=0.3)
        diagram.legend(loc="upper left", fontsize="small")
        histogram.bar(edges[:-1], binned.count, width=width, align="edge", color="gray", edgecolor="black",
                      linewidth=0.5)
        # Log counts: most images sit in the top bin, and the few below it are what the diagram is about.
        histogram.set_yscale("log")
        histogram.set_xlabel("confidence")
        histogram.set_ylabel("images")
        histogram.grid(alpha=0.3)
    figure.suptitle(title)
    save(figure, path, dpi=100)


@dataclass(frozen=True)
class SelectiveLine:
    """One predictor's risk-coverage curve on the evaluated split (`artefact.selective.RiskCoverage`'s coverage and
    accuracy) and the thresholds fitted for it elsewhere, marked where they land on this split."""

    label: str
    coverage: np.ndarray
    accuracy: np.ndarray
    thresholds: Sequence[AbstentionThreshold] = ()


def plot_risk_coverage(lines: Sequence[SelectiveLine], targets: Sequence[float], path: Path, title: str) -> None:
    """Selective accuracy against coverage for each line, the target accuracies as horizontal lines, and each
    line's fitted thresholds as markers at the coverage and accuracy they reach (a threshold that answers
    nothing is left out)."""
    figure, axes = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    shapes = "os^Dv<>"
    marker = {target: shapes[index % len(shapes)] for index, target in enumerate(targets)}
    for index, line in enumerate(lines):
        color = f"C{index}"
        axes.plot(100 * line.coverage, 100 * line.accuracy, color=color, linewidth=1.2, label=line.label)
        for threshold in line.thresholds:
            if threshold.threshold is None or threshold.test_accuracy is None:
                continue
            axes.plot(100 * threshold.test_coverage, 100 * threshold.test_accuracy,
                      marker.get(threshold.target_accuracy, "x"), color=color, markeredgecolor="black", markersize=7)
    for target in targets:
        axes.axhline(100 * target, color="gray", linestyle=":", linewidth=1)
        axes.plot([], [], marker[target], color="white", markeredgecolor="black",
                  label=f"threshold fitted on validation for {100 * target:g} %")
    # The first few images answered make the curve jump anywhere in [0, 100]; the targets and the full-coverage
    # accuracies are what the plot is for.
    full = [float(line.accuracy[-1]) for line in lines]
    low = min([*full, *targets]) if full or targets else 0.9
    axes.set_ylim(100 * low - 2, 100.3)
    axes.set_xlim(0, 100)
    axes.set_xlabel("coverage: images answered (%)")
    axes.set_ylabel("selective accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    save(figure, path, dpi=100)
