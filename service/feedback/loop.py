"""One server's feedback loop: what it serves goes to the store, labels come back, live calibration follows.

Every joined label is scored (`artefact.calibration`), counted by the observer of the replica
that received it (so Prometheus sums over replicas count each label once) and added to its model
version's window of the last labelled predictions, whose metrics are this replica's live
calibration. A window starts from the store's last labels of its version, so a restart or a new
replica does not start blind. Recalibration fits on `labelled`: with a shared store, the fleet's
last labels of the version, read from the database; with the memory store, this server's window.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from artefact.calibration import Scored, binned_ece, score
from service.core.observer import Observer
from service.errors import FeedbackOff, InvalidInput, check_length
from service.feedback.core import Joined, Label, LabelledWindow, Prediction, Served, Store

MAX_LABELS = 10_000
"""Most labels one report may carry."""


class CalibrationWindow:
    """ECE, accuracy, NLL and Brier over the last `size` labelled predictions, and what their members answered."""

    def __init__(self, size: int) -> None:
        self._scored: deque[Scored] = deque(maxlen=size)
        self._rows: deque[tuple[np.ndarray, np.ndarray, int, int]] = deque(maxlen=size)
        self.generation = 0
        """Counts the labels added: what was computed from the window is stale once it moves."""
        # Labels arrive on the event loop or a worker thread; a recalibration reads from another, the metrics
        # server from its own.
        self._lock = threading.Lock()

    def add(self, probabilities: np.ndarray, member_probabilities: np.ndarray, used: int, true_class: int) -> Scored:
        """Add one labelled prediction; returns its score."""
        scored = score(probabilities, true_class)
        with self._lock:
            self._scored.append(scored)
            # Copies: the rows may be views of their whole request, which must not outlive the store's bounds.
            self._rows.append((probabilities.copy(), member_probabilities.copy(), used, true_class))
            self.generation += 1
        return scored

    def labelled(self) -> LabelledWindow:
        """What the window holds, oldest first."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            return LabelledWindow.empty()
        return LabelledWindow(np.stack([row[0] for row in rows]), np.stack([row[1] for row in rows]),
                              np.array([row[2] for row in rows]), np.array([row[3] for row in rows]))

    def __len__(self) -> int:
        return len(self._scored)

    def summary(self) -> dict[str, float]:
        """The four metrics (accuracy and ECE as fractions); empty while nothing is labelled."""
        with self._lock:
            scored = list(self._scored)
        if not scored:
            return {}
        count = len(scored)
        index = np.fromiter((s.bin for s in scored), dtype=np.int64, count=count)
        confidence = np.fromiter((s.confidence for s in scored), dtype=np.float64, count=count)
        correct = np.fromiter((s.correct for s in scored), dtype=np.float64, count=count)
        return {
            "ece": binned_ece(index, confidence, correct),
            "accuracy": float(correct.sum() / count),
            "nll": sum(s.nll for s in scored) / count,
            "brier": sum(s.brier for s in scored) / count,
        }


class Feedback:
    """The server's feedback: its store (None when feedback is off) and a window per model version."""

    def __init__(self, store: Store | None, window: int, observer: Observer, replica: str = "",
                 sizes: Callable[[str], int] | None = None) -> None:
        """`window`: labels a version's window holds, unless `sizes` gives a model's own (its config.json's)."""
        self.store, self.window, self._observer, self.replica = store, window, observer, replica
        self.sizes = sizes
        self._windows: dict[tuple[str, int], CalibrationWindow] = {}
        self._guard = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether labels may come through other processes (the store is a database)."""
        return self.store is not None and self.store.shared

    def keeps(self, request_id: str) -> bool:
        """Whether what a request is served is kept for labels: feedback is on and the request has an id."""
        return self.store is not None and bool(request_id)

    def remember(self, model: str, version: int, request_id: str, answer: Served, served_at: float,
                 caller: str = "") -> None:
        """Keep what a request with an id was served to `caller`, to join that caller's labels to it later."""
        if self.store is not None and self.keeps(request_id):
            self.store.remember(Prediction(caller, model, request_id, version, answer, served_at))

    def size(self, model: str) -> int:
        """Labels the calibration windows of `model` hold."""
        return self.sizes(model) if self.sizes is not None else self.window

    def window_of(self, model: str, version: int) -> CalibrationWindow | None:
        """The calibration window of a model version; None before its first label."""
        return self._windows.get((model, version))

    def windows(self) -> list[tuple[str, int, CalibrationWindow]]:
        """Every model version's calibration window."""
        return [(model, version, window) for (model, version), window in list(self._windows.items())]

    def seed(self, model: str, version: int) -> None:
        """Start a version's window from the store's last labels of it (a shared store only; blocking: call it
        from a worker thread)."""
        if self.store is None or not self.shared:
            return
        stored = self.store.window(model, version, self.size(model))
        if stored is None or not len(stored):
            return
        with self._guard:
            if (model, version) in self._windows:
                return  # labels arrived meanwhile: the window is live already
            window = self._windows[(model, version)] = CalibrationWindow(self.size(model))
        for probabilities, members, used, true_class in zip(stored.probabilities, stored.members, stored.used,
                                                             stored.labels, strict=True):
            window.add(probabilities, members, int(used), int(true_class))
        self._observer.observe_window(model, version, window)

    def labelled(self, model: str, version: int) -> LabelledWindow:
        """The labels to fit a temperature on: the store's last `window` labels of the version where the store is
        shared (the fleet's), else this server's window. Blocking with a shared store."""
        if self.store is not None and self.shared:
            stored = self.store.window(model, version, self.size(model))
            if stored is not None:
                return stored
        window = self._windows.get((model, version))
        return window.labelled() if window is not None else LabelledWindow.empty()

    def lock(self, name: str) -> AbstractContextManager[None]:
        """The store's lock `name`, exclusive across every process sharing the store."""
        return self.store.lock(name) if self.store is not None else nullcontext()

    def report(self, labels: Sequence[Label], caller: str = "") -> int:
        """Join every label (all or none), count and score them; returns how many were accepted. Blocking with a
        shared store (the labels are committed first): call it from a worker thread."""
        if self.store is None:
            raise FeedbackOff("feedback is off on this server (--feedback false, or --metrics false without "
                              "--feedback true): no predictions are kept to label")
        if not labels:
            raise InvalidInput("the report holds no labels")
        if len(labels) > MAX_LABELS:
            raise InvalidInput(f"the report holds more than {MAX_LABELS} labels, the most taken per report "
                               "(split it)")
        for index, sent in enumerate(labels):
            check_length(f"label {index} model_name", sent.model)
            check_length(f"label {index} request_id", sent.request_id)
        joined = self.store.join(labels, caller, self.replica)
        self._count(joined)
        return len(joined)

    def _count(self, joined: Sequence[Joined]) -> None:
        touched: dict[tuple[str, int], CalibrationWindow] = {}
        for label in joined:
            key = (label.model, label.version)
            with self._guard:
                window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = CalibrationWindow(self.size(label.model))
            scored = window.add(label.probabilities, label.member_probabilities, label.used, label.true_class)
            self._observer.observe_label(label.model, label.version, scored)
            if label.coverage is not None and label.covered is not None:
                self._observer.observe_set_label(label.model, label.version, label.coverage, label.covered)
            touched[key] = window
        # The window's summary walks the whole window: once per model in the report, not per label.
        for (model, model_version), window in touched.items():
            self._observer.observe_window(model, model_version, window)
