"""Shared helpers: run the real `valley-train` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `valley-train ARGS` as a user would, with a fixed thread count for reproducibility."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
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
