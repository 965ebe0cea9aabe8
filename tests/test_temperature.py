"""The one temperature fit (`artefact.calibration.fit_temperature`) that export and the server share."""

from __future__ import annotations

import numpy as np
import pytest

from artefact.calibration import TEMPERATURE_RANGE, fit_temperature, tempered_nll


def _overconfident(rng: np.random.Generator, images: int = 2000, members: int = 4, classes: int = 10
                   ) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, classes, images)
    logits = rng.normal(size=(images, members, classes)) * 4
    logits[np.arange(images), :, labels] += 3  # informative, but far too sure
    return logits, labels


def test_the_fit_is_the_minimum_of_the_nll() -> None:
    logits, labels = _overconfident(np.random.default_rng(0))
    temperature = fit_temperature(logits, labels)
    nll = tempered_nll(logits, labels, temperature)
    assert temperature > 1.5, "overconfident members are cooled down"
    for nearby in (0.99, 1.01, 0.9, 1.1, 2.0):
        assert nll <= tempered_nll(logits, labels, temperature * nearby)


def test_a_constant_added_to_logits_changes_nothing() -> None:
    """The server refits from the members' log-probabilities, which are the logits less a constant per member."""
    rng = np.random.default_rng(1)
    logits, labels = _overconfident(rng)
    shifted = logits + rng.normal(size=(*logits.shape[:2], 1)) * 10
    assert fit_temperature(shifted, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-5)


def test_members_used_count_only_the_members_that_answered() -> None:
    rng = np.random.default_rng(2)
    logits, labels = _overconfident(rng)
    junk = logits.copy()
    junk[:, 2:] = rng.normal(size=junk[:, 2:].shape) * 50  # members that never ran: must not matter
    used = np.full(len(labels), 2)
    assert fit_temperature(junk, labels, used) == pytest.approx(fit_temperature(logits[:, :2], labels), rel=1e-6)


def test_well_calibrated_members_keep_a_temperature_near_one() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(20000, 1, 5)) * 2
    probabilities = np.exp(logits[:, 0]) / np.exp(logits[:, 0]).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in probabilities])  # labels drawn from the predictions
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_bad_input_is_named() -> None:
    logits, labels = _overconfident(np.random.default_rng(4), images=10)
    with pytest.raises(ValueError, match=r"\[N, K, C\]"):
        fit_temperature(logits[0], labels)
    with pytest.raises(ValueError, match="classes"):
        fit_temperature(logits, labels + 10)
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(np.full_like(logits, np.nan), labels)
    with pytest.raises(ValueError, match="members used"):
        fit_temperature(logits, labels, np.zeros(10, dtype=int))
    assert TEMPERATURE_RANGE[0] <= fit_temperature(logits, labels) <= TEMPERATURE_RANGE[1]
