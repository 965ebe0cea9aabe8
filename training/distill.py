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

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from training import checkpoint, distributed
from training.config import DistillRunConfig, TrainConfig
from training.data import DataSplits
from training.engine import Trainer, build_model, evaluate
from training.runs import DistillReport, FGEReport, RunDir, SSEReport
from training.schedules import BaseSchedule
from training.snapshots import finished_snapshot_run, first_members
from training.train import fit_to_end, new_network, start_run


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
    return finished_snapshot_run(run, "a student learns from an FGE or SSE ensemble", "the teacher run")


def resolve_distill_config(teacher: Path, members: int | None, temperature: float, hard_label_weight: float,
                           epochs: int | None, lr: float | None, seed: int, device: str) -> DistillRunConfig:
    """The student's training: the teacher's data and architecture, its own budget, learning rate and seed."""
    run = RunDir(teacher)
    teachers = first_members(_teacher_report(run), members, "the teacher's")
    taught = run.read_config()
    base = TrainConfig(data=taught.data, model=taught.model, epochs=taught.epochs if epochs is None else epochs,
                       lr=taught.lr if lr is None else lr,
                       momentum=taught.momentum, weight_decay=taught.weight_decay, seed=seed, device=device)
    return DistillRunConfig(teacher_run=teacher, members=[m.index for m in teachers],
                            temperature=temperature, hard_label_weight=hard_label_weight, base=base)


def load_teacher(config: DistillRunConfig, report: FGEReport | SSEReport, splits: DataSplits,
                 device: torch.device) -> Teacher:
    """The members `config` names of the teacher run whose report is `report`."""
    by_index = {member.index: member for member in report.members}
    networks = []
    for index in config.members:
        path = config.teacher_run / by_index[index].file
        network = build_model(config.base.model, splits.info, device)
        checkpoint.load_model_weights(network, checkpoint.load(path), config.base.model, path)
        networks.append(network.eval())
    return Teacher(networks)


def run_distill(config: DistillRunConfig, out: Path, resume: bool = False) -> DistillReport:
    """Train the student into `out` (or continue it with `resume`); returns the report it also writes."""
    base = config.base
    start = start_run(out, base, resume)
    run, device, splits = start.run, start.device, start.splits
    taught = _teacher_report(RunDir(config.teacher_run))
    teacher = load_teacher(config, taught, splits, device)
    teacher_ensemble = taught.ensembles[len(config.members) - 1]
    student, optimizer, iterations = new_network(base, start)
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=base.lr, budget_epochs=base.epochs)

    def objective(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = teacher.probabilities(images, config.temperature)
        return distillation_loss(logits, targets, labels, config.temperature, config.hard_label_weight)

    trainer = Trainer(
        run=run, model=student, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=base.seed, device=device, config=config.model_dump(mode="json"),
        workers=base.data.workers, objective=objective,
    )
    seconds = fit_to_end(trainer, config, base.epochs, resume)
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
