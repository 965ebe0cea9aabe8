"""Fast Geometric Ensembling (Garipov et al. 2018): `valley-train fge`.

Starts from a base run's checkpoint (80% of its budget by default, momentum included), runs
the cyclic schedule for K cycles of c epochs and keeps a snapshot at each cycle's lowest
learning rate. Every member and every ensemble prefix is then evaluated, next to the single
network that the base run trained for its whole budget (the equal-budget baseline).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from training import checkpoint
from training.base import REPORT_FORMAT, build_model, fge_start_epoch, load_data, make_optimizer, read_run_config
from training.config import FGEConfig, TrainConfig
from training.engine import LAST_CHECKPOINT, Trainer, available_epochs, epoch_checkpoint, evaluate, resolve_device
from training.ensembles import prefix_metrics
from training.errors import UsageError
from training.plots import plot_ensemble_sizes
from training.schedules import FGECycle

log = logging.getLogger(__name__)


def resolve_fge_config(
    base_run: Path, base: TrainConfig, start_epoch: int | None, cycles: int | None, cycle_epochs: int,
    lr1: float, lr2: float, seed: int | None, device: str,
) -> FGEConfig:
    """Fill the defaults: start at 80% of the base budget and spend the rest of it on cycles."""
    start = fge_start_epoch(base.epochs) if start_epoch is None else start_epoch
    if cycle_epochs < 1:
        raise UsageError(f"--cycle-epochs must be >= 1, got {cycle_epochs}")
    if cycles is None:
        cycles = (base.epochs - start) // cycle_epochs
        if cycles < 1:
            raise UsageError(
                f"the base budget leaves {base.epochs - start} epochs after epoch {start}, less than one "
                f"{cycle_epochs}-epoch cycle: pass --cycles K explicitly or an earlier --start-epoch"
            )
    if lr2 > lr1:
        log.warning("--lr2 %g is above --lr1 %g: snapshots are taken at lr2, usually the low one", lr2, lr1)
    return FGEConfig(base_run=base_run, start_epoch=start, cycles=cycles, cycle_epochs=cycle_epochs,
                     lr1=lr1, lr2=lr2, seed=base.seed if seed is None else seed, device=device)


def run_fge(
    base_run: Path, out: Path, start_epoch: int | None = None, cycles: int | None = None, cycle_epochs: int = 2,
    lr1: float = 0.01, lr2: float = 0.0005, seed: int | None = None, device: str = "auto", resume: bool = False,
) -> dict[str, Any]:
    """Run FGE from `base_run` into `out`; returns (and writes) the report."""
    base = read_run_config(base_run)
    if (base_run / "snapshots").is_dir():
        raise UsageError(f"{base_run} is an FGE run: pass the base run it started from")
    config = resolve_fge_config(base_run, base, start_epoch, cycles, cycle_epochs, lr1, lr2, seed, device)
    start_path = epoch_checkpoint(base_run, config.start_epoch)
    if not start_path.is_file():
        have = ", ".join(map(str, available_epochs(base_run))) or "none"
        raise UsageError(
            f"{base_run} has no checkpoint for epoch {config.start_epoch} (it has: {have}): pass --start-epoch "
            f"with one of those, or train the base run with --save-epoch {config.start_epoch}"
        )
    if not resume and (out / "checkpoints" / LAST_CHECKPOINT).exists():
        raise UsageError(f"{out} already holds an FGE run: pass --resume to continue it, or choose another --out")

    torch_device = resolve_device(config.device)
    splits = load_data(base)
    model = build_model(base.model, splits.info, torch_device)
    optimizer = make_optimizer(model, config.lr1, base.momentum, base.weight_decay)
    start_state = checkpoint.load(start_path)
    checkpoint.load_model_weights(model, start_state, base.model, start_path)
    optimizer.load_state_dict(start_state["optimizer"])  # momentum buffers carry over, as in the reference
    torch.set_rng_state(start_state["rng"])
    batches_per_epoch = start_state["schedule"]["iterations_per_epoch"]
    schedule = FGECycle(iterations_per_epoch=batches_per_epoch, lr1=config.lr1, lr2=config.lr2,
                        cycle_epochs=config.cycle_epochs)
    resolved = {**config.model_dump(mode="json"), "base": base.model_dump(mode="json")}

    def save_snapshot(trainer: Trainer, epoch: int, iteration: int) -> dict[str, Any]:
        index = len(trainer.snapshots)
        provenance = {
            "index": index,
            "file": f"snapshots/member-{index:02d}.pt",
            "epoch": config.start_epoch + epoch + (iteration + 1) / batches_per_epoch,
            "cycle": epoch // config.cycle_epochs,
            "lr": trainer.schedule.last_lr,
        }
        checkpoint.save_atomic({"model_name": base.model, "model": trainer.model.state_dict(),
                                "provenance": provenance}, out / provenance["file"])
        return provenance

    trainer = Trainer(
        run_dir=out, model=model, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=config.seed, device=torch_device, config=resolved,
        epoch_offset=config.start_epoch, workers=base.data.workers, on_snapshot=save_snapshot,
    )
    if resume:
        trainer.resume()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out / "config.json", resolved)
    started = time.perf_counter()
    trainer.fit(config.cycles * config.cycle_epochs)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    members: list[dict[str, Any]] = []
    test_probabilities, val_probabilities = [], []
    for snapshot in trainer.snapshots:
        path = out / snapshot["file"]
        checkpoint.load_model_weights(model, checkpoint.load(path), base.model, path)
        test = evaluate(model, splits.test, splits, torch_device)
        test_probabilities.append(test.probabilities)
        entry = {**snapshot, "test": test.metrics.model_dump()}
        if len(splits.val):
            val = evaluate(model, splits.val, splits, torch_device)
            val_probabilities.append(val.probabilities)
            entry["val"] = val.metrics.model_dump()
        members.append(entry)
    ensembles: list[dict[str, Any]] = [
        {"size": size, "test": metrics.model_dump()}
        for size, metrics in enumerate(prefix_metrics(test_probabilities, test.labels), start=1)
    ]
    if val_probabilities:
        for entry, metrics in zip(ensembles, prefix_metrics(val_probabilities, val.labels), strict=True):
            entry["val"] = metrics.model_dump()

    report = {
        "format": REPORT_FORMAT,
        "kind": "fge",
        "config": resolved,
        "single": _single_network(base_run, base),
        "start": {"epoch": config.start_epoch},
        "members": members,
        "ensembles": ensembles,
        "device": str(torch_device),
        "train_seconds_this_process": round(train_seconds, 2),
        "train_seconds_total": round(sum(r["seconds"] for r in trainer.history), 2),
        "evaluation_seconds": round(time.perf_counter() - started, 2),
    }
    checkpoint.write_json(out / "report.json", report)
    plot_ensemble_sizes(report, out / "plots" / "ensemble_size.png")
    return report


def _single_network(base_run: Path, base: TrainConfig) -> dict[str, Any] | None:
    """The base run's own result at its full budget: FGE's equal-budget competitor."""
    path = base_run / "report.json"
    if not path.is_file():
        log.warning("%s has no report.json (unfinished?): the report has no single-network baseline", base_run)
        return None
    report = json.loads(path.read_text())
    return {"run": str(base_run), "epochs": base.epochs, "test": report["test"], "val": report.get("val")}


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text table: the single network, then FGE ensembles of 1..K members (test split)."""
    rows = ["| model | members | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|---|"]

    def row(name: str, size: int, metrics: dict[str, float]) -> str:
        return (f"| {name} | {size} | {100 * metrics['accuracy']:.2f} | {metrics['nll']:.4f} | "
                f"{100 * metrics['ece']:.2f} | {metrics['brier']:.4f} |")

    if report.get("single"):
        rows.append(row(f"single ({report['single']['epochs']} epochs)", 1, report["single"]["test"]))
    rows.extend(row("FGE", entry["size"], entry["test"]) for entry in report["ensembles"])
    return "\n".join(rows)
