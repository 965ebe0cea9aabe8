"""PNG plots of ensemble reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

from artefact.manifest import Metrics
from training.runs import CurveReport, CurveSide, FGEReport


def plot_ensemble_sizes(report: FGEReport, path: Path) -> None:
    """Test error and NLL against ensemble size: FGE prefixes, its members, the single network."""
    sizes = [entry.size for entry in report.ensembles]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, key, label in ((axes[0], "accuracy", "test error (%)"), (axes[1], "nll", "test NLL")):

        def value(metrics: Metrics, key: str = key) -> float:
            return 100 * (1 - metrics.accuracy) if key == "accuracy" else metrics.nll

        axis.plot(sizes, [value(e.test) for e in report.ensembles], "o-", label="FGE ensemble of first K")
        axis.plot([m.index + 1 for m in report.members], [value(m.test) for m in report.members],
                  "x", color="gray", label="FGE member K alone")
        single = report.single
        if single:
            axis.axhline(value(single.test), color="C3", linestyle="--",
                         label=f"single network, {single.epochs} epochs")
        axis.set_xlabel("ensemble size K")
        axis.set_ylabel(label)
        axis.set_xticks(sizes)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    config = report.config
    figure.suptitle(f"FGE from epoch {config.start_epoch}: {config.cycles} cycles of {config.cycle_epochs} "
                    f"epochs, lr {config.lr1} -> {config.lr2}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
