"""Accuracy estimated without labels: how accurate the model is now, from its confidences alone.

Confidence-based performance estimation (CBPE, as NannyML calls it): where confidences are
calibrated, each answer is right with probability its confidence, so the mean calibrated
confidence over a window of answers estimates the window's accuracy before any label arrives.
Temperature scaling calibrates on average, not bin by bin; the map here is the correction, fitted
on the validation split: each confidence bin (the ECE bins of `artefact.calibration`, so the
server's histograms share its edges) answers its validation accuracy. On the validation split the
estimate equals the labelled accuracy exactly; under a shift that moves confidences it follows
the accuracy as far as the bins' accuracies still hold, which is the method's one assumption (it
cannot see a shift that keeps confidences and breaks answers: the drift score is for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artefact.calibration import ECE_BINS, bin_upper_edges, confidence_bin


@dataclass(frozen=True)
class AccuracyMap:
    """Each confidence bin's accuracy on the validation split; a bin validation left empty answers its middle
    (calibrated by assumption: nothing says otherwise)."""

    accuracy: tuple[float, ...]
    """Per bin, (b/B, (b+1)/B]."""
    counts: tuple[int, ...]
    """Validation answers per bin."""

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> AccuracyMap:
        """Fit on the validation split's confidences [N] and whether each answer was right [N]."""
        confidence = np.asarray(confidence, dtype=np.float64)
        correct = np.asarray(correct, dtype=np.float64)
        if confidence.ndim != 1 or correct.shape != confidence.shape or not len(confidence):
            raise ValueError(f"expected confidences [N] and correctness [N] with N >= 1, got {confidence.shape} and "
                             f"{correct.shape}")
        if np.any((confidence < 0) | (confidence > 1)) or not np.all(np.isin(correct, (0.0, 1.0))):
            raise ValueError("confidences are in [0, 1] and correctness is 0 or 1")
        index = confidence_bin(confidence, bins)
        counts = np.bincount(index, minlength=bins)
        right = np.bincount(index, weights=correct, minlength=bins)
        middles = bin_upper_edges(bins) - 0.5 / bins
        accuracy = np.where(counts > 0, right / np.maximum(counts, 1), middles)
        return cls(tuple(float(a) for a in accuracy), tuple(int(c) for c in counts))

    @property
    def bins(self) -> int:
        return len(self.accuracy)

    def probability_correct(self, confidence: np.ndarray) -> np.ndarray:
        """Each answer's estimated probability of being right, [N]."""
        table = np.asarray(self.accuracy)
        estimated: np.ndarray = table[confidence_bin(np.asarray(confidence, dtype=np.float64), self.bins)]
        return estimated

    def estimate(self, confidence: np.ndarray) -> float:
        """The estimated accuracy of a window of answers with these confidences; nan for an empty window."""
        confidence = np.asarray(confidence, dtype=np.float64)
        return float(self.probability_correct(confidence).mean()) if len(confidence) else float("nan")

    def estimate_from_counts(self, counts: np.ndarray) -> float:
        """The same from a window's answers counted per confidence bin (what the server's histograms hold)."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.bins,):
            raise ValueError(f"expected {self.bins} bin counts, got {counts.shape}")
        total = counts.sum()
        return float(counts @ np.asarray(self.accuracy) / total) if total else float("nan")


def sampling_error(accuracy: float, count: int) -> float:
    """The standard error of an accuracy measured on `count` labelled answers (binomial)."""
    return float(np.sqrt(max(accuracy * (1 - accuracy), 0.0) / count)) if count else float("inf")
