"""Selective prediction: answer only where the ensemble is sure enough, abstain elsewhere.

Every label-free signal ranks images from surest to least sure: the ensemble's confidence,
its margin (top probability minus the second), and the negatives of its predictive entropy and
of its mutual information (the members' disagreement). Keeping the images whose score is at
least a threshold trades coverage (the fraction answered) for selective accuracy (accuracy on
what is answered): the risk-coverage curve (Geifman and El-Yaniv, "Selective Classification
for Deep Neural Networks", NeurIPS 2017). The signal with the smallest area under its
risk-coverage curve ranks best.

`fit_threshold` picks, on the validation split alone, the lowest threshold whose selective
accuracy reaches a target with two standard errors to spare: the most coverage that surely
meets it there. On other data the selective accuracy then falls below the target only by the
binomial noise of those images (`accuracy_tolerance`). numpy only: the server scores its answers with the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from artefact.uncertainty import entropy, mutual_information

Signal = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _confidence(probabilities: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    result: np.ndarray = probabilities.max(axis=-1)
    return result


def _margin(probabilities: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    top = np.sort(probabilities, axis=-1)
    result: np.ndarray = top[:, -1] - top[:, -2] if probabilities.shape[-1] > 1 else top[:, -1]
    return result


def _negative_entropy(probabilities: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    return -entropy(probabilities)


def _negative_mutual_information(probabilities: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    return -mutual_information(member_probabilities)


SIGNALS: dict[str, Signal] = {
    "confidence": _confidence,
    "margin": _margin,
    "negative_entropy": _negative_entropy,
    "negative_mutual_information": _negative_mutual_information,
}
"""Scores by name, higher meaning surer, from the ensemble's probabilities [N, C] and its members' [N, K, C]."""


def score(signal: str, probabilities: np.ndarray, member_probabilities: np.ndarray) -> np.ndarray:
    """Each image's score under `signal` (float64 [N]); a ValueError names the signals there are."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; signals are {', '.join(SIGNALS)}")
    return np.asarray(SIGNALS[signal](probabilities, member_probabilities), dtype=np.float64)


SERVED_FROM: dict[str, str] = {
    "confidence": "confidence", "margin": "probabilities", "negative_entropy": "entropy",
    "negative_mutual_information": "mutual_information"}
"""The served output each signal is read from."""


def score_served(signal: str, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Each image's score under `signal` from the ensemble's served outputs (`SERVED_FROM`), as `score` gives it
    from the probabilities: the server scores its answers without the members' probabilities."""
    value = np.asarray(outputs[SERVED_FROM[signal]], dtype=np.float64)
    if signal == "margin":
        return _margin(value, value)
    return -value if signal.startswith("negative_") else value


@dataclass(frozen=True)
class RiskCoverage:
    """The selective accuracy of keeping the `coverage[i]` surest fraction of images, sorted by coverage.

    `thresholds[i]` is the score of the last image kept: keeping scores >= it gives that point, ties included
    (tied images enter together, so the curve has one point per distinct score).
    """

    coverage: np.ndarray
    accuracy: np.ndarray
    thresholds: np.ndarray
    count: int
    """Images the curve was measured on."""

    @property
    def area(self) -> float:
        """Area under the risk (1 - accuracy) against coverage: lower ranks better."""
        risk = 1.0 - self.accuracy
        widths = np.diff(np.concatenate([[0.0], self.coverage]))
        return float(np.sum(widths * risk))

    def sampled(self, points: int = 101) -> RiskCoverage:
        """The curve's own points nearest above `points` evenly spaced coverages (fewer where ties span several):
        small enough to store, and still points of the curve, each with its threshold, so `fit_threshold` picks
        from them as it would from the whole curve, at that coverage resolution."""
        grid = np.linspace(self.coverage[0], 1.0, points)
        nearest_above = np.searchsorted(self.coverage, grid - 1e-12, side="left")
        picked = np.unique(np.minimum(nearest_above, len(self.coverage) - 1))
        return RiskCoverage(self.coverage[picked], self.accuracy[picked], self.thresholds[picked], self.count)


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    """The risk-coverage curve of `scores` [N] for predictions that are `correct` [N] (bool)."""
    if len(scores) == 0 or len(scores) != len(correct):
        raise ValueError(f"need as many scores as predictions, at least one; got {len(scores)} and {len(correct)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], np.cumsum(np.asarray(correct, dtype=np.float64)[order])
    # The last index of every run of equal scores: a threshold keeps a whole tie or none of it.
    ends = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    kept = ends + 1
    return RiskCoverage(kept / len(scores), hits[ends] / kept, ordered[ends], len(scores))


def fit_threshold(curve: RiskCoverage, target_accuracy: float, z: float = 2.0) -> float | None:
    """The lowest threshold whose selective accuracy reaches `target_accuracy` with `z` standard errors to spare:
    the most coverage that meets the target, and not by the luck of these images. None when no threshold does.

    Without the margin (`z` 0) the most coverage that meets the target on validation is, by its choice, a point
    where validation was lucky, and other data falls short of the target about half the time."""
    if not 0 < target_accuracy <= 1:
        raise ValueError(f"a target accuracy is in (0, 1], got {target_accuracy}")
    kept = curve.coverage * curve.count
    lower = curve.accuracy - z * np.sqrt(target_accuracy * (1 - target_accuracy) / kept)
    meeting = np.flatnonzero(lower >= target_accuracy)
    return float(curve.thresholds[meeting[-1]]) if len(meeting) else None


def best_signal(probabilities: np.ndarray, member_probabilities: np.ndarray, labels: np.ndarray
                ) -> tuple[str, dict[str, RiskCoverage]]:
    """The signal whose risk-coverage curve has the smallest area on these (validation) predictions, and every
    signal's curve."""
    correct = probabilities.argmax(axis=-1) == labels
    curves = {name: risk_coverage(score(name, probabilities, member_probabilities), correct) for name in SIGNALS}
    return min(curves, key=lambda name: curves[name].area), curves


def accuracy_tolerance(target_accuracy: float, answered: int, z: float = 2.0) -> float:
    """How far below `target_accuracy` the selective accuracy of a fitted threshold may fall, by chance, where it
    answers `answered` other images: `z` binomial standard errors (two: about 97.7 % one-sided)."""
    if answered < 1:
        raise ValueError("at least one answered image is needed")
    return float(z * np.sqrt(target_accuracy * (1 - target_accuracy) / answered))
