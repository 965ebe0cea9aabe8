from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli


def test_train_on_a_real_fashion_mnist_subset(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--dataset", "fashion-mnist", "--subset", "3000", "--epochs", "2", "--out", out)
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout)["test"] == report["test"]
    assert report["test"]["count"] == 3000 and report["dataset"]["classes"][0] == "T-shirt/top"
    assert report["test"]["accuracy"] > 0.6, "two epochs on 3,000 images learn far above chance (10%)"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    assert {"lr", "train_loss", "train_accuracy", "val_accuracy", "val_nll", "seconds"} <= log[0].keys()
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "cnn" and config["data"]["subset"] == 3000
    assert report["dataset"]["preprocessing"]["mean"] == [0.286]


def test_train_then_fge_end_to_end(tmp_path: Path) -> None:
    base, fge = tmp_path / "base", tmp_path / "fge"
    cli("train", "--dataset", "synthetic", "--epochs", "5", "--out", base)
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == ["epoch-004.pt", "epoch-005.pt", "last.pt"]
    result = cli("fge", "--from", base, "--cycle-epochs", "1", "--lr1", "0.02", "--lr2", "0.002", "--out", fge)
    report = json.loads((fge / "report.json").read_text())
    assert len(report["members"]) == 1, "the default spends the rest of the budget: 1 epoch after epoch 4"
    assert "| FGE | 1 |" in result.stdout


def _error(*args: str | Path) -> str:
    result = cli(*args, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("valley-train: error: "), result.stderr
    return lines[0]


def test_unknown_names(tmp_path: Path) -> None:
    assert "choose one of fashion-mnist, cifar10" in _error("train", "--dataset", "mnist", "--out", tmp_path / "a")
    message = _error("train", "--dataset", "synthetic", "--model", "resnet9", "--out", tmp_path / "b")
    assert "unknown model 'resnet9'" in message and "torchvision:<name>" in message


def test_missing_data_directory(tmp_path: Path) -> None:
    message = _error("train", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert "does not exist" in message and "apt-get install dataset-fashion-mnist" in message


def test_checkpoint_from_another_architecture(tmp_path: Path) -> None:
    cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", tmp_path / "run")
    message = _error("train", "--dataset", "synthetic", "--model", "preresnet20", "--epochs", "2",
                     "--out", tmp_path / "run", "--resume")
    assert "holds a 'cnn' model, not 'preresnet20'" in message and "--model cnn" in message


def test_fge_bad_inputs(synthetic_run: Path, tmp_path: Path) -> None:
    assert "not a run directory" in _error("fge", "--from", tmp_path, "--out", tmp_path / "f")
    message = _error("fge", "--from", synthetic_run, "--start-epoch", "2", "--out", tmp_path / "f")
    assert "no checkpoint for epoch 2" in message and "--save-epoch 2" in message
    assert "less than one" in _error("fge", "--from", synthetic_run, "--cycle-epochs", "3", "--out", tmp_path / "f")


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--lr", "-1"]])
def test_invalid_numbers(tmp_path: Path, args: list[str]) -> None:
    assert "--" in _error("train", "--dataset", "synthetic", *args, "--out", tmp_path / "run")
