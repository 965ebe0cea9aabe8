"""The paper's comparison at several training budgets: independent networks, snapshot ensembles, FGE, SWA, a
distilled student and the curve ensemble, over several seeds.

Garipov et al.'s headline table compares, at budgets B, 2B and 3B (B: the epochs that train one network),
ensembles of independently trained networks (Ind: 1, 2 and 3 networks of budget B each), snapshot ensembles
(SSE: cosine restarts over the whole budget) and FGE (a base run of the whole budget, its last 20 % spent on
cycles). This script trains them all with `valley-train`, per seed, and adds what valley makes of them:

- SWA: the weight average of each FGE run's snapshots (no training: the cost of the FGE run);
- a distilled student of the FGE ensemble at budget B, trained for B epochs at each `--temperatures` value, the
  temperature chosen on validation NLL (cost: teacher B + student B, plus the teacher's forward passes);
- the curve ensemble: `--curve-points` networks on a Bezier curve between the first two Ind networks, the curve
  trained for B epochs (cost 3B), batch norm recomputed at each point.

Every choice (distillation temperature) is made on the validation split; the test split is read once per model,
for the table. Each run lives in `--out/seed-S/...` and is resumed where it stopped (`--resume`), so the study can
be interrupted and started again with the same command. At the end it writes `results.json`, prints the table
(rows by method, columns by budget; mean +- standard deviation over the seeds) and draws `comparison.png`.

    python benchmarks/comparison_study.py --budget 24 --subset 20000 --seeds 0 1 2 --out runs/comparison

Seeds can train side by side, one process per seed (`OMP_NUM_THREADS=1 ... --seeds 1`, `... --seeds 2`: one
core each); the command above then finds every run finished and writes the table over all seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib
import numpy as np
import torch

from artefact.metrics import classification_metrics
from training.config import ExportConfig
from training.curve_train import network_at, open_curve
from training.curves import evenly_spaced
from training.data import DataSplits, load_data
from training.engine import evaluate
from training.export.sources import collect_sources
from training.runs import DistillReport, FGEReport, RunDir, SSEReport, SWAReport

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("accuracy", "nll", "ece", "brier")
CPU = torch.device("cpu")


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = ["--dataset", args.dataset, *(["--subset", str(args.subset)] if args.subset else [])]

    def valley(self, *arguments: str | Path | float) -> None:
        """`valley-train ARGUMENTS`, its output in the study's log; raises when it fails."""
        command = [sys.executable, "-m", "training.cli", *map(str, arguments)]
        started = time.monotonic()
        with open(self.args.out / "study.log", "a") as log:
            log.write(f"$ {' '.join(command[2:])}\n")
            log.flush()
            subprocess.run(command, check=True, stdout=log, stderr=log, cwd=ROOT)
        print(f"  {arguments[0]} {arguments[-1] if arguments[-1] != '--resume' else arguments[-2]}: "
              f"{time.monotonic() - started:.0f} s", flush=True)

    def train(self, out: Path, epochs: int, seed: int) -> Path:
        if not (out / "report.json").is_file():
            self.valley("train", *self.data, "--model", self.args.model, "--epochs", epochs, "--seed", seed,
                        "--out", out, "--resume")
        return out

    def fge(self, base: Path, out: Path) -> Path:
        if not (out / "report.json").is_file():
            self.valley("fge", "--from", base, "--cycle-epochs", self.args.cycle_epochs, "--lr1", self.args.lr1,
                        "--lr2", self.args.lr2, "--out", out, "--resume")
        return out

    def sse(self, out: Path, epochs: int, seed: int) -> Path:
        if not (out / "report.json").is_file():
            cycles = self.args.sse_cycles_per_budget * epochs // self.args.budget
            self.valley("sse", *self.data, "--model", self.args.model, "--epochs", epochs, "--cycles", cycles,
                        "--lr", self.args.sse_lr, "--seed", seed, "--out", out, "--resume")
        return out

    def swa(self, fge: Path, out: Path) -> Path:
        if not (out / "report.json").is_file():
            self.valley("swa", "--from", fge, "--out", out)
        return out

    def distill(self, teacher: Path, out: Path, temperature: float, seed: int) -> Path:
        if not (out / "report.json").is_file():
            self.valley("distill", "--teacher", teacher, "--temperature", temperature, "--epochs", self.args.budget,
                        "--seed", seed, "--out", out, "--resume")
        return out

    def curve(self, start: Path, end: Path, out: Path, seed: int) -> Path:
        if not (out / "report.json").is_file():
            self.valley("curve", "--start", start, "--end", end, "--epochs", self.args.budget, "--seed", seed,
                        "--out", out, "--resume")
        return out


def _row(metrics: Any) -> dict[str, float]:
    return {name: float(getattr(metrics, name)) for name in METRICS}


def _probabilities(network: torch.nn.Module, splits: DataSplits) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    val, test = evaluate(network, splits.val, splits, CPU), evaluate(network, splits.test, splits, CPU)
    return val.probabilities, val.labels, test.probabilities, test.labels


def independent(runs: Sequence[Path], splits: DataSplits) -> list[dict[str, dict[str, float]]]:
    """The ensembles of the first 1, 2, ... of `runs` (final networks): val and test metrics of each."""
    # The final networks as the exporter takes an independent ensemble's members (same architecture and data).
    sources = collect_sources(ExportConfig(runs=list(runs), name="independent", repository=Path("/nonexistent")))
    outputs = [_probabilities(member.build(splits), splits) for member in sources.members]
    results = []
    for count in range(1, len(runs) + 1):
        val = np.mean([output[0] for output in outputs[:count]], axis=0)
        test = np.mean([output[2] for output in outputs[:count]], axis=0)
        results.append({"val": _row(classification_metrics(val, outputs[0][1])),
                         "test": _row(classification_metrics(test, outputs[0][3]))})
    return results


def curve_ensemble(curve_dir: Path, points: int) -> dict[str, dict[str, float]]:
    trained = open_curve(curve_dir, "cpu")
    outputs = [_probabilities(network_at(trained.curve, t, trained.splits, trained.batch_size, CPU), trained.splits)
               for t in evenly_spaced(points)]
    val = np.mean([output[0] for output in outputs], axis=0)
    test = np.mean([output[2] for output in outputs], axis=0)
    return {"val": _row(classification_metrics(val, outputs[0][1])),
            "test": _row(classification_metrics(test, outputs[0][3]))}


def run_seed(study: Study, seed: int) -> dict[str, dict[str, Any]]:
    """Every method of one seed: {method: {"cost": budgets, "val": metrics, "test": metrics, ...}}."""
    args, folder = study.args, study.args.out / f"seed-{seed}"
    budget = args.budget
    print(f"seed {seed}", flush=True)
    # Ind: three networks of budget B (seeds apart by 1000, so that no two seeds of the study share a network).
    ind = [study.train(folder / f"ind-{k}", budget, 1000 * seed + k) for k in range(3)]
    results: dict[str, dict[str, Any]] = {}
    splits = load_data(RunDir(ind[0]).read_config().data)
    for count, metrics in enumerate(independent(ind, splits), start=1):
        results[f"Ind {count}"] = {"method": "Ind", "cost": count, **metrics}
    for multiple in (1, 2, 3):
        epochs = multiple * budget
        # FGE of budget mB: a base run of mB epochs (the first Ind network for m = 1), cycles in its last 20 %.
        base = ind[0] if multiple == 1 else study.train(folder / f"base-{multiple}B", epochs, 1000 * seed)
        fge = study.fge(base, folder / f"fge-{multiple}B")
        report = RunDir(fge).read_report(FGEReport)
        results[f"FGE {multiple}B"] = {"method": "FGE", "cost": multiple, "members": len(report.members),
                                       "val": _row(report.ensembles[-1].val), "test": _row(report.ensembles[-1].test)}
        swa = RunDir(study.swa(fge, folder / f"swa-{multiple}B")).read_report(SWAReport)
        results[f"SWA {multiple}B"] = {"method": "SWA", "cost": multiple, "val": _row(swa.val),
                                       "test": _row(swa.test)}
        sse = RunDir(study.sse(folder / f"sse-{multiple}B", epochs, 1000 * seed)).read_report(SSEReport)
        results[f"SSE {multiple}B"] = {"method": "SSE", "cost": multiple, "members": len(sse.members),
                                       "val": _row(sse.ensembles[-1].val), "test": _row(sse.ensembles[-1].test)}
    # The distilled student of FGE at budget B: the temperature with the lowest validation NLL.
    students = [RunDir(study.distill(folder / "fge-1B", folder / f"distill-T{temperature:g}", temperature,
                                     1000 * seed)).read_report(DistillReport) for temperature in args.temperatures]
    chosen = min(students, key=lambda student: student.val.nll if student.val else float("inf"))
    results["Distilled"] = {"method": "Distilled", "cost": 2, "temperature": chosen.config.temperature,
                            "val": _row(chosen.val), "test": _row(chosen.test)}
    curve = study.curve(ind[0], ind[1], folder / "curve", 1000 * seed)
    results["Curve"] = {"method": "Curve", "cost": 3, "points": args.curve_points,
                        **curve_ensemble(curve, args.curve_points)}
    return results


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over the seeds of every model's test (and validation) metrics."""
    models = next(iter(per_seed.values())).keys()
    summary: dict[str, dict[str, Any]] = {}
    for model in models:
        entries = [results[model] for results in per_seed.values()]
        summary[model] = {"method": entries[0]["method"], "cost": entries[0]["cost"], "seeds": len(entries)}
        for split in ("test", "val"):
            for name in METRICS:
                values = [entry[split][name] for entry in entries]
                summary[model][f"{split}_{name}"] = mean(values)
                summary[model][f"{split}_{name}_std"] = stdev(values) if len(values) > 1 else 0.0
    return summary


def table(summary: dict[str, dict[str, Any]], metric: str) -> str:
    """Rows by method, columns by budget (the paper's layout): test `metric`, mean +- std over the seeds."""
    scale, unit = (100.0, " %") if metric in ("accuracy", "ece") else (1.0, "")
    lines = [f"| test {metric}{unit} | 1B | 2B | 3B |", "|---|---:|---:|---:|"]
    methods: dict[str, dict[int, str]] = {}
    for entry in summary.values():
        value = entry[f"test_{metric}"] * scale
        spread = entry[f"test_{metric}_std"] * scale
        digits = 2 if scale == 100.0 else 4
        methods.setdefault(entry["method"], {})[entry["cost"]] = f"{value:.{digits}f} +- {spread:.{digits}f}"
    for method, cells in methods.items():
        lines.append(f"| {method} | " + " | ".join(cells.get(cost, "") for cost in (1, 2, 3)) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    methods: dict[str, list[tuple[int, float, float, float, float]]] = {}
    for entry in summary.values():
        methods.setdefault(entry["method"], []).append(
            (entry["cost"], 100 * (1 - entry["test_accuracy"]), 100 * entry["test_accuracy_std"], entry["test_nll"],
             entry["test_nll_std"]))
    for method, points in methods.items():
        points.sort()
        costs = [point[0] for point in points]
        style = "o-" if len(points) > 1 else "s"
        axes[0].errorbar(costs, [p[1] for p in points], yerr=[p[2] for p in points], fmt=style, capsize=3,
                         label=method)
        axes[1].errorbar(costs, [p[3] for p in points], yerr=[p[4] for p in points], fmt=style, capsize=3,
                         label=method)
    for axis, label in ((axes[0], "test error (%)"), (axes[1], "test NLL")):
        axis.set_xlabel("training budget (multiples of B)")
        axis.set_ylabel(label)
        axis.set_xticks([1, 2, 3])
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    figure.suptitle("Ensembles at equal training budget (mean and std over seeds)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--subset", type=int, help="training images used (of each split at most; default all)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--budget", type=int, default=24, help="B: the epochs that train one network")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cycle-epochs", type=int, default=1, help="FGE cycle length")
    parser.add_argument("--lr1", type=float, default=0.01)
    parser.add_argument("--lr2", type=float, default=0.0005)
    parser.add_argument("--sse-cycles-per-budget", type=int, default=4, help="SSE cycles per B of budget")
    parser.add_argument("--sse-lr", type=float, default=0.05)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0],
                        help="distillation temperatures tried, chosen on validation")
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/comparison")
    args = parser.parse_args()
    if args.budget < 1 or args.budget % args.sse_cycles_per_budget:
        parser.error(f"--budget must be a positive multiple of --sse-cycles-per-budget ({args.sse_cycles_per_budget})")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(Study(args), seed)
        (args.out / f"seed-{seed}" / "results.json").write_text(json.dumps(per_seed[seed], indent=2) + "\n")
    summary = summarise(per_seed)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "summary": summary,
                                                       "per_seed": per_seed}, indent=2) + "\n")
    plot(summary, args.out / "comparison.png")
    for metric in METRICS:
        print(table(summary, metric) + "\n")
    print(f"{len(args.seeds)} seeds in {(time.monotonic() - started) / 3600:.1f} h; {args.out / 'results.json'}, "
          f"{args.out / 'comparison.png'}")


if __name__ == "__main__":
    main()
