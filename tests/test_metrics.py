from __future__ import annotations

import math

import numpy as np
import pytest

from artefact.calibration import confidence_bin
from artefact.metrics import accuracy, brier, classification_metrics, ece, nll
from artefact.uncertainty import entropy, mutual_information
from service.feedback import CalibrationWindow
from training.ensembles import ensemble_probabilities, prefix_metrics

PROBABILITIES = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]])
LABELS = np.array([0, 0, 2])


def test_hand_computed_values() -> None:
    assert accuracy(PROBABILITIES, LABELS) == pytest.approx(2 / 3)
    assert nll(PROBABILITIES, LABELS) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.8)) / 3)
    # Squared errors per row: 0.09+0.04+0.01, 0.36+0.25+0.01, 0.01+0.01+0.04.
    assert brier(PROBABILITIES, LABELS) == pytest.approx((0.14 + 0.62 + 0.06) / 3)
    # Each confidence (0.7, 0.5, 0.8) sits in its own bin: |1-0.7| + |0-0.5| + |1-0.8|, over 3.
    assert ece(PROBABILITIES, LABELS) == pytest.approx((0.3 + 0.5 + 0.2) / 3)


def test_ece_pools_a_bin() -> None:
    # 0.90 and 0.92 share the bin (0.8667, 0.9333]: one right, one wrong -> |1 - 1.82| / 4 of weight.
    probabilities = np.array([[0.90, 0.10], [0.92, 0.08], [0.2, 0.8], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    expected = (abs(1 - (0.90 + 0.92)) + abs(1 - 0.8) + abs(0 - 0.55)) / 4
    assert ece(probabilities, labels) == pytest.approx(expected)


def test_bins_include_their_upper_edge() -> None:
    edges = np.linspace(0, 1, 16)[1:]
    assert confidence_bin(edges).tolist() == list(range(15))
    assert confidence_bin(np.array([0.5, 1.0, 0.0667])).tolist() == [7, 14, 1]


def test_perfect_and_nll_floor() -> None:
    metrics = classification_metrics(np.eye(3), np.arange(3))
    assert (metrics.accuracy, metrics.nll, metrics.ece, metrics.brier) == (1.0, 0.0, 0.0, 0.0)
    assert math.isfinite(nll(np.array([[1.0, 0.0]]), np.array([1])))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="expected probabilities"):
        accuracy(PROBABILITIES, np.array([0, 1]))


def test_ensembles_average_probabilities_not_logits() -> None:
    members = [np.array([[0.9, 0.1]]), np.array([[0.3, 0.7]])]
    assert ensemble_probabilities(members)[0].tolist() == pytest.approx([0.6, 0.4])
    prefixes = prefix_metrics(members, np.array([0]))
    assert [m.nll for m in prefixes] == pytest.approx([-math.log(0.9), -math.log(0.6)])


def test_uncertainty_decomposition() -> None:
    agree = np.array([[[0.5, 0.5], [0.5, 0.5]]])  # one image [K = 2 members, C = 2 classes]
    disagree = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert entropy(np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert mutual_information(agree)[0] == pytest.approx(0.0)
    assert mutual_information(disagree)[0] == pytest.approx(math.log(2))


def test_the_serving_window_agrees_with_the_training_metrics() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10) * 0.3, size=500)
    labels = rng.integers(0, 10, size=500)
    window = CalibrationWindow(size=200)
    for row, label in zip(probabilities, labels, strict=True):
        window.add(row, row[None, :], 1, int(label))
    summary, last = window.summary(), slice(300, 500)
    assert len(window) == 200
    assert summary["ece"] == pytest.approx(ece(probabilities[last], labels[last]), abs=1e-12)
    assert summary["accuracy"] == pytest.approx(accuracy(probabilities[last], labels[last]), abs=1e-12)
    assert summary["nll"] == pytest.approx(nll(probabilities[last], labels[last]), abs=1e-12)
    assert summary["brier"] == pytest.approx(brier(probabilities[last], labels[last]), abs=1e-12)
    assert CalibrationWindow(5).summary() == {}
