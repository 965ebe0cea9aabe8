"""The training Job's pipeline (deploy/k8s/train/base/pipeline.sh), run here as a pod runs it.

torchrun with two CPU processes trains a base network and FGE from it, the exporter writes the
next version into the model repository a real valley-serve is serving, and valley-reload makes
that server swap to it. Run again (a restarted pod), it trains and exports nothing twice.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import tritonclient.grpc as triton

from service.launch import ServerProcess
from tests.conftest import REPO
from tests.e2e.conftest import MODEL, Reference, free_port, triton_inputs
from tests.kube import K8S

PIPELINE = K8S / "train" / "base" / "pipeline.sh"


def _run_pipeline(run_dir: Path, repository: Path, target: str) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        # What the Job sets for torchrun (the c10d rendezvous at pod 0), here one node with two processes.
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "2",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "PET_RDZV_ID": run_dir.name,
        "PET_MAX_RESTARTS": "0",
        "JOB_COMPLETION_INDEX": "0",
        "VALLEY_RUN_DIR": str(run_dir),
        "VALLEY_ENSEMBLE": MODEL,
        "VALLEY_MODELS": str(repository),
        "VALLEY_RELOAD_TARGET": target,
        "VALLEY_TRAIN_ARGS": shlex.join(["--dataset", "synthetic", "--epochs", "3", "--save-epoch", "2", "--seed", "3",
                                         "--batch-size", "64", "--device", "cpu"]),
        "VALLEY_FGE_ARGS": "--start-epoch 2 --cycles 2 --cycle-epochs 1 --lr1 0.05 --lr2 0.005",
    }
    return subprocess.run(["bash", str(PIPELINE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_pipeline_trains_under_torchrun_exports_the_next_version_and_the_server_swaps_to_it(
        versioned: tuple[Path, ServerProcess], reference: Reference, tmp_path: Path) -> None:
    repository, server = versioned
    target = f"127.0.0.1:{server.grpc_port}"
    client = triton.InferenceServerClient(target)
    assert client.get_model_metadata(MODEL).versions == ["1"]
    run_dir = tmp_path / "runs" / "job-uid"

    first = _run_pipeline(run_dir, repository, target)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    exported_report = json.loads((run_dir / "exported.json").read_text())
    assert exported_report["exported"] == str(repository / MODEL / "2")
    reloads = [json.loads(line) for line in first.stdout.splitlines() if line.startswith('{"model"')]
    assert reloads == [{"model": MODEL, "address": target, "ok": True, "version": "2", "error": ""}]
    assert client.get_model_metadata(MODEL).versions == ["2"]
    manifest = json.loads((repository / MODEL / "2" / "manifest.json").read_text())
    assert manifest["method"] == "fge" and len(manifest["members"]) == 2
    pixels = reference.images(3, seed=5)
    probabilities = client.infer(MODEL, triton_inputs(pixels)).as_numpy("probabilities")
    assert probabilities.shape == (3, 10)

    # A pod restarted after the run: the finished training is not rejoined, nothing is exported twice.
    again = _run_pipeline(run_dir, repository, target)
    assert again.returncode == 0, again.stderr[-5000:]
    assert sorted(p.name for p in (repository / MODEL).iterdir() if not p.name.startswith(".")) == ["1", "2"]
    assert client.get_model_metadata(MODEL).versions == ["2"]
