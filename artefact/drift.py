"""Drift without labels: how far the answers a model gives now are from the answers it gave on validation.

An ensemble's label-free signals (confidence, predictive entropy, mutual information) and the
mix of classes it predicts move when its inputs move away from what it was trained on, long
before labels come back. A `Baseline` keeps, for each signal, the fraction of validation images
in each of its bins, and the predicted-class fractions. The bins are fitted on validation: their
edges are the signal's validation quantiles, so each bin holds about as many validation answers
(fixed bins put almost every answer of a confident ensemble in one bin of mutual information,
which then says nothing; versions exported before the edges were stored keep the fixed bins). `drift_score` compares the
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

from artefact.manifest import DriftBaseline

# The signals and their bin edges. Entropy and mutual information are in nats, bounded by ln C;
# edges are fractions of ln C, so one set of edges serves every class count.
BINS = 20
SIGNALS = ("confidence", "entropy", "mutual_information")
SMOOTHING = 0.5
"""Added to every bin's count before normalising: an empty bin on one side must not make the divergence jump."""


def _fixed_edges(signal: str, classes: int) -> np.ndarray:
    top = 1.0 if signal == "confidence" else float(np.log(max(classes, 2)))
    edges: np.ndarray = np.linspace(0.0, top, BINS + 1)
    return edges


def quantile_edges(values: np.ndarray, signal: str, classes: int, bins: int = BINS) -> list[float]:
    """Bin edges for `signal` from these (validation) values: the signal's range cut at its quantiles k / bins, ties
    merged (a value many answers share is one edge), so each bin holds about as many of them."""
    fixed = _fixed_edges(signal, classes)
    inner = np.quantile(np.asarray(values, dtype=np.float64), np.arange(1, bins) / bins)
    inner = inner[(inner > fixed[0]) & (inner < fixed[-1])]
    return [float(fixed[0]), *np.unique(inner).tolist(), float(fixed[-1])]


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
    edges: dict[str, list[float]] | None = None
    """Each signal's bin edges; None: the fixed bins (versions exported before edges were fitted)."""

    @classmethod
    def of(cls, spec: DriftBaseline, classes: int) -> Baseline:
        """The baseline a manifest's `drift` holds."""
        return cls(classes, spec.histograms, spec.predicted, spec.clean_level, spec.window, spec.edges)

    def edges_of(self, signal: str) -> np.ndarray:
        if self.edges is None:
            return _fixed_edges(signal, self.classes)
        return np.asarray(self.edges[signal])


def signal_counts(outputs: Mapping[str, np.ndarray], baseline: Baseline) -> dict[str, np.ndarray]:
    """The bin counts of a set of answers in the baseline's bins: every signal, and `predicted_class`."""
    counts = {signal: _histogram(np.asarray(outputs[signal], dtype=np.float64), baseline.edges_of(signal))
              for signal in SIGNALS}
    counts["predicted_class"] = _classes(np.asarray(outputs["predicted_class"], dtype=np.int64), baseline.classes)
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
    return score_counts(baseline, signal_counts(outputs, baseline))


def fit_baseline(outputs: Mapping[str, np.ndarray], classes: int, window: int, draws: int = 200,
                 seed: int = 0) -> Baseline:
    """The baseline of these (validation) answers, its bins at their quantiles (`quantile_edges`), and the level
    clean windows of `window` answers stay under: the 99th percentile of the scores of `draws` windows drawn from
    the same answers with replacement, each against the baseline of a bootstrap resample of them."""
    edges = {signal: quantile_edges(outputs[signal], signal, classes) for signal in SIGNALS}
    counts = signal_counts(outputs, Baseline(classes, {}, [], edges=edges))
    baseline = Baseline(classes, {signal: _normalised(counts[signal]).tolist() for signal in SIGNALS},
                        _normalised(counts["predicted_class"]).tolist(), edges=edges)
    rng = np.random.default_rng(seed)
    size = len(outputs["predicted_class"])
    arrays = {name: np.asarray(value) for name, value in outputs.items()}
    scores = []
    for _ in range(draws):
        # A window from the validation answers against the baseline of a resample of them: the baseline is itself
        # estimated from `size` answers (and its edges fitted on them), which fresh windows see and the answers it
        # came from do not.
        resampled = signal_counts({name: value[rng.integers(0, size, size)] for name, value in arrays.items()},
                                  baseline)
        drawn = Baseline(classes, {signal: _normalised(resampled[signal]).tolist() for signal in SIGNALS},
                         _normalised(resampled["predicted_class"]).tolist(), edges=edges)
        rows = rng.integers(0, size, window)
        scores.append(drift_score(drawn, {name: value[rows] for name, value in arrays.items()}))
    return Baseline(baseline.classes, baseline.histograms, baseline.predicted, float(np.percentile(scores, 99)),
                    window, edges)
