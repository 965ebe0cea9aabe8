"""Bring your own network: a classifier trained by plain PyTorch code that never imports valley becomes an FGE
ensemble (`fge --init`), is exported and served, and beats the network it started from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import tritonclient.grpc as triton

from tests.conftest import REPO, cli
from tests.e2e.conftest import start_server_process, stop_server_process, triton_inputs
from training.data import FASHION_MNIST_DIR, read_idx


def test_a_network_trained_elsewhere_becomes_a_served_fge_ensemble(tmp_path: Path) -> None:
    script = REPO / "tests" / "train_elsewhere.py"
    assert "valley" not in script.read_text().split('"""', 2)[2].lower().replace("no valley", ""), \
        "the script is plain PyTorch"
    weights = tmp_path / "resnet18.pt"
    subprocess.run([sys.executable, str(script), str(FASHION_MNIST_DIR), str(weights), "1500", "1"], check=True,
                   timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=tmp_path)
    cli("fge", "--init", weights, "--model", "torchvision:resnet18", "--dataset", "fashion-mnist", "--subset",
        "2000", "--val-size", "500", "--cycles", "2", "--cycle-epochs", "1", "--out", tmp_path / "fge")
    report = json.loads((tmp_path / "fge" / "report.json").read_text())
    start, ensemble = report["single"], report["ensembles"][-1]
    assert start["trained_elsewhere"] and report["start"]["weights"] == str(weights)
    assert ensemble["size"] == 2 and ensemble["val"]["nll"] < start["val"]["nll"], \
        "the FGE ensemble beats the network it started from on validation NLL"

    exported = json.loads(cli("export", "--from", tmp_path / "fge", "--name", "byo", "--out",
                              tmp_path / "repository").stdout)["exported"]
    manifest = json.loads((Path(exported) / "manifest.json").read_text())
    assert manifest["model"] == "torchvision:resnet18" and len(manifest["members"]) == 2
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:16, None]
    server = start_server_process(tmp_path / "repository")
    try:
        result = triton.InferenceServerClient(server.url).infer("byo", triton_inputs(images))
        served = result.as_numpy("probabilities")
    finally:
        stop_server_process(server)
    fused = onnxruntime.InferenceSession(str(Path(exported) / manifest["fused"]["file"]),
                                         providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(served, fused.run(["probabilities"], {"pixels": images})[0], atol=1e-5)
    assert result.as_numpy("prediction_set") is not None
