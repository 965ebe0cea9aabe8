"""Weights trained elsewhere (training/init.py): read from the files people save, matched strictly, adapted only
where asked for or unambiguous."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import cli
from training.data import load_splits
from training.errors import UsageError
from training.init import head_of, load_initial_weights, read_weights
from training.models.registry import Classifier, create_model


def _model(name: str = "cnn", classes: int = 10, channels: int = 1, size: int = 16) -> Classifier:
    return create_model(name, classes, channels, size, [0.5] * channels, [0.25] * channels)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model_state_dict", "model", "nested", "valley"])
def test_the_files_people_save_are_read(layout: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _model()
    state = source.network.state_dict()
    payload: object = {
        "plain": state, "state_dict": {"state_dict": state, "epoch": 3},
        "model_state_dict": {"model_state_dict": state, "optimizer": {"lr": 0.1}},
        "model": {"model": state}, "nested": {"checkpoint": 1, "state_dict": {"model": state}},
        "valley": source.state_dict(),  # a valley network: normalisation buffers and "network." keys
    }[layout]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    torch.manual_seed(2)
    target = _model()
    assert not _same(target.network, source.network)
    loaded = load_initial_weights(target, path)
    assert _same(target.network, source.network) and loaded.tensors == len(state)
    assert torch.equal(target.mean, torch.full_like(target.mean, 0.5)), "the dataset's normalisation is kept"


def test_keys_are_matched_strictly_and_named(tmp_path: Path) -> None:
    state = _model().network.state_dict()
    first, last = next(iter(state)), list(state)[-1]
    broken = {**{key: value for key, value in state.items() if key != first}, "extra.weight": torch.zeros(1)}
    torch.save(broken, tmp_path / "w.pt")
    with pytest.raises(UsageError) as error:
        load_initial_weights(_model(), tmp_path / "w.pt")
    message = str(error.value)
    assert "\n" not in message and f"missing {first}" in message and "unexpected extra.weight" in message
    assert last not in message


def test_another_class_count_needs_reset_head_which_starts_the_head_afresh(tmp_path: Path) -> None:
    torch.manual_seed(3)
    five = _model(classes=5)
    torch.save(five.network.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="--reset-head"):
        load_initial_weights(_model(classes=10), tmp_path / "w.pt")
    torch.manual_seed(4)
    ten = _model(classes=10)
    head = head_of(ten.network)
    fresh = {key: value.clone() for key, value in ten.network.state_dict().items() if key.startswith(f"{head}.")}
    loaded = load_initial_weights(ten, tmp_path / "w.pt", reset_head=True)
    assert set(loaded.reset_head) == set(fresh)
    for key, value in ten.network.state_dict().items():
        if key in fresh:
            assert torch.equal(value, fresh[key]), "the head keeps its fresh initialisation"
        else:
            assert torch.equal(value, five.network.state_dict()[key]), "every other tensor is the file's"


def test_an_rgb_first_convolution_is_summed_for_grey_images(tmp_path: Path) -> None:
    """Weights trained on grey images copied to three channels answer grey images the same once summed."""
    torch.manual_seed(5)
    rgb = _model("torchvision:resnet18", channels=3, size=32).eval()
    torch.save(rgb.network.state_dict(), tmp_path / "w.pt")
    grey = _model("torchvision:resnet18", channels=1, size=32).eval()
    loaded = load_initial_weights(grey, tmp_path / "w.pt")
    assert loaded.adapted == ("conv1.weight",)
    images = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = rgb.network(((images - 0.5) / 0.25).repeat(1, 3, 1, 1))
        torch.testing.assert_close(grey(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", ["not a file", "folder", "garbage", "list", "empty", "pickle"])
def test_what_is_not_a_state_dict_is_one_line(content: str, tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    if content == "folder":
        path.mkdir()
    elif content == "garbage":
        path.write_bytes(b"\x00\x01 not torch")
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "empty":
        torch.save({}, path)
    elif content == "pickle":  # arbitrary objects are refused, never run
        path.write_bytes(pickle.dumps(Path("/etc/passwd")))
    with pytest.raises(UsageError) as error:
        read_weights(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_train_and_sse_start_from_weights_and_fge_from_weights_needs_no_base_run(tmp_path: Path) -> None:
    """The CLI: a network saved by plain PyTorch code (here a `cnn` network's own state_dict) starts a train run, and
    an FGE run that has no base run, whose baseline is the starting network."""
    splits = load_splits("synthetic")
    torch.manual_seed(6)
    network = _model().network
    torch.save({"model_state_dict": network.state_dict()}, tmp_path / "w.pt")
    result = cli("train", "--dataset", "synthetic", "--epochs", "1", "--init", tmp_path / "w.pt", "--out",
                 tmp_path / "train")
    assert json.loads(result.stdout)["run"] == str(tmp_path / "train")
    assert json.loads((tmp_path / "train" / "config.json").read_text())["init"] == str(tmp_path / "w.pt")
    fge = cli("fge", "--init", tmp_path / "w.pt", "--model", "cnn", "--dataset", "synthetic", "--cycles", "2",
              "--cycle-epochs", "1", "--out", tmp_path / "fge")
    assert "start (trained elsewhere)" in fge.stdout
    report = json.loads((tmp_path / "fge" / "report.json").read_text())
    assert report["start"] == {"epoch": 0, "weights": str(tmp_path / "w.pt")}
    assert report["single"]["trained_elsewhere"] and report["config"]["base_run"] is None
    assert len(report["members"]) == 2 and report["single"]["val"]["count"] == len(splits.val)
    refused = cli("fge", "--from", tmp_path / "train", "--dataset", "synthetic", "--out", tmp_path / "x", check=False)
    assert refused.returncode == 2 and "--dataset" in refused.stderr and "apply with --init" in refused.stderr
    neither = cli("fge", "--out", tmp_path / "y", check=False)
    assert neither.returncode == 2 and "--from" in neither.stderr


def test_a_curve_joins_weight_files_trained_elsewhere(tmp_path: Path) -> None:
    """Two networks saved by plain PyTorch code are a curve's endpoints; a base run and a file are too."""
    for seed in (7, 8):
        torch.manual_seed(seed)
        torch.save(_model().network.state_dict(), tmp_path / f"w{seed}.pt")
    refused = cli("curve", "--start", tmp_path / "w7.pt", "--end", tmp_path / "w8.pt", "--out", tmp_path / "x",
                  check=False)
    assert refused.returncode == 2 and "pass --model and --dataset" in refused.stderr
    result = cli("curve", "--start", tmp_path / "w7.pt", "--end", tmp_path / "w8.pt", "--model", "cnn",
                 "--dataset", "synthetic", "--epochs", "1", "--out", tmp_path / "curve")
    assert json.loads(result.stdout)["epochs"] == 1
    report = json.loads((tmp_path / "curve" / "report.json").read_text())
    assert report["config"]["start_run"] == str((tmp_path / "w7.pt").resolve()) and report["start"] is None
    cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", tmp_path / "base")
    cli("curve", "--start", tmp_path / "base", "--end", tmp_path / "w8.pt", "--epochs", "1", "--out",
        tmp_path / "mixed")
    exported = json.loads(cli("export", "--from", tmp_path / "mixed", "--num-points", "3", "--name", "mixed", "--out",
                              tmp_path / "repository").stdout)
    assert exported["members"] == 3
    wrong = cli("curve", "--start", tmp_path / "base", "--end", tmp_path / "w8.pt", "--model", "cnn", "--out",
                tmp_path / "y", check=False)
    assert wrong.returncode == 2 and "a base run endpoint gives them" in wrong.stderr
