"""Split-conformal prediction sets: a set of classes that holds the true class with a chosen probability.

Fitted on held-out (validation) probabilities and labels, a conformity score says how unusual each
label is; a prediction's set at coverage 1 - alpha holds every class whose score is at most the
ceil((n + 1)(1 - alpha))-th smallest of the n calibration scores (all classes when that rank is past
n). Under exchangeability the set holds the true class with probability at least 1 - alpha, and at
most 1 - alpha + 1 / (n + 1) when the scores have no ties (Vovk et al. 2005; Angelopoulos and
Bates 2021). Keeping the sorted calibration scores answers any coverage, not a fixed grid.

Scores, for probabilities p (the ensemble's, at its temperature) and a candidate class y:
- `lac` (least ambiguous set-valued classifier, Sadinle et al. 2019): 1 - p_y. Smallest sets on
  average; they may be empty for images unlike any seen.
- `aps` (adaptive prediction sets, Romano et al. 2020): the probability mass of the classes ranked
  at or above y. Sets grow with the image's uncertainty; never empty at coverage above the largest
  calibration score's complement.
- `raps` (regularized APS, Angelopoulos et al. 2021): APS plus `penalty` per rank past `k_reg`, which
  keeps the long tail of unlikely classes out of the sets.

Ties among probabilities are broken by class index, the same way everywhere (a stable sort), so a
served set is a function of the probabilities alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from artefact.manifest import ConformalScore

Score = Literal["lac", "aps", "raps"]
SCORES: tuple[Score, ...] = ("lac", "aps", "raps")
RAPS_PENALTY = 0.01
"""RAPS' lambda: the score added per rank past k_reg (Angelopoulos et al. 2021's ImageNet default)."""
RAPS_RANK_COVERAGE = 0.9
"""RAPS' k_reg is the rank of the true class that this share of the calibration images reach."""


def _ranked(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's 0-based rank by descending probability (ties by class index), and the probability mass of the
    classes ranked at or above it; both [N, C]."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probabilities.shape[1])[None, :].repeat(len(order), 0), axis=1)
    cumulative = np.cumsum(np.take_along_axis(probabilities, order, axis=1), axis=1)
    return rank, np.take_along_axis(cumulative, rank, axis=1)


def class_scores(probabilities: np.ndarray, score: Score, k_reg: int = 0, penalty: float = RAPS_PENALTY
                 ) -> np.ndarray:
    """The conformity score of every candidate class of every image, [N, C]: lower is more typical."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities [N, C], got {p.shape}")
    if score == "lac":
        scores: np.ndarray = 1.0 - p
        return scores
    rank, mass = _ranked(p)
    if score == "aps":
        return mass
    if score == "raps":
        regularized: np.ndarray = mass + penalty * np.maximum(0, rank + 1 - k_reg)
        return regularized
    raise ValueError(f"unknown conformity score {score!r}; use one of {', '.join(SCORES)}")


def rank_quantile(ranks: np.ndarray, coverage: float) -> int:
    """The smallest k (1-based) such that the true class is within the top k for `coverage` of the images."""
    return int(np.quantile(ranks + 1, coverage, method="higher")) if len(ranks) else 1


@dataclass(frozen=True)
class Conformal:
    """One fitted conformity score: the sorted calibration scores answer every coverage."""

    score: Score
    calibration: np.ndarray
    """The calibration images' scores of their true class, ascending."""
    k_reg: int = 0
    penalty: float = RAPS_PENALTY

    @classmethod
    def of(cls, entry: ConformalScore) -> Conformal:
        """The score a manifest's `conformal` entry stores."""
        return cls(entry.score, np.asarray(entry.calibration, dtype=np.float64), entry.k_reg, entry.penalty)

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray, score: Score) -> Conformal:
        """Fit on held-out `probabilities` [N, C] and `labels` [N] (the validation split; never the test split)."""
        p = np.asarray(probabilities, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if p.ndim != 2 or y.shape != (len(p),) or not len(p):
            raise ValueError(f"expected probabilities [N, C] and labels [N] with N >= 1, got {p.shape} and {y.shape}")
        if y.min() < 0 or y.max() >= p.shape[1]:
            raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
        k_reg = 0
        if score == "raps":
            rank, _ = _ranked(p)
            k_reg = rank_quantile(rank[np.arange(len(y)), y], RAPS_RANK_COVERAGE)
        scores = class_scores(p, score, k_reg)[np.arange(len(y)), y]
        return cls(score, np.sort(scores), k_reg)

    @property
    def count(self) -> int:
        return len(self.calibration)

    def threshold(self, coverage: float) -> float:
        """The largest score a set at `coverage` admits: the ceil((n + 1) coverage)-th smallest calibration score
        (inf where that rank is past n: every class)."""
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        rank = math.ceil((self.count + 1) * coverage - 1e-9)  # 1e-9: (n + 1) * 0.9 must not round up past n + 1
        return math.inf if rank > self.count else float(self.calibration[rank - 1])

    def sets(self, probabilities: np.ndarray, coverage: float) -> np.ndarray:
        """The prediction sets at `coverage` of `probabilities` [N, C]: BOOL [N, C], true for the classes in."""
        limit = self.threshold(coverage)
        scores = class_scores(probabilities, self.score, self.k_reg, self.penalty)
        in_set: np.ndarray = scores <= limit + 1e-12  # the calibration scores were computed by the same arithmetic
        return in_set


def expected_coverage(count: int, coverage: float) -> float:
    """The marginal coverage split conformal gives on average over calibration draws with `count` untied calibration
    scores: ceil((count + 1) coverage) / (count + 1), at least `coverage` and below coverage + 1 / (count + 1)."""
    rank = math.ceil((count + 1) * coverage - 1e-9)
    return min(rank, count + 1) / (count + 1)
