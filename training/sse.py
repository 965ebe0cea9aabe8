"""Snapshot ensembles (Huang et al. 2017): `valley-train sse`.

One network trained from scratch for the budget B, its learning rate annealed from lr0 to 0 along a cosine
and restarted M times (`training.schedules.CosineRestarts`, updated every step); the weights at the end of each
cycle are a member. The paper's comparison puts SSE beside FGE and independent networks at the same budget.
The run directory holds snapshots like an FGE run's, so `valley-train export --from SSE_DIR` takes it.
"""

from __future__ import annotations

import time
from pathlib import Path

from training import distributed
from training.config import SSERunConfig, TrainConfig
from training.engine import Trainer
from training.errors import UsageError
from training.plots import plot_ensemble_sizes
from training.runs import SSEReport
from training.schedules import CosineRestarts
from training.snapshots import evaluate_snapshots, snapshot_saver
from training.train import fit_to_end, new_network, start_run, summaries


def resolve_sse_config(base: TrainConfig, cycles: int) -> SSERunConfig:
    """The budget split into `cycles` cycles of whole epochs; a `UsageError` when it does not split evenly."""
    if cycles < 1:
        raise UsageError(f"--cycles must be >= 1, got {cycles}")
    if base.epochs % cycles:
        raise UsageError(f"--epochs {base.epochs} does not split into {cycles} cycles of whole epochs: pass an "
                         f"--epochs that --cycles divides (e.g. {cycles * max(1, base.epochs // cycles)})")
    return SSERunConfig(cycles=cycles, cycle_epochs=base.epochs // cycles, base=base)


def run_sse(config: SSERunConfig, out: Path, resume: bool = False) -> SSEReport:
    """Train a snapshot ensemble into `out` (or continue it with `resume`); returns the report it also writes."""
    base = config.base
    start = start_run(out, base, resume)
    run, device, splits = start.run, start.device, start.splits
    model, optimizer, iterations = new_network(base, start)
    schedule = CosineRestarts(iterations_per_epoch=iterations, lr0=base.lr, cycle_epochs=config.cycle_epochs)
    trainer = Trainer(
        run=run, model=model, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=base.seed, device=device, config=config.model_dump(mode="json"),
        workers=base.data.workers,
        on_snapshot=snapshot_saver(run, base.model, 0, config.cycle_epochs, iterations),
    )
    train_seconds = fit_to_end(trainer, config, base.epochs, resume)

    started = time.perf_counter()
    members, ensembles = evaluate_snapshots(trainer, run, base.model, splits, device)
    dataset, network = summaries(splits, base.model, model)
    report = SSEReport(
        config=config,
        dataset=dataset,
        model=network,
        members=members,
        ensembles=ensembles,
        device=str(device),
        train_seconds_this_process=round(train_seconds, 2),
        train_seconds_total=round(sum(record["seconds"] for record in trainer.history), 2),
        evaluation_seconds=round(time.perf_counter() - started, 2),
    )
    if distributed.is_main():
        run.write_report(report)
        plot_ensemble_sizes(report, run.plot_file)
    return report


def summary_table(report: SSEReport) -> str:
    """A plain-text table: SSE ensembles of 1..M snapshots (test split)."""
    rows = ["| model | members | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|---|"]
    rows.extend(f"| SSE | {entry.size} | {100 * entry.test.accuracy:.2f} | {entry.test.nll:.4f} | "
                f"{100 * entry.test.ece:.2f} | {entry.test.brier:.4f} |" for entry in report.ensembles)
    return "\n".join(rows)
