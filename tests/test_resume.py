"""A run killed at any point and resumed ends with the weights of a run never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli
from training import checkpoint


def _kill_after(args: list[str], log: Path, lines: int) -> None:
    """Start `valley-train ARGS`, SIGKILL it once `log` has `lines` lines (mid-training)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            break
        time.sleep(0.02)
    time.sleep(0.15)  # land somewhere inside the next epoch, not on its boundary
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]  # type: ignore[no-any-return]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different}"


def test_train_resume_after_kill(tmp_path: Path) -> None:
    args = ["train", "--dataset", "synthetic", "--epochs", "8", "--seed", "5"]
    cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    _kill_after([*args, "--out", str(killed)], killed / "log.jsonl", lines=2)
    assert not (killed / "report.json").exists()
    cli(*args, "--out", killed, "--resume")
    _assert_same(_weights(tmp_path / "straight" / "checkpoints" / "last.pt"),
                 _weights(killed / "checkpoints" / "last.pt"))
    assert (killed / "log.jsonl").read_text().count("\n") == 8, "one log line per epoch, none twice"


def test_fge_resume_after_kill(synthetic_run: Path, tmp_path: Path) -> None:
    args = ["fge", "--from", str(synthetic_run), "--cycles", "6", "--cycle-epochs", "1"]
    cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    _kill_after([*args, "--out", str(killed)], killed / "log.jsonl", lines=2)
    cli(*args, "--out", killed, "--resume")
    for member in range(6):
        name = f"snapshots/member-{member:02d}.pt"
        _assert_same(_weights(tmp_path / "straight" / name), _weights(killed / name))


@pytest.mark.parametrize("command", ["train", "fge"])
def test_an_existing_run_needs_resume(synthetic_run: Path, tmp_path: Path, command: str) -> None:
    args = (["train", "--dataset", "synthetic", "--epochs", "1"] if command == "train"
            else ["fge", "--from", str(synthetic_run), "--cycles", "1", "--cycle-epochs", "1"])
    cli(*args, "--out", tmp_path / "run")
    again = cli(*args, "--out", tmp_path / "run", check=False)
    assert again.returncode == 2 and "pass --resume" in again.stderr
