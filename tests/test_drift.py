"""The label-free drift score (artefact/drift.py): zero-ish on clean windows, rising with the shift."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from artefact.drift import Baseline, drift_score, fit_baseline, jensen_shannon, signal_counts
from artefact.manifest import DriftBaseline

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


def _component(baseline: Baseline, answers: dict[str, np.ndarray], signal: str) -> float:
    counts = signal_counts(answers, baseline)[signal] + 0.5
    return jensen_shannon(counts / counts.sum(), np.asarray(baseline.histograms[signal]))


def test_quantile_bins_let_a_concentrated_signal_carry_the_shift() -> None:
    """Mutual information of a close-knit ensemble sits near 0: the fixed bins hold almost every answer in the first
    bin, so its component barely moves under a shift; validation-quantile bins hold about equal shares and see it."""
    rng = np.random.default_rng(3)
    validation = _answers(rng, 5000)
    fitted = fit_baseline(validation, CLASSES, window=1000)
    edges = fitted.edges
    assert edges is not None
    shares = np.asarray(fitted.histograms["mutual_information"])
    assert len(shares) >= 15 and shares.max() < 0.1, "quantile bins share the validation answers out"
    fixed = Baseline(CLASSES, {}, [], edges=None)
    counts = signal_counts(validation, fixed)["mutual_information"]
    assert counts[0] / counts.sum() > 0.9, "the fixed bins put almost every answer in the first bin"
    fixed = Baseline(CLASSES, {signal: ((c + 0.5) / (c + 0.5).sum()).tolist() for signal, c in
                               signal_counts(validation, fixed).items() if signal != "predicted_class"}, [])
    shifted = _answers(rng, 1000, shift=0.3)
    assert _component(fitted, shifted, "mutual_information") > 10 * _component(fixed, shifted, "mutual_information")
    assert Baseline.of(DriftBaseline(histograms=fitted.histograms, predicted=fitted.predicted,
                                     clean_level=fitted.clean_level, window=1000, edges=edges), CLASSES) == fitted
