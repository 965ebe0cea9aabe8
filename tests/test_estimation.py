"""Accuracy estimated without labels (artefact/estimation.py): exact on validation, unbiased on exchangeable data,
and following the accuracy when a shift moves the confidences."""

from __future__ import annotations

import numpy as np
import pytest

from artefact.calibration import ECE_BINS, confidence_bin
from artefact.estimation import AccuracyMap, sampling_error


def _answers(count: int, seed: int, low: float = 0.1, high: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Confidences drawn in [low, high] and answers right with probability confidence squared: an overconfident
    model whose reliability curve is the same whatever the confidences' distribution (a covariate shift)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(low, high, count)
    correct = (rng.uniform(0, 1, count) < confidence**2).astype(np.float64)
    return confidence, correct


def test_on_the_validation_split_the_estimate_is_the_accuracy() -> None:
    confidence, correct = _answers(5000, 0)
    fitted = AccuracyMap.fit(confidence, correct)
    assert fitted.estimate(confidence) == pytest.approx(correct.mean(), abs=1e-12)
    assert sum(fitted.counts) == 5000 and fitted.bins == ECE_BINS


def test_on_held_out_answers_it_is_unbiased_where_the_mean_confidence_is_not() -> None:
    fitted = AccuracyMap.fit(*_answers(20_000, 1))
    errors, naive = [], []
    for seed in range(20):
        confidence, correct = _answers(2000, 100 + seed)
        errors.append(fitted.estimate(confidence) - correct.mean())
        naive.append(confidence.mean() - correct.mean())
    bound = 3 * sampling_error(0.6, 2000) / np.sqrt(20) + 0.005
    assert abs(np.mean(errors)) < bound, "unbiased"
    assert np.mean(naive) > 0.1, "the raw confidence of an overconfident model overestimates by far"


@pytest.mark.parametrize(("low", "high"), [(0.1, 0.5), (0.3, 0.7), (0.6, 1.0)])
def test_under_a_shift_of_the_confidences_it_follows_the_accuracy(low: float, high: float) -> None:
    validation = _answers(20_000, 2)
    fitted = AccuracyMap.fit(*validation)
    confidence, correct = _answers(5000, 3, low, high)
    assert abs(fitted.estimate(confidence) - correct.mean()) < 4 * sampling_error(correct.mean(), 5000) + 0.01
    if high <= 0.7:
        assert fitted.estimate(confidence) < validation[1].mean() - 0.1, "the drop shows before any label"


def test_the_estimate_from_bin_counts_is_the_same() -> None:
    fitted = AccuracyMap.fit(*_answers(3000, 4))
    confidence, _ = _answers(1000, 5)
    counts = np.bincount(confidence_bin(confidence), minlength=ECE_BINS)
    assert fitted.estimate_from_counts(counts) == pytest.approx(fitted.estimate(confidence), abs=1e-12)
    assert np.isnan(fitted.estimate(np.array([]))) and np.isnan(fitted.estimate_from_counts(np.zeros(ECE_BINS)))


def test_empty_validation_bins_answer_their_middle() -> None:
    fitted = AccuracyMap.fit(np.array([0.95, 0.97]), np.array([1.0, 0.0]))
    assert fitted.accuracy[-1] == 0.5 and fitted.accuracy[0] == pytest.approx(0.5 / ECE_BINS)


@pytest.mark.parametrize(("confidence", "correct", "words"), [
    (np.array([]), np.array([]), "N >= 1"),
    (np.array([0.5, 0.6]), np.array([1.0]), "expected confidences"),
    (np.array([1.5]), np.array([1.0]), "in \\[0, 1\\]"),
    (np.array([0.5]), np.array([0.5]), "0 or 1"),
])
def test_bad_validation_data_is_refused(confidence: np.ndarray, correct: np.ndarray, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        AccuracyMap.fit(confidence, correct)
