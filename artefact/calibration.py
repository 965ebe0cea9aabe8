"""Calibration: the ECE bins, one prediction scored against its label, and the temperature that calibrates an
ensemble.

`fit_temperature` is the one temperature fit: export runs it on the validation split's member
logits, the server on the members' answers to labelled live predictions (numpy only, so both can).

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


# Where the temperature is looked for: far beyond any sensible calibration on both sides.
TEMPERATURE_RANGE = (0.05, 20.0)
_GRID = 49
_TOLERANCE = 1e-6


def tempered_nll(member_logits: np.ndarray, labels: np.ndarray, temperature: float,
                 used: np.ndarray | None = None) -> float:
    """The NLL of the mean of softmax(logits / T) over each image's members: logits [N, K, C] (any constant may be
    added to an image's member's logits), labels [N], `used` [N] the first members that answered each image
    (None: all K)."""
    logits = np.asarray(member_logits, dtype=np.float64) / temperature
    rows = np.arange(len(labels))
    top = logits.max(axis=-1, keepdims=True)
    log_normaliser = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    log_p = logits[rows, :, labels] - log_normaliser  # [N, K]: each member's log-probability of the label
    members = logits.shape[1]
    count = np.full(len(labels), members) if used is None else np.asarray(used)
    log_p = np.where(np.arange(members)[None, :] < count[:, None], log_p, -np.inf)
    peak = log_p.max(axis=1)
    log_mean = np.log(np.exp(log_p - peak[:, None]).sum(axis=1)) + peak - np.log(count)
    return float(-np.mean(np.maximum(log_mean, np.log(LOG_FLOOR))))


def fit_temperature(member_logits: np.ndarray, labels: np.ndarray, used: np.ndarray | None = None) -> float:
    """The temperature T minimising `tempered_nll`: logits [N, K, C], labels [N], `used` [N] or None.

    A grid over log T brackets the minimum and a golden-section search closes on it: no gradients, no
    library beyond numpy, and the same answer wherever it runs. T is found in `TEMPERATURE_RANGE`.
    """
    logits, labels = np.asarray(member_logits), np.asarray(labels)
    if logits.ndim != 3 or logits.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"expected member logits [N, K, C] and labels [N] with N >= 1, got {logits.shape} and "
                         f"{labels.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("member logits must be finite")
    if labels.min() < 0 or labels.max() >= logits.shape[-1]:
        raise ValueError(f"labels must be classes 0..{logits.shape[-1] - 1}")
    if used is not None and (len(used) != len(labels) or np.min(used) < 1 or np.max(used) > logits.shape[1]):
        raise ValueError(f"members used must be 1..{logits.shape[1]} for each of the {len(labels)} images")

    def loss(log_t: float) -> float:
        return tempered_nll(logits, labels, float(np.exp(log_t)), used)

    grid = np.linspace(np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]), _GRID)
    best = int(np.argmin([loss(log_t) for log_t in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > _TOLERANCE:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return float(np.exp((low + high) / 2))
