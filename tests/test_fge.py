from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import cli
from training import checkpoint
from training.config import FGEConfig
from training.fge import run_fge
from training.runs import RunDir

# Synthetic: 1000 training images, batch 128 -> 8 steps per epoch.
STEPS = 8


def _run_fge(base_run: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Run FGE in this process; the report as the JSON it is written as."""
    return run_fge(FGEConfig(base_run=base_run, **options), out).model_dump(mode="json")


@pytest.mark.parametrize(("cycles", "cycle_epochs", "positions"), [
    # From epoch 4, after the step taken at lr2: the first step of the cycle's epoch c/2 ...
    (3, 2, [5.125, 7.125, 9.125]),
    (1, 4, [6.125]),
    # ... and the middle step (index 4 of 8) of a one-epoch cycle.
    (2, 1, [4.625, 5.625]),
])
def test_snapshot_count_and_positions(synthetic_run: Path, tmp_path: Path, cycles: int, cycle_epochs: int,
                                      positions: list[float]) -> None:
    report = _run_fge(synthetic_run, tmp_path / "fge", cycles=cycles, cycle_epochs=cycle_epochs,
                      lr1=0.02, lr2=0.002, device="cpu")
    assert report["start"]["epoch"] == 4, "FGE starts at 80% of the 5-epoch budget by default"
    assert [m["epoch"] for m in report["members"]] == pytest.approx(positions)
    assert all(m["lr"] == pytest.approx(0.002) for m in report["members"])
    assert [e["size"] for e in report["ensembles"]] == list(range(1, cycles + 1))
    assert all((tmp_path / "fge" / m["file"]).is_file() for m in report["members"])
    history = [json.loads(line) for line in (tmp_path / "fge" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(5, 5 + cycles * cycle_epochs))


def test_fge_continues_from_the_checkpoint_with_momentum(synthetic_run: Path, tmp_path: Path) -> None:
    _run_fge(synthetic_run, tmp_path / "fge", cycles=1, cycle_epochs=1, lr1=0.02, lr2=0.002, device="cpu")
    start = checkpoint.load(RunDir(synthetic_run).epoch_checkpoint(4))
    member = checkpoint.load(tmp_path / "fge" / "snapshots" / "member-00.pt")
    assert member["provenance"]["epoch"] == pytest.approx(4.625)
    moved = [not torch.equal(start["model"][k], member["model"][k]) for k in start["model"] if "weight" in k]
    assert any(moved) and len(start["optimizer"]["state"]) > 0


def test_report_members_and_plot(synthetic_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "fge"
    result = cli("fge", "--from", synthetic_run, "--cycles", "2", "--cycle-epochs", "1", "--lr1", "0.02",
                 "--lr2", "0.002", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "fge" and report["single"]["epochs"] == 5
    for entry in (*report["members"], *report["ensembles"]):
        assert set(entry["test"]) == {"accuracy", "nll", "ece", "brier", "count"}
        assert entry["test"]["count"] == 500 and entry["val"]["count"] == 200
    assert (out / "plots" / "ensemble_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| FGE | 2 |" in result.stdout and "| single (5 epochs) | 1 |" in result.stdout
