"""Calibration of labelled predictions: the ECE bins, and one prediction scored against its label.

ECE uses 15 equal-width confidence bins where bin b holds confidences in (b/15, (b+1)/15]:
the same edges as a Prometheus `le` histogram, so the ECE the server's bin counters give in
PromQL equals the one training computes on the same predictions (both use these bins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artefact.uncertainty import LOG_FLOOR

ECE_BINS = 15


def bin_upper_edges(bins: int = ECE_BINS) -> np.ndarray:
    """Upper edges 1/bins, 2/bins, ..., 1 of the equal-width confidence bins."""
    return np.linspace(0.0, 1.0, bins + 1)[1:]


def confidence_bin(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Index of the bin (lower, upper] holding each confidence: the first upper edge >= it.

    Comparing against the edges themselves (not `ceil(confidence * bins)`) puts a confidence
    that equals an edge in the same bin as a Prometheus bucket with that `le` would.
    """
    return np.minimum(np.searchsorted(bin_upper_edges(bins), confidence, side="left"), bins - 1)


def binned_ece(index: np.ndarray, confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum_b |correct_b - confidence sum_b| / N, from each prediction's bin, confidence and correctness (0/1)."""
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return float(np.sum(np.abs(correct_sum - confidence_sum)) / len(index))


@dataclass(frozen=True)
class Scored:
    """One served prediction joined to its true class."""

    confidence: float
    correct: bool
    nll: float
    brier: float
    bin: int


def score(probabilities: np.ndarray, true_class: int) -> Scored:
    """Confidence, correctness, NLL and Brier of one prediction (probabilities [C]) against its label."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = float(p.max())
    one_hot = np.zeros_like(p)
    one_hot[true_class] = 1.0
    return Scored(confidence=confidence, correct=int(p.argmax()) == true_class,
                  nll=float(-np.log(max(p[true_class], LOG_FLOOR))), brier=float(np.sum((p - one_hot) ** 2)),
                  bin=int(confidence_bin(np.array([confidence]))[0]))
