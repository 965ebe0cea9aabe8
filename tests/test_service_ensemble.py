from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artefact.manifest import OUTPUTS, ManifestError
from service.ensemble import CPU, load_ensemble
from service.errors import InvalidInput


def test_loads_verifies_and_runs_on_the_cpu_here(exported: Path) -> None:
    ensemble = load_ensemble(exported)
    assert ensemble.providers == [CPU], "no GPU on this machine: the CPU provider must be the one in use"
    assert ensemble.check_samples() <= 1e-4
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 16, 16), dtype=np.uint8)
    results = ensemble.infer(pixels, ["confidence", "probabilities"])
    assert list(results) == ["confidence", "probabilities"]
    np.testing.assert_allclose(results["confidence"], results["probabilities"].max(axis=1), atol=1e-7)
    assert set(ensemble.infer(pixels, list(OUTPUTS))) == set(OUTPUTS)


def test_a_failed_cuda_provider_is_quiet_and_reported(exported: Path) -> None:
    code = ("import sys; from pathlib import Path; from service.ensemble import load_ensemble; "
            f"print(load_ensemble(Path({str(exported)!r})).providers[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == CPU
    assert "CUDA" not in result.stderr and "Failed" not in result.stderr, result.stderr
    failing = subprocess.run([sys.executable, "-c", code.replace("load_ensemble(Path(", "load_ensemble(device='cuda', "
                                                                 "version_dir=Path(")],
                             capture_output=True, text=True)
    assert failing.returncode != 0 and "use device 'auto' or 'cpu'" in failing.stderr


@pytest.mark.parametrize(("pixels", "message"), [
    (np.zeros((2, 1, 16, 16), dtype=np.float32), "must be UINT8"),
    (np.zeros((2, 3, 16, 16), dtype=np.uint8), r"shape \[-1, 1, 16, 16\]"),
    (np.zeros((1, 16, 16), dtype=np.uint8), "got \\[1, 16, 16\\]"),
    (np.zeros((0, 1, 16, 16), dtype=np.uint8), "batch of 1 or more"),
])
def test_bad_inputs_are_named(exported: Path, pixels: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_ensemble(exported).infer(pixels, ["probabilities"])


def test_unknown_output(exported: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown output"):
        load_ensemble(exported).infer(np.zeros((1, 1, 16, 16), dtype=np.uint8), ["logits"])


def test_wrong_samples_refuse_the_version(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "1"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["samples"]["probabilities"][0] = list(reversed(manifest["samples"]["probabilities"][0]))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="refusing to serve"):
        load_ensemble(copy)
