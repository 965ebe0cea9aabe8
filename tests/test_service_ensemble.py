from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from artefact.cascade import Cascade
from artefact.manifest import OUTPUTS, ManifestError
from artefact.uncertainty import softmax
from service.core.ensemble import CPU, MEMBERS_USED, load_ensemble
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
    code = ("import sys; from pathlib import Path; from service.core.ensemble import load_ensemble; "
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


def _member_probabilities(version_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """[N, K, C]: every member graph run in its own session here, tempered by the manifest's temperature."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    sessions = [onnxruntime.InferenceSession(str(version_dir / m["file"]), providers=[CPU])
                for m in manifest["members"]]
    logits = [session.run(None, {"pixels": pixels})[0] for session in sessions]
    return np.stack([softmax(x / np.float32(manifest["temperature"])) for x in logits], axis=1)


SERVED = [*OUTPUTS, MEMBERS_USED]


def test_a_cascade_that_keeps_every_image_answers_as_the_full_ensemble(exported: Path) -> None:
    ensemble = load_ensemble(exported)
    members = len(ensemble.manifest.members)
    pixels = np.random.default_rng(1).integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)
    fused = ensemble.run(pixels, SERVED).outputs
    staged = ensemble.run(pixels, SERVED, [(12, Cascade((1, members), (1.5,)))]).outputs
    assert fused[MEMBERS_USED].tolist() == staged[MEMBERS_USED].tolist() == [members] * 12
    for name in SERVED:
        np.testing.assert_allclose(staged[name], fused[name], atol=1e-5, err_msg=name)


def test_a_cascade_that_stops_every_image_answers_as_the_prefix_ensemble(exported: Path) -> None:
    ensemble = load_ensemble(exported)
    members = len(ensemble.manifest.members)
    pixels = np.random.default_rng(2).integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)
    staged = ensemble.run(pixels, SERVED, [(12, Cascade((2, members), (0.0,)))]).outputs
    expected = _member_probabilities(exported, pixels)[:, :2]
    assert staged[MEMBERS_USED].tolist() == [2] * 12
    np.testing.assert_allclose(staged["probabilities"], expected.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(staged["member_probabilities"][:, :2], expected, atol=1e-6)
    assert not staged["member_probabilities"][:, 2:].any()
    prefix = ensemble.infer(pixels, SERVED, Cascade.full(2))
    for name in SERVED:
        np.testing.assert_allclose(staged[name], prefix[name], atol=1e-6, err_msg=name)


def test_rows_of_one_batch_follow_their_own_plans(exported: Path) -> None:
    """A batch merges requests with different plans: each row is answered as if it ran alone."""
    ensemble = load_ensemble(exported)
    members = len(ensemble.manifest.members)
    pixels = np.random.default_rng(3).integers(0, 256, (10, 1, 16, 16), dtype=np.uint8)
    plans = [(3, Cascade.full(1)), (4, None), (3, Cascade((1, members), (0.6,)))]
    merged = ensemble.run(pixels, SERVED, plans).outputs
    row = 0
    for count, plan in plans:
        alone = ensemble.infer(pixels[row:row + count], SERVED, plan)
        for name in SERVED:
            np.testing.assert_allclose(merged[name][row:row + count], alone[name], atol=1e-6, err_msg=name)
        row += count
    assert merged[MEMBERS_USED][:3].tolist() == [1] * 3 and merged[MEMBERS_USED][3:7].tolist() == [members] * 4


def test_member_execution_answers_as_the_fused_graph(exported: Path) -> None:
    fused, members = load_ensemble(exported), load_ensemble(exported, execution="members")
    assert members.session is None and members.execution == "members"
    pixels = np.random.default_rng(4).integers(0, 256, (7, 1, 16, 16), dtype=np.uint8)
    for name, value in members.infer(pixels, SERVED).items():
        np.testing.assert_allclose(value, fused.infer(pixels, SERVED)[name], atol=1e-5, err_msg=name)


def test_a_precision_the_manifest_lacks_is_refused(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="has no int8 variant"):
        load_ensemble(exported, precision="int8")
    # An FP16 variant (here the FP32 files under other names) is for the CUDA provider only.
    copy = tmp_path / "1"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entries = []
    for entry in [*manifest["members"], manifest["fused"]]:
        name = entry["file"].replace(".onnx", ".fp16.onnx")
        shutil.copy(copy / entry["file"], copy / name)
        entries.append({"file": name, "sha256": entry["sha256"]})
    metrics = manifest["metrics"]["calibrated"]
    manifest["variants"] = [{"precision": "fp16", "members": entries[:-1], "fused": entries[-1], "method": "copy",
                             "validation": metrics, "test": metrics, "samples_tolerance": 1e-3}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="FP16 graphs are for the CUDA provider"):
        load_ensemble(copy, precision="fp16")
