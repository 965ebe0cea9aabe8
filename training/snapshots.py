"""What FGE and snapshot ensembles share: saving a snapshot mid-training, evaluating every snapshot and every
ensemble prefix of a finished run, and reading a finished run's snapshots for what is made of them (SWA, students)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from artefact.manifest import Metrics
from training import checkpoint, distributed
from training.data import DataSplits
from training.engine import Trainer, evaluate
from training.ensembles import prefix_metrics
from training.errors import UsageError
from training.runs import FGEEnsemble, FGEMember, FGEReport, RunDir, SSEReport, snapshot_name


def snapshot_saver(run: RunDir, model_name: str, epoch_offset: int, cycle_epochs: int,
                   batches_per_epoch: int) -> Callable[[Trainer, int, int], dict[str, Any]]:
    """The trainer's `on_snapshot`: write the weights as the next member, return its provenance."""

    def save(trainer: Trainer, epoch: int, iteration: int) -> dict[str, Any]:
        index = len(trainer.snapshots)
        # Plain JSON values: the provenance travels in checkpoints (loaded with weights_only) and into reports.
        provenance = {
            "index": index,
            "file": snapshot_name(index),
            "epoch": epoch_offset + epoch + (iteration + 1) / batches_per_epoch,
            "cycle": epoch // cycle_epochs,
            "lr": trainer.schedule.last_lr,
        }
        if distributed.is_main():
            checkpoint.save_atomic({"model_name": model_name, "model": trainer.model.state_dict(),
                                    "provenance": provenance}, run.snapshot(index))
        return provenance

    return save


def evaluate_snapshots(trainer: Trainer, run: RunDir, model_name: str, splits: DataSplits,
                       device: torch.device) -> tuple[list[FGEMember], list[FGEEnsemble]]:
    """Every snapshot alone, and the ensembles of its first 1..K snapshots, on the test and validation splits."""
    members: list[FGEMember] = []
    test_probabilities, val_probabilities = [], []
    for snapshot in trainer.snapshots:
        path = run.path / snapshot["file"]
        checkpoint.load_model_weights(trainer.model, checkpoint.load(path), model_name, path)
        test = evaluate(trainer.model, splits.test, splits, device)
        test_probabilities.append(test.probabilities)
        val = evaluate(trainer.model, splits.val, splits, device) if len(splits.val) else None
        if val is not None:
            val_probabilities.append(val.probabilities)
        members.append(FGEMember(**snapshot, test=test.metrics, val=val.metrics if val else None))
    test_prefixes = prefix_metrics(test_probabilities, test.labels)
    val_prefixes: list[Metrics | None] = (
        list(prefix_metrics(val_probabilities, val.labels)) if val is not None else [None] * len(test_prefixes)
    )
    ensembles = [FGEEnsemble(size=size, test=test_metrics, val=val_metrics)
                 for size, (test_metrics, val_metrics) in enumerate(zip(test_prefixes, val_prefixes, strict=True),
                                                                    start=1)]
    return members, ensembles


def finished_snapshot_run(run: RunDir, wanted_by: str, finish: str) -> FGEReport | SSEReport:
    """The report of the finished FGE or SSE run `run`; a `UsageError` saying what `wanted_by` takes (e.g. "SWA
    averages the snapshots of an FGE or SSE run") where it is none, or that `finish` must end first."""
    run.require_run()
    if not run.has_snapshots:
        raise UsageError(f"{run.path} is {run.kind_in_words} run: {wanted_by} (`valley-train fge --out` or "
                         "`valley-train sse --out`)")
    if not run.report_file.is_file():
        raise UsageError(f"{run.path} has no {run.report_file.name}: finish {finish} first (--resume)")
    return run.read_snapshot_report()


def first_members(report: FGEReport | SSEReport, members: int | None, whose: str) -> list[FGEMember]:
    """The first `members` snapshots of a run (all for None); a `UsageError` naming `whose` snapshots they would
    be otherwise."""
    available = len(report.members)
    count = available if members is None else members
    if not 1 <= count <= available:
        raise UsageError(f"--members must be between 1 and {whose} {available} snapshots, got {count}")
    return report.members[:count]
