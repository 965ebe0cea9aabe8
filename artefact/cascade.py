"""Anytime ensembles: members run in stages, and confident images leave early (a cascade).

After the first `stages[0]` members an image whose running ensemble (the mean of the members
run so far) is confident enough is answered with it; the others go on to the next stage, and
so on, the last stage running every member. "Confident enough" is a threshold on the running
ensemble's maximum probability, as in Wang et al., "Wisdom of Committees" (ICLR 2022). The cost
of an image is the number of members it went through.

A cascade may start with a front network: one network of the members' architecture that stands in for the
ensemble (the weight average of its members, SWA, or a student distilled from it). Images its answer is
confident about leave with it, at the cost of one member; the others go on to the members' stages as if there
were no front, and their cost counts the front too. A front that keeps no image answers like the members' cascade
alone.

`fit_cascade` chooses the stages and thresholds on the validation split alone (it is never given
another): the cheapest cascade whose validation NLL and accuracy stay within a stated
tolerance of the full ensemble's and that keeps a stated share (90 % by default) of what the
ensemble buys: its NLL and ECE lead over its best single member. A cascade that spent the whole
lead would serve an ensemble no better than one network at a few networks' cost. `run_cascade`
answers a batch the way the server does, and is what training evaluates and the tests compare
against. numpy only: the server uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from artefact.metrics import accuracy, ece, nll

# Confidence thresholds tried when fitting: dense near 1, where the confident images are.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)


@dataclass(frozen=True)
class Cascade:
    """Exits after `stages[i]` members (cumulative, increasing, the last one every member) for images whose running
    ensemble's confidence is at least `thresholds[i]`; one threshold per stage but the last. With `front`, a front
    network answers first, and its images at least `front` confident leave with its answer."""

    stages: tuple[int, ...]
    thresholds: tuple[float, ...]
    front: float | None = None

    def __post_init__(self) -> None:
        if not self.stages or any(b <= a for a, b in pairwise(self.stages)) \
                or self.stages[0] < 1 or len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(f"a cascade needs increasing member counts and one threshold per stage but the last, "
                             f"got stages {self.stages} and thresholds {self.thresholds}")

    @property
    def members(self) -> int:
        """Members of the whole ensemble (the last stage's count)."""
        return self.stages[-1]

    @classmethod
    def full(cls, members: int) -> Cascade:
        """No early exit: every image goes through every member."""
        return cls((members,), ())


@dataclass(frozen=True)
class Quality:
    """Accuracy and ECE (fractions), NLL and the mean number of members per image of one way of answering."""

    accuracy: float
    nll: float
    ece: float
    members_per_image: float


@dataclass(frozen=True)
class Lead:
    """What an ensemble buys over its members: the lowest NLL and the lowest ECE of any single member (each may be a
    different member), beside the full ensemble's."""

    member_nll: float
    member_ece: float
    full: Quality

    def kept(self, measured: Quality) -> tuple[float | None, float | None]:
        """The share (1: all, 0: none, below 0: worse than the best member) of the NLL and of the ECE lead that
        `measured` keeps; None for a metric on which the full ensemble does not lead."""
        return (_share(self.member_nll, self.full.nll, measured.nll),
                _share(self.member_ece, self.full.ece, measured.ece))

    def allows(self, measured: Quality, min_kept: float) -> bool:
        """Whether `measured` gives away at most `1 - min_kept` of the NLL lead and of the ECE lead (where there is
        no lead, nothing: no worse than the full ensemble)."""
        slack = 1.0 - min_kept
        return (measured.nll <= self.full.nll + slack * max(self.member_nll - self.full.nll, 0.0)
                and measured.ece <= self.full.ece + slack * max(self.member_ece - self.full.ece, 0.0))


def _share(member: float, full: float, measured: float) -> float | None:
    lead = member - full
    return (member - measured) / lead if lead > 0 else None


@dataclass(frozen=True)
class CascadeFit:
    """A fitted cascade with its quality, the full ensemble's and its lead, all on the data it was fitted on."""

    cascade: Cascade
    quality: Quality
    lead: Lead

    @property
    def full(self) -> Quality:
        return self.lead.full


def run_cascade(member_probabilities: np.ndarray, cascade: Cascade, front_probabilities: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The answers [N, C] and each image's cost in members [N] (int64) for member probabilities [N, K, C] and, for a
    cascade with a front, the front network's probabilities [N, C]. The cost counts the front as one member."""
    members = member_probabilities.shape[1]
    if members != cascade.members:
        raise ValueError(f"the cascade is for {cascade.members} members, the probabilities hold {members}")
    answers, used = _answer(_running_means(member_probabilities), cascade)
    if cascade.front is None:
        return answers, used
    if front_probabilities is None:
        raise ValueError("the cascade starts with a front network: pass its probabilities")
    return _in_front(front_probabilities, cascade.front, answers, used)


def _in_front(front: np.ndarray, threshold: float, answers: np.ndarray, used: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The members' answers and costs with the front network's put before them."""
    leaving = front.max(axis=-1) >= threshold
    return (np.where(leaving[:, None], front, answers).astype(answers.dtype, copy=False),
            np.where(leaving, 1, used + 1).astype(np.int64))


def _running_means(member_probabilities: np.ndarray) -> np.ndarray:
    """[N, K, C]: at index m-1, the mean of the first m members (accumulated in float64)."""
    sums = np.cumsum(member_probabilities, axis=1, dtype=np.float64)
    counts = np.arange(1, member_probabilities.shape[1] + 1, dtype=np.float64)[None, :, None]
    result: np.ndarray = (sums / counts).astype(member_probabilities.dtype)
    return result


def _answer(running: np.ndarray, cascade: Cascade) -> tuple[np.ndarray, np.ndarray]:
    count, members, _ = running.shape
    answers = running[:, -1].copy()
    used = np.full(count, members, dtype=np.int64)
    open_ = np.ones(count, dtype=bool)
    for stage, threshold in zip(cascade.stages, cascade.thresholds, strict=False):
        leaving = open_ & (running[:, stage - 1].max(axis=-1) >= threshold)
        answers[leaving] = running[leaving, stage - 1]
        used[leaving] = stage
        open_ &= ~leaving
    return answers, used


def quality(probabilities: np.ndarray, labels: np.ndarray, used: np.ndarray) -> Quality:
    """Accuracy, NLL (probabilities floored at LOG_FLOOR, as everywhere), ECE (`artefact.calibration`'s bins) and
    mean members per image."""
    probabilities = probabilities.astype(np.float64)
    return Quality(accuracy(probabilities, labels), nll(probabilities, labels), ece(probabilities, labels),
                   float(np.mean(used)))


def lead(member_probabilities: np.ndarray, labels: np.ndarray) -> Lead:
    """The full ensemble's quality and its best single members' NLL and ECE on predictions [N, K, C]."""
    count, members = member_probabilities.shape[:2]
    singles = [quality(member_probabilities[:, k], labels, np.ones(count)) for k in range(members)]
    full = quality(member_probabilities.mean(axis=1), labels, np.full(count, members))
    return Lead(min(single.nll for single in singles), min(single.ece for single in singles), full)


def fit_cascade(member_probabilities: np.ndarray, labels: np.ndarray, max_nll_increase: float = 0.01,
                max_accuracy_drop: float = 0.001, min_gain_kept: float = 0.9,
                thresholds: Sequence[float] = THRESHOLDS, max_stages: int = 3,
                front_probabilities: np.ndarray | None = None) -> CascadeFit:
    """The cheapest cascade on these (validation) predictions [N, K, C] whose NLL is at most `max_nll_increase`
    (relative) above the full ensemble's, whose accuracy is at most `max_accuracy_drop` (absolute) below it, and
    which keeps at least `min_gain_kept` of the full ensemble's NLL lead and of its ECE lead over its best single
    member (`Lead.allows`).

    Tries every split of the members into two stages and, with `max_stages` 3, into three, each with every pair of
    thresholds from `thresholds`; with `front_probabilities` [N, C] (a front network's), each of those and the full
    ensemble also behind the front at every threshold of `thresholds`. Ties in cost go to the lower NLL. With
    nothing cheaper within the bounds, the full ensemble: a front has to pay for itself.
    """
    labels = np.asarray(labels, dtype=np.int64)
    members = member_probabilities.shape[1]
    gained = lead(member_probabilities, labels)
    full = gained.full
    best, best_quality = Cascade.full(members), full
    running = _running_means(member_probabilities)
    fronts: list[float | None] = [None] if front_probabilities is None else [None, *thresholds]
    leaving = {front: front_probabilities.max(axis=-1) >= front for front in fronts
               if front is not None and front_probabilities is not None}
    candidates = [Cascade.full(members), *(Cascade(stages, chosen) for stages in _stage_sets(members, max_stages)
                                           for chosen in _threshold_sets(len(stages) - 1, thresholds))]
    for members_cascade in candidates:
        member_answers, member_used = _answer(running, members_cascade)
        for front in fronts:
            if front is None:
                answers, used = member_answers, member_used
            else:
                assert front_probabilities is not None
                exits = leaving[front]
                answers = np.where(exits[:, None], front_probabilities, member_answers)
                used = np.where(exits, 1, member_used + 1)
            # The cheapest possible cost of this member cascade behind this front: skip what cannot win.
            if float(np.mean(used)) > best_quality.members_per_image:
                continue
            measured = quality(answers, labels, used)
            within = measured.nll <= full.nll * (1 + max_nll_increase) and \
                measured.accuracy >= full.accuracy - max_accuracy_drop and gained.allows(measured, min_gain_kept)
            better = (measured.members_per_image, measured.nll) < (best_quality.members_per_image, best_quality.nll)
            if within and better:
                best = Cascade(members_cascade.stages, members_cascade.thresholds, front)
                best_quality = measured
    return CascadeFit(best, best_quality, gained)


def _stage_sets(members: int, max_stages: int) -> list[tuple[int, ...]]:
    """Every way to exit early once or (with 3 stages) twice before running all `members`."""
    sets: list[tuple[int, ...]] = [(first, members) for first in range(1, members)]
    if max_stages >= 3:
        sets += [(first, second, members) for first in range(1, members) for second in range(first + 1, members)]
    return sets


def _threshold_sets(count: int, thresholds: Sequence[float]) -> list[tuple[float, ...]]:
    """Threshold tuples for `count` exits. A later exit, with more members behind it, is trusted at a confidence
    no higher than an earlier one: only non-increasing tuples are tried, which halves the search."""
    if count == 1:
        return [(t,) for t in thresholds]
    return [(a, b) for a in thresholds for b in thresholds if b <= a]
