"""A folder of real image files (PNG, written here from Fashion-MNIST) through train, fge, export and the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import tritonclient.grpc as triton
from PIL import Image

from tests.conftest import cli
from tests.e2e.conftest import start_server_process, stop_server_process, triton_inputs
from training.data import FASHION_MNIST, FASHION_MNIST_DIR, read_idx

CLASSES = FASHION_MNIST.classes


def _write(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / CLASSES[label].replace("/", "-")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{index:05d}.png")


def test_png_folders_train_fge_export_and_serve(tmp_path: Path) -> None:
    data = tmp_path / "photos"
    train = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:1200]
    train_labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:1200]
    test = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:200]
    test_labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:200]
    _write(data / "train", train[:1000], train_labels[:1000])
    _write(data / "val", train[1000:], train_labels[1000:])
    _write(data / "test", test, test_labels)
    flags = ("--dataset", "imagefolder", "--data-dir", data, "--image-size", "28")
    cli("train", *flags, "--model", "cnn", "--epochs", "2", "--save-epoch", "1", "--out", tmp_path / "base")
    report = json.loads((tmp_path / "base" / "report.json").read_text())
    assert report["dataset"]["train"] == 1000 and report["dataset"]["val"] == 200 and report["dataset"]["test"] == 200
    assert report["dataset"]["preprocessing"]["shape"] == [1, 28, 28], "grey images make a one-channel network"
    cli("fge", "--from", tmp_path / "base", "--start-epoch", "1", "--cycles", "2", "--cycle-epochs", "1", "--out",
        tmp_path / "fge")
    exported = Path(json.loads(cli("export", "--from", tmp_path / "fge", "--name", "photos", "--out",
                                   tmp_path / "repository").stdout)["exported"])
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [-1, 1, 28, 28]
    assert manifest["classes"] == sorted(name.replace("/", "-") for name in CLASSES)
    # A client sends the files' pixels as they are (28 x 28 already): the server answers what the graph computes.
    pixels = np.stack([np.asarray(Image.open(path)) for path in sorted((data / "test").rglob("*.png"))[:8]])[:, None]
    server = start_server_process(tmp_path / "repository")
    try:
        served = triton.InferenceServerClient(server.url).infer("photos", triton_inputs(pixels)).as_numpy(
            "probabilities")
    finally:
        stop_server_process(server)
    fused = onnxruntime.InferenceSession(str(exported / manifest["fused"]["file"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(served, fused.run(["probabilities"], {"pixels": pixels})[0], atol=1e-5)
