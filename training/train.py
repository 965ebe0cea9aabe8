"""Training one network with the paper's base schedule: `valley-train train`; and the steps every run that trains a
network from scratch shares (snapshot ensembles and distilled students too)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training import distributed
from training.config import DistillRunConfig, SSERunConfig, TrainConfig, fge_start_epoch
from training.data import DataSplits, load_data, make_batches
from training.engine import Trainer, build_model, evaluate, make_optimizer, resolve_device
from training.errors import UsageError
from training.init import load_initial_weights
from training.runs import DatasetSummary, ModelSummary, RunDir, TrainReport
from training.schedules import BaseSchedule

log = logging.getLogger(__name__)

# The configurations of runs that train a network from scratch: a base run, a snapshot ensemble, a student.
RunConfig = TrainConfig | SSERunConfig | DistillRunConfig


@dataclass(frozen=True)
class Start:
    """A run that trains a network from scratch, before its network exists: its directory, device and data."""

    run: RunDir
    device: torch.device
    splits: DataSplits


def start_run(out: Path, base: TrainConfig, resume: bool) -> Start:
    """Refuse to overwrite a run without `resume`, join the process group (under torchrun) and load the data."""
    run = RunDir(out)
    if not resume and run.last_checkpoint.exists():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    device = distributed.setup(resolve_device(base.device), base.data.batch_size)
    return Start(run, device, load_data(base.data))


def new_network(base: TrainConfig, start: Start) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """The network seeded with `base.seed` (its weights read from `base.init` where given), its optimizer, and the
    training batches per epoch."""
    splits = start.splits
    torch.manual_seed(base.seed)
    model = build_model(base.model, splits.info, start.device)
    if base.init is not None:
        load_initial_weights(model, base.init, base.reset_head)
    optimizer = make_optimizer(model, base.lr, base.momentum, base.weight_decay)
    iterations = len(make_batches(splits.train, splits.info, base.data.batch_size, train=True))
    return model, optimizer, iterations


def fit_to_end(trainer: Trainer, config: RunConfig, epochs: int, resume: bool) -> float:
    """Continue from the run's last checkpoint with `resume` (or start afresh), record the configuration and train
    for `epochs`; the seconds this process trained."""
    if resume and not trainer.resume():
        log.info("nothing to resume in %s: starting afresh", trainer.run.path)
    if distributed.is_main():
        trainer.run.write_config(config)
    started = time.perf_counter()
    trainer.fit(epochs)
    return time.perf_counter() - started


def summaries(splits: DataSplits, model_name: str, model: nn.Module) -> tuple[DatasetSummary, ModelSummary]:
    """What a report says of the data and the network."""
    info = splits.info
    return (DatasetSummary(name=info.name, classes=list(info.classes), train=len(splits.train), val=len(splits.val),
                           test=len(splits.test), preprocessing=info.preprocessing()),
            ModelSummary(name=model_name, parameters=sum(p.numel() for p in model.parameters())))


def train_network(config: TrainConfig, run_dir: Path, resume: bool = False) -> TrainReport:
    """Train one network into `run_dir` (or continue it with `resume`); returns the report it also writes."""
    start = start_run(run_dir, config, resume)
    run, device, splits = start.run, start.device, start.splits
    model, optimizer, iterations = new_network(config, start)
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=config.lr, budget_epochs=config.epochs)
    trainer = Trainer(
        run=run, model=model, model_name=config.model, optimizer=optimizer, schedule=schedule,
        splits=splits, batch_size=config.data.batch_size, seed=config.seed, device=device,
        config=config.model_dump(mode="json"), keep_epochs={*config.save_epochs, fge_start_epoch(config.epochs)},
        workers=config.data.workers,
    )
    seconds = fit_to_end(trainer, config, config.epochs, resume)
    val_metrics = evaluate(model, splits.val, splits, device).metrics if len(splits.val) else None
    test_metrics = evaluate(model, splits.test, splits, device).metrics
    dataset, network = summaries(splits, config.model, model)
    report = TrainReport(
        config=config,
        dataset=dataset,
        model=network,
        device=str(device),
        epochs=config.epochs,
        train_seconds_this_process=round(seconds, 2),
        train_seconds_total=round(sum(record["seconds"] for record in trainer.history), 2),
        val=val_metrics,
        test=test_metrics,
    )
    if distributed.is_main():
        run.write_report(report)
    return report
