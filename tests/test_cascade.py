from __future__ import annotations

import numpy as np
import pytest

from artefact.cascade import Cascade, fit_cascade, quality, run_cascade


def _members(count: int = 2000, members: int = 8, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Member probabilities [N, K, C] that agree on easy images and scatter on hard ones, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    hardness = rng.uniform(0, 1, count)
    logits = rng.normal(0, 1, (count, members, classes)) * (0.5 + 2 * hardness[:, None, None])
    logits[np.arange(count), :, labels] += 4 * (1 - hardness)[:, None]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return probabilities.astype(np.float32), labels


def test_a_threshold_that_keeps_everything_is_the_full_ensemble() -> None:
    probabilities, _ = _members()
    answers, used = run_cascade(probabilities, Cascade((1, 4, 8), (1.01, 1.01)))
    np.testing.assert_allclose(answers, probabilities.mean(axis=1), atol=1e-6)
    assert (used == 8).all()


@pytest.mark.parametrize("first", [1, 3])
def test_a_threshold_that_stops_everything_is_the_prefix_ensemble(first: int) -> None:
    probabilities, _ = _members()
    answers, used = run_cascade(probabilities, Cascade((first, 8), (0.0,)))
    np.testing.assert_allclose(answers, probabilities[:, :first].mean(axis=1), atol=1e-6)
    assert (used == first).all()


def test_images_leave_at_the_first_stage_they_are_confident_at() -> None:
    probabilities, _ = _members()
    cascade = Cascade((1, 3, 8), (0.95, 0.9))
    answers, used = run_cascade(probabilities, cascade)
    first = probabilities[:, 0].max(axis=-1) >= 0.95
    second = ~first & (probabilities[:, :3].mean(axis=1).max(axis=-1) >= 0.9)
    assert (used[first] == 1).all() and (used[second] == 3).all() and (used[~first & ~second] == 8).all()
    np.testing.assert_allclose(answers[second], probabilities[second, :3].mean(axis=1), atol=1e-6)


def test_the_fitted_cascade_is_cheaper_and_within_the_tolerance_on_its_data() -> None:
    probabilities, labels = _members()
    cascade, fitted, full = fit_cascade(probabilities, labels, max_nll_increase=0.01, max_accuracy_drop=0.001)
    assert fitted.members_per_image < 0.8 * full.members_per_image, "agreeing members make early exits pay"
    assert fitted.nll <= full.nll * 1.01 and fitted.accuracy >= full.accuracy - 0.001
    answers, used = run_cascade(probabilities, cascade)
    assert quality(answers, labels, used) == fitted


def test_a_tolerance_of_nothing_keeps_the_full_ensemble_or_an_equal_one() -> None:
    probabilities, labels = _members(seed=1)
    _, fitted, full = fit_cascade(probabilities, labels, max_nll_increase=0.0, max_accuracy_drop=0.0)
    assert fitted.nll <= full.nll and fitted.accuracy >= full.accuracy


@pytest.mark.parametrize(("stages", "thresholds"), [((), ()), ((8, 4), (0.9,)), ((0, 8), (0.9,)), ((4, 8), ())])
def test_malformed_cascades_are_refused(stages: tuple[int, ...], thresholds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing member counts"):
        Cascade(stages, thresholds)
