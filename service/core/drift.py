"""The live drift score of one ensemble version: its last answers against the validation baseline.

Every served image's label-free signals (confidence, entropy, mutual information) and predicted
class go into a ring buffer of the last `size` answers; the score (`artefact.drift`) is computed
from it when Prometheus scrapes, and only once the window is full: a half-empty window scores high
by sampling noise alone. The same window's confidences estimate the accuracy without labels
(`artefact.estimation`), from the first answer on. The manifest's clean level is fitted for
windows of the baseline's own size; another window size scales it by the ratio of the sizes (the
divergence that sampling noise alone gives falls as one over the window), an approximation the
docs state.

A recalibrated version serves at a new temperature while its baseline was taken at the old one:
its answers are brought back to that temperature before they enter the window, so recalibration
alone does not look like drift.
"""

from __future__ import annotations

import threading

import numpy as np

from artefact.drift import SIGNALS, Baseline, drift_score
from artefact.estimation import AccuracyMap
from artefact.manifest import Manifest
from artefact.uncertainty import outputs_at
from service.core.ensemble import MEMBERS_USED

_COLUMNS = (*SIGNALS, "predicted_class")


def drift_needs(manifest: Manifest) -> tuple[str, ...]:
    """Outputs every run of this version must compute for its drift window, beyond the label-free signals."""
    if manifest.drift is None or manifest.temperature_ratio(manifest.drift.temperature) == 1.0:
        return ()
    return ("probabilities", "member_probabilities", MEMBERS_USED)


class DriftWindow:
    """The last `size` answers of one version and their drift score."""

    def __init__(self, manifest: Manifest, size: int = 0) -> None:
        spec = manifest.drift
        if spec is None:
            raise ValueError(f"{manifest.name} version {manifest.version} has no drift baseline")
        self.size = size or spec.window
        self.baseline = Baseline.of(spec, len(manifest.classes))
        self.clean_level = spec.clean_level * spec.window / self.size
        self._ratio = manifest.temperature_ratio(spec.temperature)
        self.accuracy = None if spec.bin_accuracy is None else AccuracyMap(tuple(spec.bin_accuracy), ())
        self.validation_accuracy = spec.validation_accuracy
        self._values = {column: np.zeros(self.size, dtype=np.int64 if column == "predicted_class" else np.float64)
                        for column in _COLUMNS}
        self._next = self._filled = 0
        # Answers arrive on the event loop; Prometheus scrapes from its own thread.
        self._lock = threading.Lock()

    @property
    def filled(self) -> int:
        """Answers in the window now (at most `size`)."""
        return self._filled

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        """A batch's answers (its signals, and for a recalibrated version its members' probabilities)."""
        if self._ratio != 1.0:
            outputs = outputs_at(outputs["member_probabilities"], outputs[MEMBERS_USED], self._ratio,
                                 outputs["probabilities"])
        count = len(outputs["predicted_class"])
        keep = min(count, self.size)  # a batch larger than the window leaves only its last answers
        with self._lock:
            positions = (self._next + np.arange(keep)) % self.size
            for column in _COLUMNS:
                self._values[column][positions] = outputs[column][count - keep:]
            self._next = int((self._next + keep) % self.size)
            self._filled = min(self.size, self._filled + keep)

    def estimated_accuracy(self) -> float | None:
        """The accuracy the window's confidences estimate (`artefact.estimation`); None while it is empty or the
        version has no accuracy map (exported before it existed)."""
        if self.accuracy is None:
            return None
        with self._lock:
            if not self._filled:
                return None
            confidence = self._values["confidence"][: self._filled].copy() if self._filled < self.size else \
                self._values["confidence"].copy()
        return self.accuracy.estimate(confidence)

    def score(self) -> float | None:
        """The window's drift score; None until it holds `size` answers."""
        with self._lock:
            if self._filled < self.size:
                return None
            window = {column: values.copy() for column, values in self._values.items()}
        return drift_score(self.baseline, window)
