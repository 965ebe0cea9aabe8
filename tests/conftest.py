"""Shared helpers: run the real `valley-train` CLI in a subprocess; hold a model run at a gate."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.core.batching import RunBatch, RunOutput, Segment
from tests.postgres import PostgresServer

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


@pytest.fixture(scope="session", autouse=True)
def _state_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers the tests start keep their feedback store (SQLite in the state folder) under the session's temporary
    folder, never in the user's ~/.local/state."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server (Debian's package) for the session; `postgres.database()` makes a database."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fashion_fge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-member FGE run of the small CNN on 2000 Fashion-MNIST images (of each split): real images, a minute.

    Its cycles are wide enough for the members to differ: the ensemble leads its best member by about 9 % in
    validation NLL, as an ensemble worth serving does."""
    runs = tmp_path_factory.mktemp("fashion")
    cli("train", "--dataset", "fashion-mnist", "--subset", "2000", "--epochs", "4", "--seed", "0", "--out",
        runs / "base")
    cli("fge", "--from", runs / "base", "--cycles", "3", "--cycle-epochs", "1", "--lr1", "0.05", "--lr2", "0.005",
        "--out", runs / "fge")
    return runs / "fge"


@pytest.fixture(scope="session")
def fashion_variants(fashion_fge: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fashion_fge` exported as `fashion` with INT8 and FP16 variants through the CLI; the version directory."""
    repository = tmp_path_factory.mktemp("variants")
    result = cli("export", "--from", fashion_fge, "--name", "fashion", "--out", repository,
                 "--precision", "int8", "--precision", "fp16", "--precision", "int8")
    report = json.loads(result.stdout)
    assert [variant["precision"] for variant in report["variants"]] == ["int8", "fp16"]
    return repository / "fashion" / "1"


@pytest.fixture(scope="session")
def unreproducible_int8(fashion_variants: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `fashion_variants` (as `fashion/1` in a repository of its own) whose INT8 graphs were calibrated on
    blank images, with their checksums in the manifest: sound files whose samples do not reproduce, as a variant
    quantized for another CPU's arithmetic answers. Returns the version directory."""
    from artefact.manifest import FileEntry, load_manifest, sha256_of, write_manifest
    from training.quantize import quantize_int8

    version = tmp_path_factory.mktemp("unreproducible") / "fashion" / "1"
    shutil.copytree(fashion_variants, version)
    manifest = load_manifest(version)
    variant = manifest.variant("int8")
    assert variant is not None
    blank = np.zeros((64, *manifest.input.shape[1:]), dtype=np.uint8)
    entries = []
    for source, entry in zip([*manifest.members, manifest.fused], [*variant.members, variant.fused], strict=True):
        quantize_int8(version / source.file, version / entry.file, blank)
        entries.append(FileEntry(file=entry.file, sha256=sha256_of(version / entry.file)))
    blanked = variant.model_copy(update={"members": entries[:-1], "fused": entries[-1]})
    write_manifest(manifest.model_copy(update={"variants": [blanked if v.precision == "int8" else v
                                                            for v in manifest.variants]}), version)
    return version


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
