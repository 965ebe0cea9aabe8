"""Fast Geometric Ensembling (Garipov et al. 2018): `valley-train fge`.

Starts from a base run's checkpoint (80% of its budget by default, momentum included), runs
the cyclic schedule for K cycles of c epochs and keeps a snapshot at each cycle's lowest
learning rate. Every member and every ensemble prefix is then evaluated, next to the single
network that the base run trained for its whole budget (the equal-budget baseline). Or it starts
from a network trained elsewhere (`--init`, `training.init`): no base run, fresh momentum, and the
starting network itself is the baseline the ensemble is measured against.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from artefact.manifest import Metrics
from training import checkpoint, distributed
from training.config import FGEConfig, FGERunConfig, TrainConfig, fge_start_epoch
from training.data import DataSplits, load_data, make_batches
from training.engine import Trainer, build_model, evaluate, make_optimizer, resolve_device
from training.errors import UsageError
from training.init import load_initial_weights
from training.plots import plot_ensemble_sizes
from training.runs import (
    FGEReport,
    RunDir,
    SingleNetwork,
    StartPoint,
    TrainReport,
)
from training.schedules import FGECycle
from training.snapshots import evaluate_snapshots, snapshot_saver

log = logging.getLogger(__name__)

DEFAULT_CYCLES = 4
"""Cycles of an FGE run from weights trained elsewhere, where no base budget says how many are left."""


def resolve_fge_config(config: FGEConfig, base: TrainConfig) -> FGERunConfig:
    """Fill the defaults: start at 80% of the base budget and spend the rest of it on cycles (from weights trained
    elsewhere: `DEFAULT_CYCLES` from epoch 0)."""
    start = fge_start_epoch(base.epochs) if config.start_epoch is None else config.start_epoch
    cycle_epochs, cycles = config.cycle_epochs, config.cycles
    if cycle_epochs < 1:
        raise UsageError(f"--cycle-epochs must be >= 1, got {cycle_epochs}")
    if cycles is not None and cycles < 1:
        raise UsageError(f"--cycles must be >= 1, got {cycles}")
    if cycles is None and config.init is not None:
        cycles = DEFAULT_CYCLES
    if cycles is None:
        cycles = (base.epochs - start) // cycle_epochs
        if cycles < 1:
            raise UsageError(
                f"the base budget leaves {base.epochs - start} epochs after epoch {start}, less than one "
                f"{cycle_epochs}-epoch cycle: pass --cycles K explicitly or an earlier --start-epoch"
            )
    if config.lr2 > config.lr1:
        log.warning("--lr2 %g is above --lr1 %g: snapshots are taken at lr2, usually the low one", config.lr2,
                    config.lr1)
    return FGERunConfig(base_run=config.base_run, start_epoch=start, cycles=cycles, cycle_epochs=cycle_epochs,
                        lr1=config.lr1, lr2=config.lr2, seed=base.seed if config.seed is None else config.seed,
                        device=config.device, base=base)


def run_fge(config: FGEConfig, out: Path, resume: bool = False) -> FGEReport:
    """Run FGE from `config.base_run`, or from the weights of `config.init`, into `out`; returns the report it also
    writes."""
    if (config.base_run is None) == (config.init is None):
        raise UsageError("fge starts from a base run (--from RUN) or from weights trained elsewhere (--init PATH "
                         "--model M --dataset D): give one of them")
    run = RunDir(out)
    if config.init is not None:
        base = config.init
        resolved = resolve_fge_config(config.model_copy(update={"start_epoch": 0}), base)
        start_path = None
    else:
        assert config.base_run is not None
        base_run = RunDir(config.base_run)
        base = base_run.read_config()
        if base_run.is_fge:
            raise UsageError(f"{config.base_run} is an FGE run: pass the base run it started from")
        if not base_run.is_base:
            raise UsageError(f"{config.base_run} is {base_run.kind_in_words} run: FGE starts from a base run "
                             "(`valley-train train --out`)")
        resolved = resolve_fge_config(config, base)
        start_path = base_run.epoch_checkpoint(resolved.start_epoch)
        if not start_path.is_file():
            have = ", ".join(map(str, base_run.available_epochs())) or "none"
            raise UsageError(
                f"{config.base_run} has no checkpoint for epoch {resolved.start_epoch} (it has: {have}): pass "
                f"--start-epoch with one of those, or train the base run with --save-epoch {resolved.start_epoch}"
            )
    if not resume and run.last_checkpoint.exists():
        raise UsageError(f"{out} already holds an FGE run: pass --resume to continue it, or choose another --out")

    torch_device = distributed.setup(resolve_device(resolved.device), base.data.batch_size)
    splits = load_data(base.data)
    model = build_model(base.model, splits.info, torch_device)
    optimizer = make_optimizer(model, resolved.lr1, base.momentum, base.weight_decay)
    if start_path is not None:
        start_state = checkpoint.load(start_path)
        checkpoint.load_model_weights(model, start_state, base.model, start_path)
        optimizer.load_state_dict(start_state["optimizer"])  # momentum buffers carry over, as in the reference
        torch.set_rng_state(start_state["rng"])
        batches_per_epoch = start_state["schedule"]["iterations_per_epoch"]
        single = _single_network(RunDir(config.base_run), base) if config.base_run is not None else None
        start = StartPoint(epoch=resolved.start_epoch)
    else:
        assert base.init is not None
        torch.manual_seed(resolved.seed)
        load_initial_weights(model, base.init, base.reset_head)
        batches_per_epoch = len(make_batches(splits.train, splits.info, base.data.batch_size, train=True))
        single = _starting_network(model, base, splits, torch_device)
        start = StartPoint(epoch=0, weights=base.init)
        log.info("FGE from %s (trained elsewhere): no base run; the starting network is the single-network "
                 "baseline (validation NLL %.4f)", base.init, single.val.nll if single.val else float("nan"))
    schedule = FGECycle(iterations_per_epoch=batches_per_epoch, lr1=resolved.lr1, lr2=resolved.lr2,
                        cycle_epochs=resolved.cycle_epochs)

    trainer = Trainer(
        run=run, model=model, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=resolved.seed, device=torch_device,
        config=resolved.model_dump(mode="json"), epoch_offset=resolved.start_epoch, workers=base.data.workers,
        on_snapshot=snapshot_saver(run, base.model, resolved.start_epoch, resolved.cycle_epochs,
                                   batches_per_epoch),
    )
    if resume:
        trainer.resume()
    if distributed.is_main():
        run.write_config(resolved)
    started = time.perf_counter()
    trainer.fit(resolved.cycles * resolved.cycle_epochs)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    members, ensembles = evaluate_snapshots(trainer, run, base.model, splits, torch_device)
    report = FGEReport(
        config=resolved,
        single=single,
        start=start,
        members=members,
        ensembles=ensembles,
        device=str(torch_device),
        train_seconds_this_process=round(train_seconds, 2),
        train_seconds_total=round(sum(record["seconds"] for record in trainer.history), 2),
        evaluation_seconds=round(time.perf_counter() - started, 2),
    )
    if distributed.is_main():
        run.write_report(report)
        plot_ensemble_sizes(report, run.plot_file)
    return report


def _starting_network(model: torch.nn.Module, base: TrainConfig, splits: DataSplits, device: torch.device
                      ) -> SingleNetwork:
    """The weights FGE starts from, evaluated before any cycle: the baseline of a run from weights trained
    elsewhere."""
    assert base.init is not None
    val = evaluate(model, splits.val, splits, device).metrics if len(splits.val) else None
    return SingleNetwork(run=base.init, epochs=0, test=evaluate(model, splits.test, splits, device).metrics,
                         val=val, trained_elsewhere=True)


def _single_network(base_run: RunDir, base: TrainConfig) -> SingleNetwork | None:
    """The base run's own result at its full budget: FGE's equal-budget competitor."""
    if not base_run.report_file.is_file():
        log.warning("%s has no %s (unfinished?): the report has no single-network baseline", base_run.path,
                    base_run.report_file.name)
        return None
    report = base_run.read_report(TrainReport)
    return SingleNetwork(run=base_run.path, epochs=base.epochs, test=report.test, val=report.val)


def summary_table(report: FGEReport) -> str:
    """A plain-text table: the single network, then FGE ensembles of 1..K members (test split)."""
    rows = ["| model | members | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|---|"]

    def row(name: str, size: int, metrics: Metrics) -> str:
        return (f"| {name} | {size} | {100 * metrics.accuracy:.2f} | {metrics.nll:.4f} | "
                f"{100 * metrics.ece:.2f} | {metrics.brier:.4f} |")

    if report.single:
        name = "start (trained elsewhere)" if report.single.trained_elsewhere else \
            f"single ({report.single.epochs} epochs)"
        rows.append(row(name, 1, report.single.test))
    rows.extend(row("FGE", entry.size, entry.test) for entry in report.ensembles)
    return "\n".join(rows)
