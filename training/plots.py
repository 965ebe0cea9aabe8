"""PNG plots of ensemble reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from artefact.manifest import Metrics
from training.runs import FGEReport


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
