"""Distillation of an FGE ensemble into one network (`valley-train distill`): the loss, the teacher, a real run,
its resume after a kill and its export as a one-network model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from artefact.manifest import load_manifest
from tests.conftest import cli
from tests.test_resume import _assert_same, _kill_after, _weights
from training.distill import Teacher, distillation_loss
from training.runs import DistillReport, RunDir


def test_the_loss_is_zero_where_the_student_matches_the_teacher_and_pulls_towards_it() -> None:
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    for temperature in (1.0, 2.0, 4.0):
        targets = torch.softmax(teacher_logits / temperature, dim=1)
        assert float(distillation_loss(teacher_logits, targets, labels, temperature, 0.0)) == pytest.approx(0, abs=1e-6)
        student = torch.zeros(6, 4, requires_grad=True)
        distillation_loss(student, targets, labels, temperature, 0.0).backward()  # type: ignore[no-untyped-call]
        assert student.grad is not None
        # A step against the gradient moves the student's probabilities towards the teacher's.
        moved = torch.softmax((student.detach() - 0.5 * student.grad) / temperature, dim=1)
        before = torch.full((6, 4), 0.25)
        assert float((moved - targets).abs().sum()) < float((before - targets).abs().sum())
    hard = distillation_loss(teacher_logits, torch.softmax(teacher_logits, 1), labels, 1.0, 1.0)
    assert float(hard) == pytest.approx(float(torch.nn.functional.cross_entropy(teacher_logits, labels)))


def test_the_teacher_averages_its_members_probabilities_at_the_temperature() -> None:
    torch.manual_seed(1)
    members = [torch.nn.Linear(3, 4) for _ in range(3)]
    images = torch.randn(5, 3)
    expected = torch.stack([torch.softmax(member(images) / 3.0, 1) for member in members]).mean(0)
    torch.testing.assert_close(Teacher(members).probabilities(images, 3.0), expected)
    assert all(not parameter.requires_grad for parameter in Teacher(members).parameters())


def test_a_student_learns_from_an_fge_run_and_exports_as_one_network(fge_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = cli("distill", "--teacher", fge_run, "--epochs", "3", "--temperature", "2", "--out", out)
    assert "student at T = 2" in result.stdout
    report = RunDir(out).read_report(DistillReport)
    assert report.config.members == [0, 1, 2] and report.teacher.size == 3 and report.config.base.epochs == 3
    assert report.test.accuracy > 0.5, "the student learned the synthetic classes"
    assert RunDir(out).is_distilled and not RunDir(out).is_base
    exported = json.loads(cli("export", "--from", out, "--name", "student", "--out", tmp_path / "repository").stdout)
    manifest = load_manifest(Path(exported["exported"]))
    assert manifest.method == "distilled" and len(manifest.members) == 1
    assert manifest.members[0].provenance["temperature"] == 2.0
    assert manifest.metrics.uncalibrated.accuracy == pytest.approx(report.test.accuracy)


def test_distillation_resumes_after_a_kill_to_the_same_weights(fge_run: Path, tmp_path: Path) -> None:
    args = ["distill", "--teacher", str(fge_run), "--epochs", "6", "--seed", "2"]
    cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    _kill_after([*args, "--out", str(killed)], killed / "log.jsonl", lines=2)
    cli(*args, "--out", killed, "--resume")
    for name in ("network.pt", "checkpoints/last.pt"):
        _assert_same(_weights(tmp_path / "straight" / name), _weights(killed / name))
    assert (killed / "log.jsonl").read_text().count("\n") == 6


@pytest.mark.parametrize(("teacher", "extra", "message"), [
    ("base", [], "is a base run: a student learns from an FGE or SSE ensemble"),
    ("fge", ["--members", "5"], "--members must be between 1 and the teacher's 3 snapshots"),
    ("fge", ["--temperature", "0"], "--temperature"),
    ("fge", ["--hard-label-weight", "2"], "--hard-label-weight: Input should be less than or equal to 1"),
    ("fge", ["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
    ("missing", [], "does not exist: it is not a valley run directory"),
])
def test_distill_refuses_what_it_cannot_learn_from(teacher: str, extra: list[str], message: str, synthetic_run: Path,
                                                   fge_run: Path, tmp_path: Path) -> None:
    runs = {"base": synthetic_run, "fge": fge_run, "missing": tmp_path / "no-such-run"}
    result = cli("distill", "--teacher", runs[teacher], *extra, "--out", tmp_path / "student", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
