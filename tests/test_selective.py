"""Risk-coverage curves, signals and thresholds of selective prediction (artefact/selective.py)."""

from __future__ import annotations

import numpy as np
import pytest

from artefact.selective import SIGNALS, accuracy_tolerance, best_signal, fit_threshold, risk_coverage, score


def test_the_curve_keeps_the_surest_first_and_ties_together() -> None:
    curve = risk_coverage(np.array([0.1, 0.8, 0.9, 0.8]), np.array([False, True, True, False]))
    assert curve.coverage.tolist() == [0.25, 0.75, 1.0]
    np.testing.assert_allclose(curve.accuracy, [1.0, 2 / 3, 0.5])
    assert curve.thresholds.tolist() == [0.9, 0.8, 0.1]
    assert curve.area == pytest.approx(0.25 * 0 + 0.5 * (1 / 3) + 0.25 * 0.5)


def test_the_threshold_is_the_most_coverage_that_meets_the_target() -> None:
    curve = risk_coverage(np.array([0.1, 0.8, 0.9, 0.8]), np.array([False, True, True, False]))
    # Without the margin, the exact points of the curve; with it, four images sure of nothing.
    assert fit_threshold(curve, 0.6, z=0) == 0.8
    assert fit_threshold(curve, 0.99, z=0) == 0.9
    assert fit_threshold(curve, 0.5, z=0) == 0.1
    assert fit_threshold(curve, 0.6) is None
    assert fit_threshold(risk_coverage(np.array([0.5, 0.4]), np.array([False, False])), 0.9, z=0) is None
    with pytest.raises(ValueError, match="target accuracy"):
        fit_threshold(curve, 1.5)


def _calibrated(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    confidence = rng.beta(20, 1, count)
    return confidence, rng.random(count) < confidence


def test_a_threshold_fitted_on_validation_meets_its_target_on_held_out_data() -> None:
    """A calibrated model: an image of confidence p is right with probability p. Thresholds fitted on 5,000
    validation images reach each target on 50,000 others, within the stated tolerance (two binomial standard
    errors of the images answered there), over ten draws."""
    for seed in range(10):
        rng = np.random.default_rng(seed)

        val_scores, val_correct = _calibrated(rng, 5000)
        test_scores, test_correct = _calibrated(rng, 50000)
        curve = risk_coverage(val_scores, val_correct)
        for target in (0.95, 0.97, 0.985):
            threshold = fit_threshold(curve, target)
            assert threshold is not None, (seed, target)
            kept = test_scores >= threshold
            accuracy = test_correct[kept].mean()
            tolerance = accuracy_tolerance(target, int(kept.sum()))
            assert accuracy >= target - tolerance, (seed, target, accuracy, tolerance)
            assert 0.05 < kept.mean() < 1.0, "some images are answered, some abstained"
        bare, kept_sure = fit_threshold(curve, 0.97, z=0.0), fit_threshold(curve, 0.97)
        assert bare is not None and kept_sure is not None and bare <= kept_sure, "the margin only removes coverage"


def test_every_signal_ranks_and_the_best_has_the_smallest_area() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    members = rng.dirichlet(np.ones(3), (400, 4)).astype(np.float32)
    members[:200, :, :] = 0.02
    members[np.arange(200), :, labels[:200]] = 0.96  # half the images: every member sure and right
    probabilities = members.mean(axis=1)
    best, curves = best_signal(probabilities, members, labels)
    assert set(curves) == set(SIGNALS)
    assert curves[best].area == min(curve.area for curve in curves.values())
    error = 1 - np.mean(probabilities.argmax(1) == labels)
    assert curves[best].accuracy[0] == 1.0 and curves[best].area < 0.5 * error, "sure images are answered first"
    curve, sampled = curves[best], curves[best].sampled(11)
    assert len(sampled.coverage) <= 11 and sampled.coverage[-1] == 1.0 and sampled.count == curve.count
    points = set(zip(curve.coverage.tolist(), curve.accuracy.tolist(), curve.thresholds.tolist(), strict=True))
    assert set(zip(sampled.coverage.tolist(), sampled.accuracy.tolist(), sampled.thresholds.tolist(),
                   strict=True)) <= points, "sampling keeps the curve's own points, thresholds included"
    # A threshold fitted on the stored points is one the whole curve would accept too, at no more coverage.
    from_sampled, from_whole = fit_threshold(sampled, 0.9), fit_threshold(curve, 0.9)
    assert from_sampled is not None and from_whole is not None and from_sampled >= from_whole


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        score("luck", np.ones((1, 2)) / 2, np.ones((1, 1, 2)) / 2)
    with pytest.raises(ValueError, match="finite"):
        risk_coverage(np.array([np.nan]), np.array([True]))
    with pytest.raises(ValueError, match="as many scores"):
        risk_coverage(np.array([]), np.array([]))


def test_served_outputs_score_as_the_probabilities_do() -> None:
    from artefact.selective import score_served
    from artefact.uncertainty import ensemble_outputs

    members = np.random.default_rng(5).dirichlet(np.ones(4), (50, 3))
    outputs = ensemble_outputs(members)
    for signal in SIGNALS:
        np.testing.assert_allclose(score_served(signal, outputs), score(signal, outputs["probabilities"], members),
                                   rtol=1e-6, atol=1e-7, err_msg=signal)  # the served MI is float32
