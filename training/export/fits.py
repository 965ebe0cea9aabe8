"""What an export fits on the validation split and measures on the test split: the members' order, the anytime
cascade, selective prediction's thresholds, the drift baseline, and the comparison with a curve's endpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from artefact.cascade import Cascade, fit_cascade, lead, quality, run_cascade
from artefact.conformal import SCORES, Conformal, Score
from artefact.drift import fit_baseline
from artefact.estimation import AccuracyMap
from artefact.manifest import (
    AbstentionThreshold,
    CascadeQuality,
    CascadeSpec,
    ConformalScore,
    ConformalSpec,
    DriftBaseline,
    GainKept,
    RiskCoverageCurve,
    SelectiveSpec,
    SetQuality,
)
from artefact.metrics import classification_metrics
from artefact.selective import RiskCoverage, best_signal, fit_threshold, risk_coverage
from artefact.selective import score as selective_score
from artefact.uncertainty import ensemble_outputs, softmax
from training.calibrate import tempered_ensemble_probabilities
from training.export.report import Comparison
from training.front import FrontNetwork

# Target accuracies whose abstention thresholds the manifest records, and the standard errors they keep in hand.
SELECTIVE_MARGIN = 2.0


# Coverages whose prediction sets the manifest measures on the test split (any other is served as well).
SET_COVERAGES = (0.8, 0.9, 0.95, 0.99)

# Live answers per drift window: what the baseline's clean level is fitted for (the server's default window).
DRIFT_WINDOW = 1000


def compare_with_endpoints(endpoints: tuple[np.ndarray, np.ndarray] | None, member_val: np.ndarray,
                           member_test: np.ndarray, val_labels: np.ndarray, test_labels: np.ndarray,
                           temperature: float) -> list[Comparison] | None:
    """Curves: the exported ensemble (before and after temperature scaling) against the ensemble of its two
    endpoints and each endpoint alone (`endpoint_logits`)."""
    if endpoints is None:
        return None
    ends_val, ends_test = endpoints

    def row(name: str, val: np.ndarray, test: np.ndarray, t: float = 1.0) -> Comparison:
        return Comparison(name=name, members=val.shape[1],
                          test=classification_metrics(tempered_ensemble_probabilities(test, t), test_labels),
                          val=classification_metrics(tempered_ensemble_probabilities(val, t), val_labels))

    count = member_val.shape[1]
    return [
        row(f"curve ensemble ({count} points)", member_val, member_test),
        row(f"curve ensemble ({count} points), temperature {temperature:.3f}", member_val, member_test, temperature),
        row("endpoint ensemble (2 networks)", ends_val, ends_test),
        row("start network alone", ends_val[:, :1], ends_test[:, :1]),
        row("end network alone", ends_val[:, 1:], ends_test[:, 1:]),
    ]


def fit_cascade_spec(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray, test_labels: np.ndarray,
                     temperature: float, max_nll_increase: float, max_accuracy_drop: float,
                     min_gain_kept: float, front: FrontNetwork | None = None) -> CascadeSpec:
    """The anytime ensemble of tempered members (behind the front network, where it pays), fitted on the validation
    logits [N, K, C] alone and then measured on the test logits: the test split never takes part in choosing it."""
    val, test = tempered_members(member_val, temperature), tempered_members(member_test, temperature)
    front_val, front_test = (front.val, front.test) if front is not None else (None, None)
    fitted = fit_cascade(val, val_labels, max_nll_increase, max_accuracy_drop, min_gain_kept,
                         front_probabilities=front_val)
    cascade = fitted.cascade
    answers, used = run_cascade(test, cascade, front_test)
    test_kept = lead(test, test_labels).kept(quality(answers, test_labels, used))
    full = Cascade.full(cascade.members)
    return CascadeSpec(
        stages=list(cascade.stages), thresholds=list(cascade.thresholds), max_nll_increase=max_nll_increase,
        max_accuracy_drop=max_accuracy_drop, min_gain_kept=min_gain_kept, front=cascade.front,
        validation=_cascade_quality(val, val_labels, cascade, front_val),
        validation_full=_cascade_quality(val, val_labels, full),
        test=_cascade_quality(test, test_labels, cascade, front_test),
        test_full=_cascade_quality(test, test_labels, full),
        gain_kept_validation=_gain_kept(fitted.lead.kept(fitted.quality)), gain_kept_test=_gain_kept(test_kept))


def member_order(member_val: np.ndarray, val_labels: np.ndarray, order: Literal["best-first", "as-trained"]
                 ) -> list[int]:
    """The members' indices in the order export writes them: by each one's validation NLL, best first (ties keep the
    trained order), or as trained."""
    count = member_val.shape[1]
    if order == "as-trained":
        return list(range(count))
    nll = [classification_metrics(softmax(member_val[:, index]), val_labels).nll for index in range(count)]
    return sorted(range(count), key=lambda index: nll[index])


def _gain_kept(kept: tuple[float | None, float | None]) -> GainKept:
    return GainKept(nll=kept[0], ece=kept[1])


def kept_in_words(kept: GainKept | None) -> str:
    """'NLL 96 %, ECE 100 %' (a metric the ensemble does not lead on: 'no lead')."""
    if kept is None:
        return "nothing measured"
    return ", ".join(f"{name} {'no lead' if value is None else f'{100 * value:.0f} %'}"
                     for name, value in (("NLL", kept.nll), ("ECE", kept.ece)))


def fit_selective_spec(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray,
                       test_labels: np.ndarray, temperature: float, targets: Sequence[float] = (0.95, 0.97, 0.99),
                       default_target: float = 0.99, signal: str | None = None) -> SelectiveSpec:
    """The signal (the best on validation, unless `signal` names one) and thresholds of selective prediction,
    fitted on the validation logits [N, K, C] alone, then measured on the test logits: the test split never takes
    part in choosing them."""
    val, test = tempered_members(member_val, temperature), tempered_members(member_test, temperature)
    val_probabilities, test_probabilities = val.mean(axis=1), test.mean(axis=1)
    best, curves = best_signal(val_probabilities, val, val_labels)
    signal = best if signal is None else signal
    val_scores = selective_score(signal, val_probabilities, val)
    test_scores = selective_score(signal, test_probabilities, test)
    val_correct = val_probabilities.argmax(axis=-1) == val_labels
    test_correct = test_probabilities.argmax(axis=-1) == test_labels
    thresholds = []
    for target in targets:
        threshold = fit_threshold(curves[signal], target, SELECTIVE_MARGIN)
        val_kept = val_scores >= threshold if threshold is not None else np.zeros(len(val_scores), dtype=bool)
        test_kept = test_scores >= threshold if threshold is not None else np.zeros(len(test_scores), dtype=bool)
        thresholds.append(AbstentionThreshold(
            target_accuracy=target, threshold=threshold, validation_coverage=float(val_kept.mean()),
            validation_accuracy=float(val_correct[val_kept].mean()) if val_kept.any() else None,
            test_coverage=float(test_kept.mean()),
            test_accuracy=float(test_correct[test_kept].mean()) if test_kept.any() else None))
    sampled = {name: curve.sampled() for name, curve in curves.items()}
    return SelectiveSpec(signal=signal, margin=SELECTIVE_MARGIN, thresholds=thresholds, default_target=default_target,
                         curves=[RiskCoverageCurve(signal=name, area=curve.area, coverage=points.coverage.tolist(),
                                                   accuracy=points.accuracy.tolist(),
                                                   thresholds=points.thresholds.tolist(), count=points.count)
                                 for name, curve in curves.items() for points in [sampled[name]]])


def selective_curve(member_logits: np.ndarray, labels: np.ndarray, temperature: float, signal: str) -> RiskCoverage:
    """The risk-coverage curve of the tempered ensemble of member logits [N, K, C] ranked by `signal`."""
    members = tempered_members(member_logits, temperature)
    probabilities = members.mean(axis=1)
    return risk_coverage(selective_score(signal, probabilities, members), probabilities.argmax(axis=-1) == labels)


def fit_drift_baseline(member_val: np.ndarray, val_labels: np.ndarray, temperature: float,
                       window: int = DRIFT_WINDOW) -> DriftBaseline:
    """The drift score's baseline and the map that estimates accuracy without labels: the tempered ensemble's
    answers on the validation logits [N, K, C] and labels [N]."""
    outputs = ensemble_outputs(tempered_members(member_val, temperature).astype(np.float32))
    baseline = fit_baseline(outputs, member_val.shape[-1], window)
    correct = outputs["predicted_class"] == val_labels
    accuracy = AccuracyMap.fit(outputs["confidence"], correct)
    return DriftBaseline(histograms=baseline.histograms, predicted=baseline.predicted,
                         clean_level=baseline.clean_level, window=window, edges=baseline.edges,
                         bin_accuracy=list(accuracy.accuracy), validation_accuracy=float(correct.mean()))


def fit_conformal_spec(member_val: np.ndarray, val_labels: np.ndarray, member_test: np.ndarray,
                       test_labels: np.ndarray, temperature: float, default_score: Score = "lac",
                       default_coverage: float = 0.9) -> ConformalSpec:
    """Every conformity score fitted on the tempered ensemble's validation logits [N, K, C] and labels alone, then
    its sets measured on the test split at `SET_COVERAGES` (and the default coverage)."""
    val = tempered_members(member_val, temperature).mean(axis=1)
    test = tempered_members(member_test, temperature).mean(axis=1)
    coverages = sorted({*SET_COVERAGES, default_coverage})
    scores = []
    for score in SCORES:
        fitted = Conformal.fit(val, val_labels, score)
        scores.append(ConformalScore(score=score, calibration=fitted.calibration.tolist(), k_reg=fitted.k_reg,
                                     penalty=fitted.penalty if score == "raps" else 0.0,
                                     test=[set_quality(fitted.sets(test, coverage), test_labels, coverage)
                                           for coverage in coverages]))
    return ConformalSpec(scores=scores, default_score=default_score, default_coverage=default_coverage)


def set_quality(sets: np.ndarray, labels: np.ndarray, coverage: float) -> SetQuality:
    """How prediction sets [N, C] at `coverage` fare against the true classes [N]."""
    covered = sets[np.arange(len(labels)), labels]
    present = np.unique(labels)
    by_class = np.array([covered[labels == label].mean() for label in present])
    worst = int(np.argmin(by_class))
    return SetQuality(coverage=coverage, marginal=float(covered.mean()), mean_size=float(sets.sum(axis=1).mean()),
                      empty=float((sets.sum(axis=1) == 0).mean()), worst_class=float(by_class[worst]),
                      worst_class_index=int(present[worst]))


def tempered_members(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Member logits [N, K, C] as the served members' tempered probabilities [N, K, C]."""
    return softmax(logits.astype(np.float64) / temperature)


def _cascade_quality(members: np.ndarray, labels: np.ndarray, cascade: Cascade, front: np.ndarray | None = None
                     ) -> CascadeQuality:
    answers, used = run_cascade(members, cascade, front)
    metrics = classification_metrics(answers, labels)
    return CascadeQuality(accuracy=metrics.accuracy, nll=metrics.nll, ece=metrics.ece,
                          members_per_image=float(np.mean(used)))
