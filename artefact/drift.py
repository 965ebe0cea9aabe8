"""Drift without labels: how far the answers a model gives now are from the answers it gave on validation.

An ensemble's label-free signals (confidence, predictive entropy, mutual information) and the
mix of classes it predicts move when its inputs move away from what it was trained on, long
before labels come back. A `Baseline` keeps, for each signal, the fraction of validation images
in each of a fixed set of bins, and the predicted-class fractions. `drift_score` compares the
same histograms of a window of live answers with it: the Jensen-Shannon divergence (base 2, so
0 for identical histograms and 1 for disjoint ones) of each, averaged. A window of answers
from the baseline's own distribution scores above 0 by sampling noise alone, which shrinks as
the window grows; `Baseline.clean_level` is what such windows score (fitted on validation).
numpy only: training writes the baseline, the server scores its answers with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# The signals and their bin edges. Entropy and mutual information are in nats, bounded by ln C;
# edges are fractions of ln C, so one set of edges serves every class count.
BINS = 20
SIGNALS = ("confidence", "entropy", "mutual_information")
SMOOTHING = 0.5
"""Added to every bin's count before normalising: an empty bin on one side must not make the divergence jump."""


def _edges(signal: str, classes: int) -> np.ndarray:
    top = 1.0 if signal == "confidence" else float(np.log(max(classes, 2)))
    edges: np.ndarray = np.linspace(0.0, top, BINS + 1)
    return edges


def _histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in the bins; values beyond the edges count in the first or last bin."""
    indices = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    counts: np.ndarray = np.bincount(indices, minlength=len(edges) - 1).astype(np.float64)
    return counts


def _classes(predicted: np.ndarray, classes: int) -> np.ndarray:
    counts: np.ndarray = np.bincount(np.clip(predicted, 0, classes - 1), minlength=classes).astype(np.float64)
    return counts


def _normalised(counts: np.ndarray) -> np.ndarray:
    smoothed = counts + SMOOTHING
    result: np.ndarray = smoothed / smoothed.sum()
    return result


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits) of two distributions over the same bins: 0 when equal, at most 1."""
    middle = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / middle[mask])))

    return 0.5 * kl(p) + 0.5 * kl(q)


@dataclass(frozen=True)
class Baseline:
    """The validation split's histograms of every signal (fractions per bin) and of the predicted classes."""

    classes: int
    histograms: dict[str, list[float]]
    predicted: list[float]
    clean_level: float = 0.0
    """The score a clean window of `window` answers reaches at most, 99 times in 100 (fitted on validation)."""
    window: int = 0


def signal_counts(outputs: Mapping[str, np.ndarray], classes: int) -> dict[str, np.ndarray]:
    """The bin counts of a set of answers: every signal, and `predicted_class`."""
    counts = {signal: _histogram(np.asarray(outputs[signal], dtype=np.float64), _edges(signal, classes))
              for signal in SIGNALS}
    counts["predicted_class"] = _classes(np.asarray(outputs["predicted_class"], dtype=np.int64), classes)
    return counts


def score_counts(baseline: Baseline, counts: Mapping[str, np.ndarray]) -> float:
    """The drift score of bin counts (`signal_counts`) of a window, against the baseline."""
    divergences = [jensen_shannon(_normalised(counts[signal]), np.asarray(baseline.histograms[signal]))
                   for signal in SIGNALS]
    divergences.append(jensen_shannon(_normalised(counts["predicted_class"]), np.asarray(baseline.predicted)))
    return float(np.mean(divergences))


def drift_score(baseline: Baseline, outputs: Mapping[str, np.ndarray]) -> float:
    """The drift score of a window of answers (`confidence`, `entropy`, `mutual_information`, `predicted_class`):
    each signal's histogram and the predicted-class mix against the baseline's, Jensen-Shannon divergence
    averaged (0 to 1)."""
    if len(outputs["predicted_class"]) == 0:
        raise ValueError("a window of at least one answer is needed")
    return score_counts(baseline, signal_counts(outputs, baseline.classes))


def fit_baseline(outputs: Mapping[str, np.ndarray], classes: int, window: int, draws: int = 200,
                 seed: int = 0) -> Baseline:
    """The baseline of these (validation) answers, and the level clean windows of `window` answers stay under:
    the 99th percentile of the scores of `draws` windows drawn from the same answers with replacement."""
    counts = signal_counts(outputs, classes)
    baseline = Baseline(classes, {signal: _normalised(counts[signal]).tolist() for signal in SIGNALS},
                        _normalised(counts["predicted_class"]).tolist())
    rng = np.random.default_rng(seed)
    size = len(outputs["predicted_class"])
    scores = []
    for _ in range(draws):
        rows = rng.integers(0, size, window)
        scores.append(drift_score(baseline, {name: np.asarray(value)[rows] for name, value in outputs.items()}))
    return Baseline(baseline.classes, baseline.histograms, baseline.predicted, float(np.percentile(scores, 99)),
                    window)
