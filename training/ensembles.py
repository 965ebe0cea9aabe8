"""Ensembles average member probabilities (not logits); quality of every prefix 1..K."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from artefact.manifest import Metrics
from artefact.metrics import classification_metrics


def ensemble_probabilities(member_probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of K members' probabilities [N, C] -> [N, C]."""
    if not member_probabilities:
        raise ValueError("an ensemble needs at least one member")
    mean: np.ndarray = np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in member_probabilities]), axis=0)
    return mean


def prefix_metrics(member_probabilities: Sequence[np.ndarray], labels: np.ndarray) -> list[Metrics]:
    """Metrics of the ensembles of the first 1, 2, ..., K members, in member order."""
    running = np.zeros_like(np.asarray(member_probabilities[0], dtype=np.float64))
    results = []
    for count, probabilities in enumerate(member_probabilities, start=1):
        running += probabilities
        results.append(classification_metrics(running / count, labels))
    return results
