"""ONNX classifiers valley never saw, packaged as an ensemble (`valley-train export --onnx`) and served."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import tritonclient.grpc as triton
from torch import nn

from artefact.uncertainty import softmax
from tests.conftest import cli
from tests.e2e.conftest import start_server_process, stop_server_process, triton_inputs
from training.data import FASHION_MNIST_DIR, read_idx

MEAN, STD = 0.2860, 0.3530


def _network(seed: int, images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    """A small classifier trained by plain PyTorch code on normalised float images."""
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    for start in range(0, len(labels), 50):
        loss = nn.functional.cross_entropy(network(images[start:start + 50]), labels[start:start + 50])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return network.eval()


def _export(network: nn.Module, path: Path, shape: tuple[int, ...] = (1, 1, 28, 28)) -> None:
    torch.onnx.export(network, (torch.zeros(shape),), str(path), input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_three_onnx_classifiers_are_packaged_served_and_answer_their_tempered_mean(tmp_path: Path) -> None:
    images = torch.from_numpy(read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[-3000:].copy())
    labels = torch.from_numpy(read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[-3000:].astype(np.int64))
    normalised = ((images.float() / 255 - MEAN) / STD)[:, None]
    graphs = []
    for seed in range(3):
        graphs.append(tmp_path / f"classifier-{seed}.onnx")
        _export(_network(seed, normalised, labels), graphs[-1])
    flags = ("--dataset", "fashion-mnist", "--subset", "2000", "--val-size", "500")
    report = json.loads(cli("export", "--onnx", *graphs, *flags, "--input-mean", str(MEAN), "--input-std", str(STD),
                            "--precision", "int8", "--name", "outside", "--out", tmp_path / "repository").stdout)
    version = Path(report["exported"])
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["method"] == "external" and len(manifest["members"]) == 3
    assert {member["provenance"]["onnx"] for member in manifest["members"]} == {str(g.resolve()) for g in graphs}
    assert manifest["cascade"] and manifest["selective"] and manifest["drift"] and manifest["conformal"]
    temperature = manifest["temperature"]

    pixels = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:32, None]
    floats = ((pixels.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)
    logits = np.stack([onnxruntime.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(
        None, {"image": floats})[0] for g in graphs], axis=1)
    expected = softmax(logits.astype(np.float64) / temperature).mean(axis=1)
    server = start_server_process(tmp_path / "repository")
    try:
        result = triton.InferenceServerClient(server.url).infer("outside", triton_inputs(pixels))
        served = result.as_numpy("probabilities")
        assert result.as_numpy("member_probabilities") is None  # not a default output
    finally:
        stop_server_process(server)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # The composed graph keeps its temperature where recalibration rewrites it: another value answers at it.
    fused = onnx.load(str(version / manifest["fused"]["file"]))
    initializer = next(item for item in fused.graph.initializer if item.name == "temperature")
    initializer.CopyFrom(onnx.numpy_helper.from_array(np.asarray(2.5, dtype=np.float32), "temperature"))
    hotter = onnxruntime.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"pixels": pixels})[0]
    np.testing.assert_allclose(hotter, softmax(logits.astype(np.float64) / 2.5).mean(axis=1), atol=1e-5)
    variant = manifest["variants"][0]
    assert variant["precision"] == "int8" and len(variant["members"]) == 3, "the INT8 variant of outside graphs"

    # Probabilities in place of logits: the same ensemble (softmax of log p is p).
    probabilistic = tmp_path / "softmax-0.onnx"
    _export(nn.Sequential(_network(0, normalised, labels), nn.Softmax(dim=1)), probabilistic)
    again = json.loads(cli("export", "--onnx", probabilistic, *flags, "--input-mean", str(MEAN), "--input-std",
                           str(STD), "--outputs", "probabilities", "--name", "softmax", "--out",
                           tmp_path / "repository").stdout)
    single = json.loads(cli("export", "--onnx", graphs[0], *flags, "--input-mean", str(MEAN), "--input-std", str(STD),
                            "--name", "logits", "--out", tmp_path / "repository").stdout)
    assert again["test_nll"]["uncalibrated"] == pytest.approx(single["test_nll"]["uncalibrated"], rel=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_graph_of_another_input_shape_is_refused_with_the_reason(tmp_path: Path) -> None:
    rgb = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    _export(rgb, tmp_path / "rgb.onnx", (1, 3, 32, 32))
    grey = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    _export(grey, tmp_path / "grey.onnx")
    refused = cli("export", "--onnx", tmp_path / "grey.onnx", tmp_path / "rgb.onnx", "--dataset", "fashion-mnist",
                  "--subset", "500", "--val-size", "100", "--name", "mixed", "--out", tmp_path / "repository",
                  check=False)
    assert refused.returncode == 2
    assert "rgb.onnx: input 'image' is [batch, 3, 32, 32], not [N, 1, 28, 28] (the dataset's images)" in refused.stderr
    assert not (tmp_path / "repository" / "mixed").exists() or not any((tmp_path / "repository" / "mixed").iterdir())
    eleven = nn.Sequential(nn.Flatten(), nn.Linear(784, 11)).eval()
    _export(eleven, tmp_path / "eleven.onnx")
    classes = cli("export", "--onnx", tmp_path / "eleven.onnx", "--dataset", "fashion-mnist", "--subset", "500",
                  "--name", "eleven", "--out", tmp_path / "repository", check=False)
    assert classes.returncode == 2 and "is [batch, 11], not [N, 10]" in classes.stderr
    channels = cli("export", "--onnx", tmp_path / "grey.onnx", "--dataset", "fashion-mnist", "--subset", "500",
                   "--input-mean", "0.5,0.5,0.5", "--input-std", "0.2,0.2,0.2", "--name", "rgb", "--out",
                   tmp_path / "repository", check=False)
    assert channels.returncode == 2 and "one value per channel" in channels.stderr, channels.stderr
    said = cli("export", "--onnx", tmp_path / "grey.onnx", "--dataset", "fashion-mnist", "--subset", "500",
               "--outputs", "probabilities", "--name", "said", "--out", tmp_path / "repository", check=False)
    assert said.returncode == 2 and "rows sum to" in said.stderr and "--outputs logits" in said.stderr, said.stderr
    neither = cli("export", "--name", "x", "--out", tmp_path / "repository", check=False)
    assert neither.returncode == 2 and "--from" in neither.stderr and "--onnx" in neither.stderr
