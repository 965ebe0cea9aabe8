"""Training one network with the paper's base schedule: `valley-train train`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from training import checkpoint
from training.config import TrainConfig
from training.data import DatasetInfo, DataSplits, load_splits, make_batches
from training.engine import LAST_CHECKPOINT, Trainer, evaluate, resolve_device
from training.errors import UsageError
from training.models import Classifier, create_model
from training.schedules import BaseSchedule

log = logging.getLogger(__name__)

REPORT_FORMAT = "valley.report/1"


def build_model(name: str, info: DatasetInfo, device: torch.device) -> Classifier:
    model = create_model(name, info.num_classes, info.in_channels, info.image_size, info.mean, info.std)
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def load_data(config: TrainConfig) -> DataSplits:
    data = config.data
    return load_splits(data.dataset, data.data_dir, data.val_size, data.subset, data.download, data.image_size)


def read_run_config(run: Path) -> TrainConfig:
    """The training configuration of a base run, or of the base run an FGE run started from."""
    path = run / "config.json"
    if not path.is_file():
        raise UsageError(f"{run} is not a run directory (no config.json): pass the --out of `valley-train train`")
    payload = json.loads(path.read_text())
    return TrainConfig.model_validate(payload.get("base", payload))


def fge_start_epoch(epochs: int) -> int:
    """The epoch FGE starts from by default: 80% of the base budget."""
    return max(1, round(0.8 * epochs))


def train_network(config: TrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train one network into `run_dir` (or continue it with `resume`); returns the report."""
    if not resume and (run_dir / "checkpoints" / LAST_CHECKPOINT).exists():
        raise UsageError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    device = resolve_device(config.device)
    splits = load_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.info, device)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    iterations = len(make_batches(splits.train, splits.info, config.data.batch_size, train=True))
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=config.lr, budget_epochs=config.epochs)
    resolved = config.model_dump(mode="json")
    trainer = Trainer(
        run_dir=run_dir, model=model, model_name=config.model, optimizer=optimizer, schedule=schedule,
        splits=splits, batch_size=config.data.batch_size, seed=config.seed, device=device, config=resolved,
        keep_epochs={*config.save_epochs, fge_start_epoch(config.epochs)}, workers=config.data.workers,
    )
    if resume and not trainer.resume():
        log.info("nothing to resume in %s: starting afresh", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(run_dir / "config.json", resolved)
    started = time.perf_counter()
    trainer.fit(config.epochs)
    seconds = time.perf_counter() - started
    val_metrics = evaluate(model, splits.val, splits, device).metrics if len(splits.val) else None
    test_metrics = evaluate(model, splits.test, splits, device).metrics
    report = {
        "format": REPORT_FORMAT,
        "kind": "train",
        "config": resolved,
        "dataset": {"name": splits.info.name, "classes": list(splits.info.classes),
                    "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                    "preprocessing": splits.info.preprocessing()},
        "model": {"name": config.model, "parameters": sum(p.numel() for p in model.parameters())},
        "device": str(device),
        "epochs": config.epochs,
        "train_seconds_this_process": round(seconds, 2),
        "train_seconds_total": round(sum(r["seconds"] for r in trainer.history), 2),
        "val": val_metrics.model_dump() if val_metrics else None,
        "test": test_metrics.model_dump(),
    }
    checkpoint.write_json(run_dir / "report.json", report)
    return report
