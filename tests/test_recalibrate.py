"""The temperature a window of labelled live predictions suggests, from the members' served probabilities alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artefact.calibration import fit_temperature
from artefact.manifest import MANIFEST_FILE, load_manifest
from artefact.uncertainty import retempered, softmax
from service.control.recalibrate import live_metrics, suggest
from service.core.abstention import Abstention
from service.errors import InvalidInput
from service.feedback import CalibrationWindow
from tests.conftest import REPO


def _logits(images: int = 1500, members: int = 3, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members that mostly agree (one shared opinion, a little noise each) and are far too sure of it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    shared = rng.normal(size=(images, 1, classes)) * 3
    shared[np.arange(images), 0, labels] += 2.5
    return shared + rng.normal(size=(images, members, classes)) * 0.5, labels


def test_retempering_served_probabilities_is_serving_at_the_other_temperature() -> None:
    logits, _ = _logits(50)
    served = softmax(logits / 0.8)
    used = np.array([3, 1, 2] * 16 + [3, 3])
    moved = retempered(served, used, 0.8 / 1.9)
    expected = softmax(logits / 1.9)
    for image, count in enumerate(used):
        np.testing.assert_allclose(moved[image, :count], expected[image, :count], atol=1e-9)
        assert not moved[image, count:].any(), "members an image did not go through stay zero"


def test_the_window_suggests_the_temperature_export_would_fit() -> None:
    logits, labels = _logits()
    served_at = 0.9
    window = CalibrationWindow(size=len(labels))
    members = softmax(logits / served_at).astype(np.float32)
    for image, label in enumerate(labels):
        window.add(members[image].mean(axis=0), members[image], members.shape[1], int(label))
    suggestion = suggest(window.labelled(), served_at)
    assert suggestion is not None and suggestion.labels == len(labels)
    # From float32 probabilities instead of the logits, the same temperature to a part in a thousand.
    assert suggestion.suggested == pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert suggestion.suggested > 1.5 * served_at, "these members are overconfident"
    assert suggestion.suggested_metrics["ece"] < 0.5 * suggestion.current_metrics["ece"]
    assert suggestion.suggested_metrics["nll"] < suggestion.current_metrics["nll"]
    assert suggestion.current_metrics["ece"] == pytest.approx(window.summary()["ece"], abs=1e-6)
    assert suggestion.suggested_metrics["accuracy"] == pytest.approx(suggestion.current_metrics["accuracy"], abs=0.01)
    assert live_metrics(window.labelled(), served_at, suggestion.suggested) == \
        pytest.approx(suggestion.suggested_metrics)
    assert suggest(CalibrationWindow(5).labelled(), served_at) is None


def test_a_selective_spec_from_before_thresholds_were_stored_still_loads(exported: Path, tmp_path: Path) -> None:
    """Curves without thresholds and a spec without a default target: the version serves, abstention takes the
    fitted targets only, and names them for any other."""
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    for curve in manifest["selective"]["curves"]:
        del curve["thresholds"], curve["count"]
    del manifest["selective"]["default_target"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    abstention = Abstention.of(load_manifest(tmp_path))
    assert abstention is not None and abstention.spec.default_target == 0.99
    fitted = abstention.spec.thresholds[0]
    assert abstention.threshold(fitted.target_accuracy) == (fitted.threshold if fitted.threshold is not None
                                                             else math.inf)
    with pytest.raises(InvalidInput, match="fitted at export"):
        abstention.threshold(0.9123)



@pytest.mark.parametrize(("arguments", "message"), [
    (["--model", "../etc"], "--model '../etc' is not an ensemble name"),
    (["--model", "synth", "--log-level", "loud"], "argument --log-level: invalid choice"),
    (["--model", "synth", "--window", "10", "--min-labels", "20"], "--window at least --min-labels"),
    (["--model", "synth", "--temperature", "nan"], "--temperature must be in"),
    (["--model", "nowhere"], "has no model 'nowhere'"),
    (["--model", "synth", "--feedback-store", "memory:"], "this process's memory"),
])
def test_valley_recalibrate_refuses_in_one_line_with_status_2(arguments: list[str], message: str, exported: Path,
                                                              tmp_path: Path) -> None:
    store = ["--feedback-store", f"sqlite:{tmp_path / 'feedback.db'}"] if "--feedback-store" not in arguments else []
    result = subprocess.run([sys.executable, "-m", "service.control.recalibrate_job", "--repository",
                             str(exported.parent.parent), *store, *arguments], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
