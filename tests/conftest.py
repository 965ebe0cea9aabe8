"""Shared helpers: run the real `valley-train` CLI in a subprocess; hold a model run at a gate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.batching import RunBatch, RunOutput, Segment

REPO = Path(__file__).resolve().parents[1]


class Gate:
    """Wraps a model run so a test can hold it: the worker blocks inside compute until `open` is set.

    Records the size of every batch that passed.
    """

    def __init__(self, run: RunBatch, opened: bool = False) -> None:
        self._run, self.open, self.entered = run, threading.Event(), threading.Event()
        self.batches: list[int] = []
        if opened:
            self.open.set()

    def __call__(self, pixels: np.ndarray, outputs: Sequence[str], segments: Sequence[Segment] = ()) -> RunOutput:
        self.entered.set()
        assert self.open.wait(30), "the test never opened the gate"
        self.batches.append(int(pixels.shape[0]))
        return self._run(pixels, outputs, segments)


async def until_entered(gate: Gate) -> None:
    """Wait until a worker is inside a run held at the gate."""
    for _ in range(1000):
        if gate.entered.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never started the first batch")


def cli(*args: str | Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `valley-train ARGS` as a user would, with a fixed thread count for reproducibility (and `env` added)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"valley-train {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 5-epoch base run on the synthetic dataset (checkpoint kept at epoch 4)."""
    run = tmp_path_factory.mktemp("runs") / "base"
    cli("train", "--dataset", "synthetic", "--epochs", "5", "--seed", "3", "--out", run)
    return run


@pytest.fixture(scope="session")
def fge_run(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-member FGE run (1-epoch cycles) from `synthetic_run`."""
    out = tmp_path_factory.mktemp("fge") / "fge"
    cli("fge", "--from", synthetic_run, "--cycles", "3", "--cycle-epochs", "1", "--lr1", "0.05", "--lr2", "0.005",
        "--out", out)
    return out


@pytest.fixture(scope="session")
def exported(fge_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fge_run` exported as ensemble `synth`, version 1; returns the version directory."""
    repository = tmp_path_factory.mktemp("repository")
    result = cli("export", "--from", fge_run, "--name", "synth", "--out", repository)
    assert json.loads(result.stdout)["exported"] == str(repository / "synth" / "1")
    return repository / "synth" / "1"
