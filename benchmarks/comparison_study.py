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

Every model is scored from its members' logits: the mean of their probabilities as trained, and again at one
temperature fitted on the validation split (the calibrated NLL that Ashukha et al. 2020 compare ensembles on).
Every choice (distillation temperature, calibration temperature) is made on the validation split; the test split
is read once per model, for the table. Each run lives in `--out/seed-S/...` and is resumed where it stopped
(`--resume`), so the study can be interrupted and started again with the same command. At the end it writes
`results.json` and `tables.md` (rows by method, columns by budget; mean +- standard deviation over the seeds;
as trained and calibrated) and draws `comparison.png`.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import matplotlib
import numpy as np
import torch

from artefact.metrics import classification_metrics
from training.calibrate import fit_temperature, tempered_ensemble_probabilities
from training.config import ExportConfig
from training.curve_train import network_at, open_curve
from training.curves import evenly_spaced
from training.data import DataSplits, load_data
from training.engine import predict_logits
from training.export.sources import collect_sources
from training.runs import DistillReport, RunDir

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


@dataclass
class Logits:
    """Every member's logits on the validation and test splits: [N, K, C] each, with the labels."""

    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray

    @property
    def members(self) -> int:
        return int(self.val.shape[1])

    def first(self, count: int) -> Logits:
        return Logits(self.val[:, :count], self.val_labels, self.test[:, :count], self.test_labels)


def logits_of(networks: Iterable[torch.nn.Module], splits: DataSplits) -> Logits:
    val, test = [], []
    for network in networks:
        val.append(predict_logits(network, splits.val, splits, CPU))
        test.append(predict_logits(network, splits.test, splits, CPU))
    return Logits(np.stack([v[0] for v in val], axis=1), val[0][1], np.stack([t[0] for t in test], axis=1),
                  test[0][1])


def scored(logits: Logits) -> dict[str, Any]:
    """The ensemble's (mean of the members' probabilities) val and test metrics as trained, and `calibrated`: the
    same at the temperature fitted on the validation split (Ashukha et al. 2020 compare ensembles so)."""
    temperature = fit_temperature(logits.val, logits.val_labels)

    def at(value: float) -> dict[str, dict[str, float]]:
        return {"val": _row(classification_metrics(tempered_ensemble_probabilities(logits.val, value),
                                                   logits.val_labels)),
                "test": _row(classification_metrics(tempered_ensemble_probabilities(logits.test, value),
                                                    logits.test_labels))}

    return {**at(1.0), "calibrated": {"temperature": temperature, **at(temperature)}}


def run_logits(runs: Sequence[Path], splits: DataSplits) -> Logits:
    """The logits of the runs' networks as the exporter takes them: an FGE or SSE run's snapshots, an SWA or
    distilled run's network, a base run's final network."""
    sources = [collect_sources(ExportConfig(runs=[run], name="study", repository=Path("/nonexistent")))
               for run in runs]
    return logits_of((member.build(splits) for source in sources for member in source.members), splits)


def curve_networks(curve_dir: Path, points: int) -> tuple[Iterator[torch.nn.Module], DataSplits]:
    trained = open_curve(curve_dir, "cpu")
    return (network_at(trained.curve, t, trained.splits, trained.batch_size, CPU)
            for t in evenly_spaced(points)), trained.splits


def _val_nll(report: DistillReport) -> float:
    return report.val.nll if report.val is not None else float("inf")


def run_seed(study: Study, seed: int) -> dict[str, dict[str, Any]]:
    """Every method of one seed: {method: {"cost": budgets, "val": metrics, "test": metrics, "calibrated": ...}}."""
    args, folder = study.args, study.args.out / f"seed-{seed}"
    budget = args.budget
    print(f"seed {seed}", flush=True)
    # Ind: three networks of budget B (seeds apart by 1000, so that no two seeds of the study share a network).
    ind = [study.train(folder / f"ind-{k}", budget, 1000 * seed + k) for k in range(3)]
    results: dict[str, dict[str, Any]] = {}
    splits = load_data(RunDir(ind[0]).read_config().data)
    independent = run_logits(ind, splits)
    for count in range(1, len(ind) + 1):
        results[f"Ind {count}"] = {"method": "Ind", "cost": count, **scored(independent.first(count))}
    for multiple in (1, 2, 3):
        epochs = multiple * budget
        # FGE of budget mB: a base run of mB epochs (the first Ind network for m = 1), cycles in its last 20 %.
        base = ind[0] if multiple == 1 else study.train(folder / f"base-{multiple}B", epochs, 1000 * seed)
        fge = study.fge(base, folder / f"fge-{multiple}B")
        snapshots = run_logits([fge], splits)
        results[f"FGE {multiple}B"] = {"method": "FGE", "cost": multiple, "members": snapshots.members,
                                       **scored(snapshots)}
        swa = study.swa(fge, folder / f"swa-{multiple}B")
        results[f"SWA {multiple}B"] = {"method": "SWA", "cost": multiple,
                                       **scored(run_logits([swa], splits))}
        sse = study.sse(folder / f"sse-{multiple}B", epochs, 1000 * seed)
        snapshots = run_logits([sse], splits)
        results[f"SSE {multiple}B"] = {"method": "SSE", "cost": multiple, "members": snapshots.members,
                                       **scored(snapshots)}
    # The distilled student of FGE at budget B: the temperature with the lowest validation NLL.
    students = [study.distill(folder / "fge-1B", folder / f"distill-T{temperature:g}", temperature, 1000 * seed)
                for temperature in args.temperatures]
    reports = [RunDir(student).read_report(DistillReport) for student in students]
    chosen = min(range(len(students)), key=lambda k: _val_nll(reports[k]))
    results["Distilled"] = {"method": "Distilled", "cost": 2, "temperature": reports[chosen].config.temperature,
                            **scored(run_logits([students[chosen]], splits))}
    curve = study.curve(ind[0], ind[1], folder / "curve", 1000 * seed)
    points, curve_splits = curve_networks(curve, args.curve_points)
    results["Curve"] = {"method": "Curve", "cost": 3, "points": args.curve_points,
                        **scored(logits_of(points, curve_splits))}
    return results


def _get(entry: dict[str, Any], path: Sequence[str]) -> dict[str, float]:
    for key in path:
        entry = entry[key]
    return entry


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over the seeds of every model's test (and validation) metrics."""
    models = next(iter(per_seed.values())).keys()
    summary: dict[str, dict[str, Any]] = {}
    for model in models:
        entries = [results[model] for results in per_seed.values()]
        summary[model] = {"method": entries[0]["method"], "cost": entries[0]["cost"], "seeds": len(entries)}
        for key, split in (("test", ("test",)), ("val", ("val",)), ("calibrated_test", ("calibrated", "test"))):
            for name in METRICS:
                values = [_get(entry, split)[name] for entry in entries]
                summary[model][f"{key}_{name}"] = mean(values)
                summary[model][f"{key}_{name}_std"] = stdev(values) if len(values) > 1 else 0.0
        temperatures = [entry["calibrated"]["temperature"] for entry in entries]
        summary[model]["temperature"] = mean(temperatures)
    return summary


def table(summary: dict[str, dict[str, Any]], metric: str, key: str = "test") -> str:
    """Rows by method, columns by budget (the paper's layout): `key` ("test" or "calibrated_test") `metric`, mean +-
    std over the seeds."""
    scale, unit = (100.0, " %") if metric in ("accuracy", "ece") else (1.0, "")
    lines = [f"| {key.replace('_', ' ')} {metric}{unit} | 1B | 2B | 3B |", "|---|---:|---:|---:|"]
    methods: dict[str, dict[int, str]] = {}
    for entry in summary.values():
        value = entry[f"{key}_{metric}"] * scale
        spread = entry[f"{key}_{metric}_std"] * scale
        digits = 2 if scale == 100.0 else 4
        methods.setdefault(entry["method"], {})[entry["cost"]] = f"{value:.{digits}f} +- {spread:.{digits}f}"
    for method, cells in methods.items():
        lines.append(f"| {method} | " + " | ".join(cells.get(cost, "") for cost in (1, 2, 3)) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    panels = (("test_accuracy", "test error (%)"), ("test_nll", "test NLL"),
              ("calibrated_test_nll", "test NLL, temperature fitted on val"))
    methods: dict[str, list[dict[str, Any]]] = {}
    for entry in summary.values():
        methods.setdefault(entry["method"], []).append(entry)
    for method, entries in methods.items():
        entries.sort(key=lambda entry: entry["cost"])
        costs = [entry["cost"] for entry in entries]
        style = "o-" if len(entries) > 1 else "s"
        for axis, (key, _) in zip(axes, panels, strict=True):
            values = [entry[key] for entry in entries]
            if key == "test_accuracy":
                values = [100 * (1 - value) for value in values]
            spread = [entry[f"{key}_std"] * (100 if key == "test_accuracy" else 1) for entry in entries]
            axis.errorbar(costs, values, yerr=spread, fmt=style, capsize=3, label=method)
    for axis, (_, label) in zip(axes, panels, strict=True):
        axis.set_xlabel("training budget (multiples of B)")
        axis.set_ylabel(label)
        axis.set_xticks([1, 2, 3])
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
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
    tables = [table(summary, metric) for metric in METRICS]
    tables += [table(summary, metric, "calibrated_test") for metric in METRICS]
    (args.out / "tables.md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables) + "\n")
    print(f"{len(args.seeds)} seeds in {(time.monotonic() - started) / 3600:.1f} h; {args.out / 'results.json'}, "
          f"{args.out / 'tables.md'}, {args.out / 'comparison.png'}")


if __name__ == "__main__":
    main()
