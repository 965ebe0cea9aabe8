"""Equal-budget study: single networks vs FGE, hyperparameters chosen on validation only.

For every seed it trains a base run of B epochs (the single network), then runs FGE from
each base run's 80% checkpoint for every (cycle length, lr1, lr2) in the grid. The FGE
configuration with the lowest mean *validation* NLL is selected; only then are test
numbers read. Runs are processes of `valley-train` (several at once with --jobs), and a
finished run is not redone, so the study can be stopped and restarted.

    python benchmarks/fge_study.py --out runs/study --epochs 80 --seeds 0 1 2 \
        --cycle-epochs 2 4 --lrs 0.01:0.001 0.02:0.002 --jobs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

from tqdm import tqdm

from artefact.manifest import Metrics
from training.plots import plot_ensemble_sizes
from training.runs import FGEReport, RunDir, SingleNetwork, TrainReport

METRICS = ("accuracy", "nll", "ece", "brier")


def run_all(commands: list[tuple[Path, list[str]]], jobs: int, desc: str) -> None:
    """Run the `valley-train` commands whose run has no report yet, `jobs` at a time."""
    pending = [(out, args) for out, args in commands if not RunDir(out).report_file.is_file()]
    threads = str(max(1, (os.cpu_count() or 2) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def run(item: tuple[Path, list[str]]) -> None:
        out, args = item
        out.parent.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if RunDir(out).checkpoints.is_dir() else []
        with open(out.parent / f"{out.name}.log", "a") as log:
            subprocess.run([sys.executable, "-m", "training.cli", *args, "--out", str(out), *resume],
                           stdout=log, stderr=subprocess.STDOUT, env=env, check=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(tqdm(pool.map(run, pending), total=len(pending), desc=desc, unit="run"))


def mean_metrics(entries: list[Metrics]) -> Metrics:
    """The mean of each metric over runs evaluated on the same images."""
    means = {key: mean(getattr(entry, key) for entry in entries) for key in METRICS}
    return Metrics(**means, count=entries[0].count)


def summary(metrics: Metrics) -> dict[str, float]:
    """The metrics study.json records (the image count is the dataset's, not a result)."""
    return metrics.model_dump(include=set(METRICS))


def required_val(metrics: Metrics | None) -> Metrics:
    """Validation metrics: the study selects on them, so every run needs a validation split."""
    if metrics is None:
        raise SystemExit("fge_study: a run has no validation split; the study selects on it (do not pass --val-size 0)")
    return metrics


def row(name: str, metrics: Metrics) -> str:
    return (f"| {name} | {100 * metrics.accuracy:.2f} | {metrics.nll:.4f} | {100 * metrics.ece:.2f} | "
            f"{metrics.brier:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cycle-epochs", type=int, nargs="+", default=[2])
    parser.add_argument("--lrs", nargs="+", default=["0.01:0.001"], help="lr1:lr2 pairs")
    parser.add_argument("--subset", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()

    common = ["--dataset", args.dataset, *(["--subset", str(args.subset)] if args.subset else []),
              *(["--data-dir", str(args.data_dir)] if args.data_dir else [])]
    bases = {seed: args.out / f"base-b{args.epochs}-s{seed}" for seed in args.seeds}
    run_all([(out, ["train", *common, "--model", args.model, "--epochs", str(args.epochs), "--lr", str(args.lr),
                    "--seed", str(seed), "--device", args.device]) for seed, out in bases.items()],
            args.jobs, "base runs")

    grid = [(c, *map(float, pair.split(":"))) for c in args.cycle_epochs for pair in args.lrs]
    fge_runs: dict[tuple[int, float, float], dict[int, Path]] = {}
    commands = []
    for c, lr1, lr2 in grid:
        for seed, base in bases.items():
            out = args.out / f"fge-b{args.epochs}-s{seed}-c{c}-lr{lr1:g}-{lr2:g}"
            fge_runs.setdefault((c, lr1, lr2), {})[seed] = out
            commands.append((out, ["fge", "--from", str(base), "--cycle-epochs", str(c), "--lr1", str(lr1),
                                   "--lr2", str(lr2), "--device", args.device]))
    run_all(commands, args.jobs, "FGE runs")

    base_reports = {seed: RunDir(out).read_report(TrainReport) for seed, out in bases.items()}
    fge_reports = {key: {seed: RunDir(out).read_report(FGEReport) for seed, out in runs.items()}
                   for key, runs in fge_runs.items()}

    validation = {key: mean_metrics([required_val(r.ensembles[-1].val) for r in reports.values()])
                  for key, reports in fge_reports.items()}
    chosen = min(validation, key=lambda key: (validation[key].nll, -validation[key].accuracy))

    single_test = mean_metrics([r.test for r in base_reports.values()])
    single_val = mean_metrics([required_val(r.val) for r in base_reports.values()])
    chosen_test = mean_metrics([r.ensembles[-1].test for r in fge_reports[chosen].values()])
    c, lr1, lr2 = chosen
    members = len(next(iter(fge_reports[chosen].values())).ensembles)
    lines = [
        f"Budget {args.epochs} epochs, {args.model} on {args.dataset}, seeds {args.seeds}; "
        f"FGE from epoch {round(0.8 * args.epochs)}. Chosen on validation NLL: c={c}, lr1={lr1:g}, lr2={lr2:g} "
        f"({members} members).",
        "",
        "Test split, mean over seeds:",
        "",
        "| model | accuracy % | NLL | ECE % | Brier |",
        "|---|---|---|---|---|",
        row(f"single network, {args.epochs} epochs", single_test),
        row(f"FGE, {members} members", chosen_test),
        "",
        "Per seed (test):",
        "",
        "| model | accuracy % | NLL | ECE % | Brier |",
        "|---|---|---|---|---|",
    ]
    for seed in args.seeds:
        lines.append(row(f"seed {seed}: single", base_reports[seed].test))
        lines.append(row(f"seed {seed}: FGE", fge_reports[chosen][seed].ensembles[-1].test))
    lines += ["", "Validation split, mean over seeds (the selection criterion):", "",
              "| model | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|",
              row("single network", single_val)]
    lines += [row(f"FGE c={k[0]} lr {k[1]:g}->{k[2]:g}", validation[k]) for k in sorted(validation)]
    chosen_reports = list(fge_reports[chosen].values())
    lines += ["", "Test split by ensemble size (chosen FGE configuration, mean over seeds):", "",
              "| model | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|"]
    # The first seed's report with every test metric replaced by the mean over seeds (what the plot shows).
    first = chosen_reports[0]
    mean_report = first.model_copy(update={
        "single": SingleNetwork(run=args.out, epochs=args.epochs, test=single_test, val=single_val),
        "ensembles": [entry.model_copy(update={"test": mean_metrics([r.ensembles[k].test for r in chosen_reports]),
                                               "val": None}) for k, entry in enumerate(first.ensembles)],
        "members": [entry.model_copy(update={"test": mean_metrics([r.members[k].test for r in chosen_reports]),
                                             "val": None}) for k, entry in enumerate(first.members)],
    })
    lines += [row(f"FGE, first {e.size}", e.test) for e in mean_report.ensembles]
    base_seconds = mean(r.train_seconds_total for r in base_reports.values())
    fge_seconds = mean(r.train_seconds_total for r in chosen_reports)
    device = base_reports[args.seeds[0]].device
    lines += ["", f"Training time per seed on {device} (mean): base run {base_seconds:.0f} s for {args.epochs} epochs "
              f"(the single network); FGE {fge_seconds:.0f} s for its {args.epochs - round(0.8 * args.epochs)} epochs "
              "after the base run's 80% checkpoint."]
    plot_ensemble_sizes(mean_report, args.out / "study.png")
    text = "\n".join(lines)
    (args.out / "study.md").write_text(text + "\n")
    (args.out / "study.json").write_text(json.dumps({
        "chosen": {"cycle_epochs": c, "lr1": lr1, "lr2": lr2}, "single_test": summary(single_test),
        "fge_test": summary(chosen_test), "single_val": summary(single_val),
        "validation": {f"c{k[0]}-{k[1]:g}-{k[2]:g}": summary(v) for k, v in validation.items()},
    }, indent=2))
    print(text)


if __name__ == "__main__":
    main()
