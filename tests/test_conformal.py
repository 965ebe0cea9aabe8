"""Split-conformal prediction sets (artefact/conformal.py): the guarantee, the shapes, and MAPIE's sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from artefact.conformal import SCORES, Conformal, Score, expected_coverage

CLASSES = 10


def _predictions(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable (probabilities, labels): informative, overconfident on some images, unsure on others."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    logits = rng.normal(0, 1, (count, CLASSES)) * rng.uniform(0.5, 3, (count, 1))
    logits[np.arange(count), labels] += rng.uniform(0, 4, count)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probabilities / probabilities.sum(axis=1, keepdims=True), labels


@pytest.mark.parametrize("score", SCORES)
def test_full_coverage_holds_every_class_and_sets_shrink_as_coverage_falls(score: Score) -> None:
    val, val_labels = _predictions(1000, 0)
    test, _ = _predictions(1000, 1)
    fitted = Conformal.fit(val, val_labels, score)
    assert fitted.sets(test, 1.0).all(), "coverage 1: every class"
    previous = fitted.sets(test, 0.999)
    sizes = [previous.sum(axis=1).mean()]
    for coverage in (0.99, 0.95, 0.9, 0.8, 0.5):
        current = fitted.sets(test, coverage)
        assert not (current & ~previous).any(), f"{score}: the set at {coverage} is inside the larger coverage's"
        sizes.append(current.sum(axis=1).mean())
        previous = current
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


@pytest.mark.parametrize("score", SCORES)
def test_marginal_coverage_is_the_finite_sample_guarantee(score: Score) -> None:
    """Over many calibration draws the mean coverage is ceil((n + 1)(1 - alpha)) / (n + 1): at least the target and
    within 1 / (n + 1) of it (checked within four standard errors of the mean over draws)."""
    count, draws = 200, 300
    for coverage in (0.8, 0.9, 0.95):
        covered = []
        for draw in range(draws):
            probabilities, labels = _predictions(2 * count, 100 + draw)
            fitted = Conformal.fit(probabilities[:count], labels[:count], score)
            sets = fitted.sets(probabilities[count:], coverage)
            covered.append(sets[np.arange(count), labels[count:]].mean())
        mean, error = float(np.mean(covered)), float(np.std(covered) / np.sqrt(draws))
        expected = expected_coverage(count, coverage)
        assert coverage <= expected < coverage + 1 / (count + 1)
        assert abs(mean - expected) < 4 * error + 1e-3, (score, coverage, mean, expected, error)


def test_raps_keeps_the_unlikely_tail_out() -> None:
    val, val_labels = _predictions(2000, 3)
    test, _ = _predictions(2000, 4)
    aps, raps = Conformal.fit(val, val_labels, "aps"), Conformal.fit(val, val_labels, "raps")
    assert 1 <= raps.k_reg <= CLASSES
    assert raps.sets(test, 0.95).sum(axis=1).max() <= aps.sets(test, 0.95).sum(axis=1).max()


def mapie_lac_sets(calibration: np.ndarray, probabilities: np.ndarray, levels: list[float]) -> np.ndarray:
    """MAPIE's LAC sets [N, C, levels] for `probabilities` [N, C], calibrated on these LAC scores (1 - the true
    class's probability): calibration rows are made whose true class 0 has exactly that probability."""
    from mapie.classification import SplitConformalClassifier

    classes = probabilities.shape[1]
    rows_of_calibration = np.full((len(calibration), classes), 0.0)
    rows_of_calibration[:, 0] = 1.0 - calibration
    rows_of_calibration[:, 1:] = (calibration / (classes - 1))[:, None]
    table = np.concatenate([rows_of_calibration, probabilities])

    class Fixed(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
        """A fitted classifier whose probabilities are the given ones: X holds row indices."""

        def fit(self, x: np.ndarray, y: np.ndarray) -> Fixed:
            self.classes_ = np.arange(classes)
            return self

        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            rows: np.ndarray = table[np.asarray(x)[:, 0].astype(int)]
            return rows

        def predict(self, x: np.ndarray) -> np.ndarray:
            predicted: np.ndarray = self.predict_proba(x).argmax(axis=1)
            return predicted

    index = np.arange(len(table))[:, None]
    labels = np.concatenate([np.zeros(len(calibration), dtype=np.int64), np.arange(len(probabilities)) % classes])
    mapie = SplitConformalClassifier(estimator=Fixed().fit(index, labels), confidence_level=levels,
                                     conformity_score="lac", prefit=True)
    with warnings.catch_warnings():  # every calibration row is of class 0, which MAPIE remarks on
        warnings.simplefilter("ignore", UserWarning)
        mapie.conformalize(index[:len(calibration)], labels[:len(calibration)])
    _, sets = mapie.predict_set(index[len(calibration):])
    result: np.ndarray = sets
    return result


def test_lac_sets_are_mapies_on_the_same_probabilities() -> None:
    probabilities, labels = _predictions(4000, 7)
    levels = [0.8, 0.9, 0.95, 0.99]
    ours = Conformal.fit(probabilities[:2000], labels[:2000], "lac")
    theirs = mapie_lac_sets(ours.calibration, probabilities[2000:], levels)
    for index, coverage in enumerate(levels):
        np.testing.assert_array_equal(ours.sets(probabilities[2000:], coverage), theirs[:, :, index])


@pytest.mark.parametrize("coverage", [0.0, -0.1, 1.5, float("nan")])
def test_a_coverage_outside_0_1_is_refused(coverage: float) -> None:
    fitted = Conformal.fit(*_predictions(100, 0), "lac")
    with pytest.raises(ValueError, match=r"coverage must be in \(0, 1\]"):
        fitted.sets(_predictions(10, 1)[0], coverage)


def test_bad_calibration_data_is_refused() -> None:
    probabilities, labels = _predictions(100, 0)
    with pytest.raises(ValueError, match="labels must be class indices"):
        Conformal.fit(probabilities, labels + CLASSES, "aps")
    with pytest.raises(ValueError, match="expected probabilities"):
        Conformal.fit(probabilities[:, None], labels, "aps")
    with pytest.raises(ValueError, match="unknown conformity score"):
        Conformal.fit(probabilities, labels, "top-k")  # type: ignore[arg-type]


def test_the_export_fits_on_validation_alone() -> None:
    """Swapping the test split for noise changes what the export measures, nothing it fits: the calibration scores,
    RAPS' rank, the drift bins and the accuracy map."""
    from training.export.fits import fit_conformal_spec, fit_drift_baseline

    rng = np.random.default_rng(5)
    labels = rng.integers(0, CLASSES, 600)
    val = rng.normal(0, 1, (600, 3, CLASSES))
    val[np.arange(600), :, labels] += 2.5
    test_labels = rng.integers(0, CLASSES, 400)
    test = rng.normal(0, 1, (400, 3, CLASSES))
    test[np.arange(400), :, test_labels] += 2.5
    noise = rng.normal(0, 5, test.shape)
    real = fit_conformal_spec(val, labels, test, test_labels, 1.3, "aps", 0.85)
    swapped = fit_conformal_spec(val, labels, noise, rng.permutation(test_labels), 1.3, "aps", 0.85)
    assert [(e.score, e.calibration, e.k_reg, e.penalty) for e in real.scores] == \
        [(e.score, e.calibration, e.k_reg, e.penalty) for e in swapped.scores]
    assert real.default_score == "aps" and real.default_coverage == 0.85
    assert real.scores[0].test != swapped.scores[0].test, "the test split is measured"
    assert all(len(e.calibration) == 600 for e in real.scores)
    coverage = {q.coverage: q for q in real.entry("lac").test}  # type: ignore[union-attr]
    assert sorted(coverage) == [0.8, 0.85, 0.9, 0.95, 0.99]
    for target, quality in coverage.items():
        # Held-out coverage within four binomial standard errors of 400 images above the finite-sample floor.
        assert quality.marginal >= target - 4 * np.sqrt(target * (1 - target) / 400)
        assert quality.worst_class <= quality.marginal
    drift = fit_drift_baseline(val, labels, 1.3)
    assert drift.bin_accuracy is not None and drift.validation_accuracy is not None
    assert drift.edges is not None and set(drift.edges) == {"confidence", "entropy", "mutual_information"}
