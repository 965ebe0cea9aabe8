"""Classification metrics of predicted probabilities (numpy, no torch): accuracy, NLL, ECE, Brier.

Definitions follow ../ALGORITHMS.md: NLL is the mean -log p(true class), Brier the mean over
images of the squared error summed over classes, ECE uses 15 equal-width confidence bins
where bin b holds confidences in (b/15, (b+1)/15] (the same edges as a Prometheus `le`
histogram, so live ECE can be computed the same way; the bins live in `artefact.calibration`).
"""

from __future__ import annotations

import numpy as np

from artefact.calibration import ECE_BINS, binned_ece, confidence_bin
from artefact.manifest import Metrics
from artefact.uncertainty import LOG_FLOOR


def _check(probabilities: np.ndarray, labels: np.ndarray) -> None:
    if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
        raise ValueError(f"expected probabilities [N, C] and labels [N], got {probabilities.shape} and {labels.shape}")
    if probabilities.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero examples")


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    _check(probabilities, labels)
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    _check(probabilities, labels)
    true_class = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(true_class, LOG_FLOOR))))


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    _check(probabilities, labels)
    one_hot = np.zeros_like(probabilities, dtype=np.float64)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum_b (n_b / N) |accuracy_b - mean confidence_b|."""
    _check(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    return binned_ece(confidence_bin(confidence, bins), confidence, correct, bins)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> Metrics:
    """All four metrics of one set of predictions."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return Metrics(
        accuracy=accuracy(probabilities, labels),
        nll=nll(probabilities, labels),
        ece=ece(probabilities, labels),
        brier=brier(probabilities, labels),
        count=len(labels),
    )

