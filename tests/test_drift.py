"""The label-free drift score (artefact/drift.py): zero-ish on clean windows, rising with the shift."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from artefact.drift import drift_score, fit_baseline, jensen_shannon

CLASSES = 10


def _answers(rng: np.random.Generator, count: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Answers of a model whose inputs moved by `shift` (0 to 1): less confident, more uncertain, one class favoured."""
    confidence = np.clip(rng.beta(12 * (1 - shift) + 1, 1 + 4 * shift, count), 1 / CLASSES, 1)
    entropy = (1 - confidence) * np.log(CLASSES) + rng.normal(0, 0.02, count).clip(0)
    information = rng.gamma(1 + 5 * shift, 0.01, count)
    favoured = rng.random(count) < 0.6 * shift
    predicted = np.where(favoured, 3, rng.integers(0, CLASSES, count))
    return {"confidence": confidence, "entropy": entropy, "mutual_information": information,
            "predicted_class": predicted}


def test_jensen_shannon_is_zero_for_equal_and_one_for_disjoint() -> None:
    p = np.array([0.5, 0.5, 0.0, 0.0])
    assert jensen_shannon(p, p) == 0.0
    assert jensen_shannon(p, np.array([0.0, 0.0, 0.5, 0.5])) == pytest.approx(1.0)


def test_clean_windows_stay_under_the_clean_level_and_shifted_ones_rise_with_the_shift() -> None:
    rng = np.random.default_rng(0)
    baseline = fit_baseline(_answers(rng, 5000), CLASSES, window=1000)
    assert 0 < baseline.clean_level < 0.05 and baseline.window == 1000
    clean = [drift_score(baseline, _answers(rng, 1000)) for _ in range(100)]
    assert np.mean(np.array(clean) <= baseline.clean_level) >= 0.9, "fresh clean windows score like validation's"
    shifted = [np.median([drift_score(baseline, _answers(rng, 1000, shift)) for _ in range(5)])
               for shift in (0.1, 0.2, 0.4, 0.6, 0.8)]
    assert all(b > a for a, b in pairwise(shifted)), shifted
    assert shifted[0] > np.median(clean) and shifted[-1] > 10 * baseline.clean_level


def test_an_empty_window_is_refused() -> None:
    rng = np.random.default_rng(1)
    baseline = fit_baseline(_answers(rng, 500), CLASSES, window=100, draws=20)
    with pytest.raises(ValueError, match="at least one answer"):
        drift_score(baseline, {name: value[:0] for name, value in _answers(rng, 10).items()})
