"""Snapshot ensembles (`valley-train sse`): the cosine schedule with restarts, step by step, in a real training run;
the snapshots, the report and the export; resuming after a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from artefact.manifest import load_manifest
from tests.conftest import cli
from tests.test_resume import _assert_same, _kill_after, _weights
from training import engine
from training import train as train_module
from training.config import DataConfig, ExportConfig, TrainConfig
from training.export.ensemble import export_ensemble
from training.runs import RunDir, SSEReport
from training.schedules import CosineRestarts
from training.sse import resolve_sse_config, run_sse


def _closed_form(lr0: float, cycle_epochs: int, iterations: int, epoch: int, iteration: int) -> float:
    """Huang et al.'s eq. 2: lr0 / 2 (cos(pi mod(t, T/M) / (T/M)) + 1), t counted in steps."""
    steps_per_cycle = cycle_epochs * iterations
    t = epoch * iterations + iteration
    return lr0 / 2 * (math.cos(math.pi * (t % steps_per_cycle) / steps_per_cycle) + 1)


@given(st.floats(0.001, 0.5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 40))
def test_the_cosine_schedule_restarts_every_cycle_and_snapshots_at_its_end(lr0: float, cycles: int,
                                                                            cycle_epochs: int,
                                                                            iterations: int) -> None:
    schedule = CosineRestarts(iterations_per_epoch=iterations, lr0=lr0, cycle_epochs=cycle_epochs)
    snapshots = []
    for epoch in range(cycles * cycle_epochs):
        for iteration in range(iterations):
            value = schedule.lr(epoch, iteration)
            assert value == pytest.approx(_closed_form(lr0, cycle_epochs, iterations, epoch, iteration), rel=1e-12)
            assert 0 < value <= lr0
            first_of_cycle = epoch % cycle_epochs == 0 and iteration == 0
            if first_of_cycle:
                assert value == lr0  # the restart
            elif iteration > 0:
                assert value < schedule.lr(epoch, iteration - 1)  # annealing within a cycle
            if schedule.snapshot_due(epoch, iteration):
                snapshots.append((epoch, iteration))
    assert snapshots == [((cycle + 1) * cycle_epochs - 1, iterations - 1) for cycle in range(cycles)]


@pytest.fixture(scope="module")
def sse_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, float]]]:
    """A 3-cycle snapshot ensemble on the synthetic data, trained in process, with the learning rate of every
    optimizer step as the optimizer saw it when it stepped."""
    out = tmp_path_factory.mktemp("sse") / "run"
    seen: list[tuple[int, float]] = []
    real = engine.make_optimizer

    def recording(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def recorded_step(*step_args: Any, **step_kwargs: Any) -> Any:
            seen.append((len(seen), optimizer.param_groups[0]["lr"]))
            return step(*step_args, **step_kwargs)

        optimizer.step = recorded_step  # type: ignore[method-assign]
        return optimizer

    base = TrainConfig(data=DataConfig(dataset="synthetic"), epochs=6, lr=0.05, seed=2, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "make_optimizer", recording)  # the optimizer every fresh run makes
        run_sse(resolve_sse_config(base, 3), out)
    return out, seen


def test_every_training_step_runs_at_the_schedules_learning_rate(sse_run: tuple[Path, list[tuple[int, float]]]
                                                                 ) -> None:
    out, seen = sse_run
    report = RunDir(out).read_report(SSEReport)
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = len(seen)
    iterations = steps // 6
    assert iterations * 6 == steps and iterations > 1
    expected = [_closed_form(0.05, 2, iterations, step // iterations, step % iterations) for step in range(steps)]
    assert [lr for _, lr in seen] == pytest.approx(expected, rel=1e-12, abs=0)
    assert [record["lr"] for record in history] == pytest.approx(expected[iterations - 1::iterations], rel=1e-12)
    # One member per cycle, taken after the cycle's last step, at that step's (lowest) learning rate.
    assert [(member.cycle, member.epoch) for member in report.members] == [(0, 2.0), (1, 4.0), (2, 6.0)]
    assert [member.lr for member in report.members] == pytest.approx(expected[2 * iterations - 1::2 * iterations])
    assert [entry.size for entry in report.ensembles] == [1, 2, 3]
    assert (out / "plots" / "ensemble_size.png").is_file()


def test_export_takes_an_sse_run(sse_run: tuple[Path, list[tuple[int, float]]], tmp_path: Path) -> None:
    out, _ = sse_run
    target, manifest = export_ensemble(ExportConfig(runs=[out], name="sse", repository=tmp_path))
    assert manifest.method == "sse" and len(manifest.members) == 3
    assert sorted(member.provenance["index"] for member in manifest.members) == [0, 1, 2]  # best first
    assert load_manifest(target).method == "sse"


def test_sse_resumes_after_a_kill_to_the_same_snapshots(tmp_path: Path) -> None:
    args = ["sse", "--dataset", "synthetic", "--epochs", "6", "--cycles", "3", "--seed", "4"]
    cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    _kill_after([*args, "--out", str(killed)], killed / "log.jsonl", lines=3)
    cli(*args, "--out", killed, "--resume")
    for member in range(3):
        name = f"snapshots/member-{member:02d}.pt"
        _assert_same(_weights(tmp_path / "straight" / name), _weights(killed / name))
    _assert_same(_weights(tmp_path / "straight" / "checkpoints" / "last.pt"),
                 _weights(killed / "checkpoints" / "last.pt"))
    assert (killed / "log.jsonl").read_text().count("\n") == 6


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "7", "--cycles", "3"], "--epochs 7 does not split into 3 cycles of whole epochs"),
    (["--epochs", "6", "--cycles", "0"], "--cycles must be >= 1"),
])
def test_a_budget_that_does_not_split_into_cycles_is_refused(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli("sse", "--dataset", "synthetic", *args, "--out", tmp_path / "run", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_other_commands_refuse_an_sse_run_by_its_name(sse_run: tuple[Path, list[tuple[int, float]]],
                                                      tmp_path: Path) -> None:
    out, _ = sse_run
    fge = cli("fge", "--from", out, "--out", tmp_path / "fge", check=False)
    assert fge.returncode == 2 and "snapshot-ensemble (SSE) run" in fge.stderr
    curve = cli("curve", "--start", out, "--end", out, "--out", tmp_path / "curve", check=False)
    assert curve.returncode == 2 and "snapshot-ensemble (SSE) run" in curve.stderr


@settings(max_examples=20)
@given(st.integers(1, 12), st.integers(1, 12))
def test_resolving_splits_the_budget_or_says_why(epochs: int, cycles: int) -> None:
    base = TrainConfig(data=DataConfig(dataset="synthetic"), epochs=epochs)
    if epochs % cycles:
        with pytest.raises(Exception, match="does not split"):
            resolve_sse_config(base, cycles)
    else:
        config = resolve_sse_config(base, cycles)
        assert config.cycles * config.cycle_epochs == epochs
