"""Classification and uncertainty metrics on predicted probabilities (numpy, no torch).

Definitions follow ../ALGORITHMS.md: NLL is the mean -log p(true class), Brier the mean over
images of the squared error summed over classes, ECE uses 15 equal-width confidence bins
where bin b holds confidences in (b/15, (b+1)/15] (the same edges as a Prometheus `le`
histogram, so live ECE can be computed the same way).
"""

from __future__ import annotations

import numpy as np

from service.calibration import ECE_BINS, binned_ece, confidence_bin
from service.manifest import Metrics
from service.uncertainty import LOG_FLOOR
from service.uncertainty import entropy as _entropy


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


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of probabilities [..., C], in float64."""
    return _entropy(np.asarray(probabilities, dtype=np.float64))


def mutual_information(member_probabilities: np.ndarray) -> np.ndarray:
    """Epistemic uncertainty H(mean_k p_k) - mean_k H(p_k) for member probabilities [K, N, C]."""
    result: np.ndarray = entropy(member_probabilities.mean(axis=0)) - entropy(member_probabilities).mean(axis=0)
    return result
