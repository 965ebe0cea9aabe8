"""valley-train under torchrun: two processes train as one does, rank 0 alone writes, a killed group resumes.

Every run here is a real `torchrun --standalone --nproc_per_node=2` (gloo on the CPU) of the real
command line, compared with the same command run as one process on the same data.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.conftest import REPO, cli
from training import checkpoint, distributed
from training.curve_train import open_curve
from training.curves import recompute_batch_norm
from training.data import Shard, load_splits
from training.engine import build_model, evaluate, predict_logits

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# torchrun's agent shares its store with the workers by default, and a restarted group can then read the
# addresses of the group it replaced (pytorch/pytorch#135712): a store of its own per attempt avoids that.
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
FGE = ("fge", "--cycles", "6", "--cycle-epochs", "1", "--lr1", "0.05", "--lr2", "0.005")

# Measured on the synthetic set (2 processes against 1): FGE members and ensembles differ by at most 0.0
# points of accuracy and 2.8 % of NLL; a base run trained from scratch for 5 epochs by 0.0 points and
# 0.0019 nats of NLL (its NLL is a tiny 0.008); the middle of a 3-epoch curve by 0.0 points of test
# error and 0.8 % of training loss. The tolerances leave a margin over those.
ACCURACY_POINTS = 0.02
FGE_NLL_RELATIVE = 0.06
BASE_NLL_NATS = 0.005
CURVE_LOSS_RELATIVE = 0.05
# A 3-cycle snapshot ensemble (6 epochs from scratch): its last member and whole ensemble by 0.0 points and at most
# 0.009 nats (its first member, one cycle into training, by up to 2 points: not compared); a 4-epoch student by
# 0.2 points and 0.010 nats. Absolute tolerances with a margin over those.
SSE_NLL_NATS = 0.02
STUDENT_NLL_NATS = 0.025


def torchrun(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc_per_node=2 -m training.cli ARGS`, as a user would run it."""
    env = {**os.environ, **ENVIRONMENT}
    command = [*TORCHRUN, "-m", "training.cli", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun valley-train {' '.join(map(str, args))} failed:\n{result.stderr[-4000:]}")
    return result


def _files(run: Path) -> list[str]:
    """Every file under a run directory, hidden ones (a torn temporary) included."""
    return sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file())


def _report(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())  # type: ignore[no-any-return]


def _assert_close(single: dict[str, Any], two: dict[str, Any], what: str, nll_tolerance: float) -> None:
    assert single["count"] == two["count"], what
    assert abs(single["accuracy"] - two["accuracy"]) <= ACCURACY_POINTS, (what, single, two)
    assert abs(single["nll"] - two["nll"]) <= nll_tolerance, (what, single, two)


@pytest.fixture(scope="module")
def two_process_fge(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-cycle FGE run from `synthetic_run`, trained by two processes under torchrun."""
    out = tmp_path_factory.mktemp("torchrun") / "fge"
    result = torchrun(*FGE, "--from", synthetic_run, "--out", out)
    assert result.stdout.count("| FGE | 6 |") == 1, "rank 0 alone prints the table"
    return out


def test_fge_under_torchrun_matches_one_process(synthetic_run: Path, two_process_fge: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    cli(*FGE, "--from", synthetic_run, "--out", single)
    one, two = _report(single), _report(two_process_fge)
    assert [m["epoch"] for m in one["members"]] == [m["epoch"] for m in two["members"]], "same snapshot steps"
    for kind in ("members", "ensembles"):
        for a, b in zip(one[kind], two[kind], strict=True):
            for split in ("test", "val"):
                _assert_close(a[split], b[split], f"{kind} {a.get('index', a.get('size'))} {split}",
                              nll_tolerance=FGE_NLL_RELATIVE * a[split]["nll"])
    # Rank 0 wrote every file once, and nothing else was written: no torn temporaries, no second copies.
    assert _files(two_process_fge) == _files(single)
    history = [json.loads(line) for line in (two_process_fge / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == list(range(5, 11))
    # A snapshot is the plain network's state dict: single-process code loads it (no `module.` prefixes).
    path = two_process_fge / "snapshots" / "member-05.pt"
    network = build_model("cnn", load_splits("synthetic").info, torch.device("cpu"))
    checkpoint.load_model_weights(network, checkpoint.load(path), "cnn", path)


def test_base_training_under_torchrun_matches_one_process(synthetic_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "base"
    result = torchrun("train", "--dataset", "synthetic", "--epochs", "5", "--seed", "3", "--out", out)
    assert len(result.stdout.strip().splitlines()) == 1, "one JSON line, printed by rank 0 alone"
    one, two = _report(synthetic_run), _report(out)
    for split in ("test", "val"):
        # Five epochs from scratch: per-process batch statistics (64 images, not 128) compound, so the
        # tolerance is absolute, on an NLL of about 0.008 nats.
        _assert_close(one[split], two[split], f"base {split}", nll_tolerance=BASE_NLL_NATS)
    assert _files(out) == _files(synthetic_run)
    assert (out / "log.jsonl").read_text().count("\n") == 5


def test_a_curve_under_torchrun_matches_one_process(synthetic_run: Path, tmp_path: Path) -> None:
    end = tmp_path / "end"
    cli("train", "--dataset", "synthetic", "--epochs", "5", "--seed", "8", "--out", end)
    # --start-run: torchrun's own parser would take a bare --start for its --start-method.
    args = ("curve", "--start-run", synthetic_run, "--end-run", end, "--epochs", "3")
    cli(*args, "--out", tmp_path / "single")
    torchrun(*args, "--out", tmp_path / "two")
    assert _files(tmp_path / "two") == _files(tmp_path / "single")
    middles = []
    for run in ("single", "two"):
        trained = open_curve(tmp_path / run, "cpu")
        network, splits = trained.network_at(0.5), trained.splits
        train = evaluate(network, splits.train_without_augmentation, splits, trained.device).metrics
        middles.append((train.nll, evaluate(network, splits.test, splits, trained.device).metrics.accuracy))
    (single_loss, single_accuracy), (two_loss, two_accuracy) = middles
    assert abs(single_accuracy - two_accuracy) <= ACCURACY_POINTS, middles
    assert abs(single_loss - two_loss) <= CURVE_LOSS_RELATIVE * single_loss, middles


def _rank_one_worker(marker: str) -> int | None:
    """The pid of rank 1 of torchrun's first attempt, told by the environment it was started with."""
    wanted = {f"VALLEY_TEST_RUN={marker}".encode(), b"RANK=1", b"TORCHELASTIC_RESTART_COUNT=0"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environment:
            return int(entry.name)
    return None


def test_a_killed_worker_restarts_the_group_which_resumes(synthetic_run: Path, two_process_fge: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, **ENVIRONMENT, "VALLEY_TEST_RUN": str(out)}
    command = [*TORCHRUN, "--max-restarts=1", "-m", "training.cli", *FGE, "--from", str(synthetic_run),
               "--out", str(out), "--resume", "-v"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = _rank_one_worker(str(out))
        assert victim is not None, "rank 1 was gone before the first checkpoint"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-4000:]
    assert "resumed" in stderr and "after epoch" in stderr, "the restarted group continued from the checkpoint"
    assert "| FGE | 6 |" in stdout
    # The restarted group replays exactly what the uninterrupted one did.
    for member in range(6):
        name = f"snapshots/member-{member:02d}.pt"
        expected, actual = checkpoint.load(two_process_fge / name)["model"], checkpoint.load(out / name)["model"]
        assert all(torch.equal(expected[key], actual[key]) for key in expected), name
    one, two = _report(two_process_fge), _report(out)
    assert one["members"] == two["members"] and one["ensembles"] == two["ensembles"]
    assert (out / "log.jsonl").read_text().count("\n") == 6, "one log line per epoch, none twice"


# --------------------------------------------------------------------------- the collectives, in 2 processes


def _batch_norm_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4),
                            nn.BatchNorm1d(4))
    images = torch.rand(37, 2, 5, 5) * torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    return network, images


def _batches(images: torch.Tensor, items: range) -> list[torch.Tensor]:
    return [images[start : min(start + 8, items.stop)] for start in range(items.start, items.stop, 8)]


def _collectives_worker(rank: int, folder: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2)
    try:
        network, images = _batch_norm_case()
        # 37 images in batches of 8: rank 0 runs batches 0-2 (24 images), rank 1 batches 3-4 (13 images).
        seen = recompute_batch_norm(network, _batches(images, Shard(rank, 2).whole_batches(37, 8)))
        splits = load_splits("synthetic")
        torch.manual_seed(0)
        model = build_model("cnn", splits.info, torch.device("cpu"))
        logits, labels = predict_logits(model, splits.test, splits, torch.device("cpu"), batch_size=64)
        torch.save({"seen": seen, "state": network.state_dict(), "logits": logits, "labels": labels},
                   folder / f"rank-{rank}.pt")
    finally:
        distributed.teardown()


def test_batch_norm_and_predictions_combine_across_processes(tmp_path: Path) -> None:
    # Fresh interpreters (spawn): a forked child would inherit this process's torch threads.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_collectives_worker, args=(rank, tmp_path)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    network, images = _batch_norm_case()
    assert recompute_batch_norm(network, _batches(images, range(37))) == 37
    splits = load_splits("synthetic")
    torch.manual_seed(0)
    model = build_model("cnn", splits.info, torch.device("cpu"))
    logits, labels = predict_logits(model, splits.test, splits, torch.device("cpu"), batch_size=64)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        assert result["seen"] == 37, "every process counts the images of all"
        for name, expected in network.state_dict().items():
            # The count-weighted combination is the single process's exact average, up to float error.
            assert torch.allclose(result["state"][name].double(), expected.double(), rtol=1e-5, atol=1e-6), name
        assert (result["labels"] == labels).all() and abs(result["logits"] - logits).max() <= 1e-5


# --------------------------------------------------------------------------- errors


def test_a_global_batch_that_does_not_split_is_a_one_line_error(tmp_path: Path) -> None:
    result = torchrun("train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "127", "--out",
                      tmp_path / "run", check=False)
    assert result.returncode != 0
    message = ("valley-train: error: --batch-size 127 is the global batch and must be divisible by the 2 processes "
               "torchrun started: use a multiple of 2")
    assert message in result.stderr
    # Each process stops there, before it joins the group: what it says is that one line.
    alone = cli("train", "--dataset", "synthetic", "--batch-size", "127", "--out", tmp_path / "run", check=False,
                env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_commands_that_read_a_run_refuse_torchrun(synthetic_run: Path, tmp_path: Path) -> None:
    result = cli("export", "--from", synthetic_run, "--name", "x", "--out", tmp_path, check=False,
                 env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.returncode == 2 and "export runs as one process: run it without torchrun" in result.stderr


def test_a_snapshot_ensemble_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    args = ("sse", "--dataset", "synthetic", "--epochs", "6", "--cycles", "3", "--seed", "3")
    cli(*args, "--out", tmp_path / "one")
    result = torchrun(*args, "--out", tmp_path / "two")
    assert result.stdout.count("| SSE | 3 |") == 1, "rank 0 alone prints the table"
    one, two = _report(tmp_path / "one"), _report(tmp_path / "two")
    for single, double in ((one["ensembles"][-1], two["ensembles"][-1]), (one["members"][-1], two["members"][-1])):
        for split in ("test", "val"):
            _assert_close(single[split], double[split], f"sse {split}", nll_tolerance=SSE_NLL_NATS)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_a_student_under_torchrun_matches_one_process(fge_run: Path, tmp_path: Path) -> None:
    args = ("distill", "--teacher", fge_run, "--epochs", "4", "--seed", "3")
    cli(*args, "--out", tmp_path / "one")
    result = torchrun(*args, "--out", tmp_path / "two")
    assert result.stdout.count("| student at T = 2 |") == 1, "rank 0 alone prints the table"
    one, two = _report(tmp_path / "one"), _report(tmp_path / "two")
    for split in ("test", "val"):
        _assert_close(one[split], two[split], f"student {split}", nll_tolerance=STUDENT_NLL_NATS)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
