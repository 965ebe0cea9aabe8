"""timm's models (`--model timm:<name>`) through train, fge, curve and export, with the same contract as every model:
pixels in, normalisation inside, class count and input channels adapted."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch

from tests.conftest import cli
from training.errors import UsageError
from training.models.registry import create_model

MODEL = "timm:test_resnet"


def test_a_timm_model_is_adapted_to_the_dataset() -> None:
    model = create_model(MODEL, 7, 1, 16, [0.5], [0.25])
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 7)
    with pytest.raises(UsageError, match="unknown timm model 'test_resnett'; did you mean test_resnet"):
        create_model("timm:test_resnett", 7, 1, 16, [0.5], [0.25])


def test_train_fge_curve_and_export(tmp_path: Path) -> None:
    data = ("--dataset", "synthetic", "--model", MODEL)
    for seed in (0, 1):
        cli("train", *data, "--epochs", "2", "--save-epoch", "1", "--seed", str(seed), "--out",
            tmp_path / f"base-{seed}")
    cli("fge", "--from", tmp_path / "base-0", "--start-epoch", "1", "--cycles", "2", "--cycle-epochs", "1", "--out",
        tmp_path / "fge")
    assert len(json.loads((tmp_path / "fge" / "report.json").read_text())["members"]) == 2
    cli("curve", "--start", tmp_path / "base-0", "--end", tmp_path / "base-1", "--epochs", "1", "--out",
        tmp_path / "curve")
    assert json.loads((tmp_path / "curve" / "report.json").read_text())["config"]["base"]["model"] == MODEL
    for source, name in ((tmp_path / "fge", "timm-fge"), (tmp_path / "curve", "timm-curve")):
        extra = ("--num-points", "3") if name == "timm-curve" else ()
        exported = Path(json.loads(cli("export", "--from", source, *extra, "--name", name, "--out",
                                       tmp_path / "repository").stdout)["exported"])
        manifest = json.loads((exported / "manifest.json").read_text())
        assert manifest["model"] == MODEL
        session = onnxruntime.InferenceSession(str(exported / manifest["fused"]["file"]),
                                               providers=["CPUExecutionProvider"])
        pixels = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8).numpy()
        assert session.run(["probabilities"], {"pixels": pixels})[0].shape == (2, 10)
