"""Shared helpers: run the real `valley-train` CLI in a subprocess."""

from __future__ import annotations

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
