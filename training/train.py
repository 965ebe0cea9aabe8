"""Training one network with the paper's base schedule: `valley-train train`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from training import distributed
from training.config import TrainConfig, fge_start_epoch
from training.data import load_data, make_batches
from training.engine import Trainer, build_model, evaluate, make_optimizer, resolve_device
from training.errors import UsageError
from training.runs import DatasetSummary, ModelSummary, RunDir, TrainReport
from training.schedules import BaseSchedule

log = logging.getLogger(__name__)


def train_network(config: TrainConfig, run_dir: Path, resume: bool = False) -> TrainReport:
    """Train one network into `run_dir` (or continue it with `resume`); returns the report it also writes."""
    run = RunDir(run_dir)
    if not resume and run.last_checkpoint.exists():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    device = distributed.setup(resolve_device(config.device), config.data.batch_size)
    splits = load_data(config.data)
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.info, device)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    iterations = len(make_batches(splits.train, splits.info, config.data.batch_size, train=True))
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=config.lr, budget_epochs=config.epochs)
    trainer = Trainer(
        run=run, model=model, model_name=config.model, optimizer=optimizer, schedule=schedule,
        splits=splits, batch_size=config.data.batch_size, seed=config.seed, device=device,
        config=config.model_dump(mode="json"), keep_epochs={*config.save_epochs, fge_start_epoch(config.epochs)},
        workers=config.data.workers,
    )
    if resume and not trainer.resume():
        log.info("nothing to resume in %s: starting afresh", run_dir)
    if distributed.is_main():
        run.write_config(config)
    started = time.perf_counter()
    trainer.fit(config.epochs)
    seconds = time.perf_counter() - started
    val_metrics = evaluate(model, splits.val, splits, device).metrics if len(splits.val) else None
    test_metrics = evaluate(model, splits.test, splits, device).metrics
    info = splits.info
    report = TrainReport(
        config=config,
        dataset=DatasetSummary(name=info.name, classes=list(info.classes), train=len(splits.train),
                               val=len(splits.val), test=len(splits.test), preprocessing=info.preprocessing()),
        model=ModelSummary(name=config.model, parameters=sum(p.numel() for p in model.parameters())),
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
