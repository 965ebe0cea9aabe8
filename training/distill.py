"""Distillation of an FGE or SSE ensemble into one network of the same architecture: `valley-train distill`.

The student trains from scratch with the base schedule on the teacher's probabilities (Hinton et al. 2015): at
every step the ensemble's members see the same augmented batch, their probabilities at temperature T are
averaged, and the student minimises T^2 KL(teacher || student at T), plus `hard_label_weight` of the
cross-entropy with the true labels. The temperature is a hyperparameter, chosen on validation
(`benchmarks/comparison_study.py` tries several). The student is a candidate for the cascade's first stage
and a one-network model of its own (`valley-train export --from DISTILL_DIR`).

Checkpoints, `--resume` and seeds are the base run's; the teacher runs in eval mode without dropout, so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from training import checkpoint, distributed
from training.config import DistillRunConfig, TrainConfig
from training.data import DataSplits, load_data, make_batches
from training.engine import Trainer, build_model, evaluate, make_optimizer, resolve_device
from training.errors import UsageError
from training.runs import DistillReport, FGEReport, RunDir, SSEReport
from training.schedules import BaseSchedule

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """An ensemble's members, frozen: the mean of their probabilities at a temperature."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, temperature: float) -> torch.Tensor:
        self.eval()
        return torch.stack([torch.softmax(member(images) / temperature, dim=1) for member in self.members]).mean(0)


def distillation_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, labels: torch.Tensor,
                      temperature: float, hard_label_weight: float) -> torch.Tensor:
    """T^2 KL(teacher || student at T), with `hard_label_weight` of the cross-entropy mixed in.

    The T^2 keeps the soft targets' gradients at the scale of the hard ones' whatever T (Hinton et al.)."""
    soft = nn.functional.kl_div(torch.log_softmax(student_logits / temperature, dim=1), teacher_probabilities,
                                reduction="batchmean") * temperature ** 2
    if hard_label_weight == 0:
        return soft
    hard = nn.functional.cross_entropy(student_logits, labels)
    return (1 - hard_label_weight) * soft + hard_label_weight * hard


def _teacher_report(run: RunDir) -> FGEReport | SSEReport:
    run.require_run()
    if not run.has_snapshots:
        raise UsageError(f"{run.path} is {run.kind_in_words} run: a student learns from an FGE or SSE ensemble "
                         "(`valley-train fge --out` or `valley-train sse --out`)")
    if not run.report_file.is_file():
        raise UsageError(f"{run.path} has no {run.report_file.name}: finish the teacher run first (--resume)")
    return run.read_report(SSEReport) if run.is_sse else run.read_report(FGEReport)


def resolve_distill_config(teacher: Path, members: int | None, temperature: float, hard_label_weight: float,
                           epochs: int | None, lr: float | None, seed: int, device: str) -> DistillRunConfig:
    """The student's training: the teacher's data and architecture, its own budget, learning rate and seed."""
    run = RunDir(teacher)
    report = _teacher_report(run)
    available = len(report.members)
    count = available if members is None else members
    if not 1 <= count <= available:
        raise UsageError(f"--members must be between 1 and the teacher's {available} snapshots, got {count}")
    taught = run.read_config()
    base = TrainConfig(data=taught.data, model=taught.model, epochs=taught.epochs if epochs is None else epochs,
                       lr=taught.lr if lr is None else lr,
                       momentum=taught.momentum, weight_decay=taught.weight_decay, seed=seed, device=device)
    return DistillRunConfig(teacher_run=teacher, members=[m.index for m in report.members[:count]],
                            temperature=temperature, hard_label_weight=hard_label_weight, base=base)


def load_teacher(config: DistillRunConfig, splits: DataSplits, device: torch.device) -> Teacher:
    run = RunDir(config.teacher_run)
    report = _teacher_report(run)
    by_index = {member.index: member for member in report.members}
    networks = []
    for index in config.members:
        path = run.path / by_index[index].file
        network = build_model(config.base.model, splits.info, device)
        checkpoint.load_model_weights(network, checkpoint.load(path), config.base.model, path)
        networks.append(network.eval())
    return Teacher(networks)


def run_distill(config: DistillRunConfig, out: Path, resume: bool = False) -> DistillReport:
    """Train the student into `out` (or continue it with `resume`); returns the report it also writes."""
    run, base = RunDir(out), config.base
    if not resume and run.last_checkpoint.exists():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    device = distributed.setup(resolve_device(base.device), base.data.batch_size)
    splits = load_data(base.data)
    teacher = load_teacher(config, splits, device)
    teacher_ensemble = _teacher_report(RunDir(config.teacher_run)).ensembles[len(config.members) - 1]
    torch.manual_seed(base.seed)
    student = build_model(base.model, splits.info, device)
    optimizer = make_optimizer(student, base.lr, base.momentum, base.weight_decay)
    iterations = len(make_batches(splits.train, splits.info, base.data.batch_size, train=True))
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=base.lr, budget_epochs=base.epochs)

    def objective(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = teacher.probabilities(images, config.temperature)
        return distillation_loss(logits, targets, labels, config.temperature, config.hard_label_weight)

    trainer = Trainer(
        run=run, model=student, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=base.seed, device=device, config=config.model_dump(mode="json"),
        workers=base.data.workers, objective=objective,
    )
    if resume and not trainer.resume():
        log.info("nothing to resume in %s: starting afresh", out)
    if distributed.is_main():
        run.write_config(config)
    started = time.perf_counter()
    trainer.fit(base.epochs)
    seconds = time.perf_counter() - started
    test = evaluate(student, splits.test, splits, device).metrics
    val = evaluate(student, splits.val, splits, device).metrics if len(splits.val) else None
    report = DistillReport(config=config, file=run.network_file.name, teacher=teacher_ensemble, test=test, val=val,
                           device=str(device), train_seconds_this_process=round(seconds, 2),
                           train_seconds_total=round(sum(record["seconds"] for record in trainer.history), 2))
    if distributed.is_main():
        checkpoint.save_atomic({"model_name": base.model, "model": student.state_dict(),
                                "provenance": {"teacher_run": str(config.teacher_run),
                                               "teacher_members": config.members,
                                               "temperature": config.temperature}}, run.network_file)
        run.write_report(report)
    return report


def summary_table(report: DistillReport) -> str:
    """The student beside its teacher ensemble (test split)."""
    rows = ["| model | members | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|---|"]
    size = len(report.config.members)
    for name, members, metrics in ((f"teacher: ensemble of {size}", size, report.teacher.test),
                                   (f"student at T = {report.config.temperature:g}", 1, report.test)):
        rows.append(f"| {name} | {members} | {100 * metrics.accuracy:.2f} | {metrics.nll:.4f} | "
                    f"{100 * metrics.ece:.2f} | {metrics.brier:.4f} |")
    return "\n".join(rows)
