"""Feedback: served predictions kept for a while, labels joined to them, live calibration from the labels.

A prediction is named by (model, request id, position in that request's batch). Requests
without an id cannot be labelled and are not kept. The store is bounded three times: at most
`max_predictions` images and `max_bytes` bytes (the oldest requests go first, and a model
with many classes costs more per image), and at most `ttl_seconds` old. A
second request with the same id for the same model replaces the first. Every joined label is
scored (`artefact.calibration`), counted by the observer and added to its model's window of
the last labelled predictions. The store keeps the members' probabilities too (and how many
members answered each image): from them `service.recalibrate` fits a new temperature for the
window's labels, as export fits one on the validation split.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from artefact.calibration import Scored, binned_ece, score
from service.errors import AlreadyLabelled, FeedbackOff, InvalidInput, UnknownPrediction, check_length
from service.observer import Observer


@dataclass(frozen=True)
class Label:
    model: str
    request_id: str
    position: int
    true_class: int


@dataclass(frozen=True)
class Served:
    """What one request was served: the ensemble's probabilities [B, C], its members' [B, K, C] (zero for members
    an image did not go through) and how many members answered each image [B]."""

    probabilities: np.ndarray
    member_probabilities: np.ndarray
    used: np.ndarray


@dataclass(frozen=True)
class Joined:
    """A label joined to what was served for it."""

    model: str
    version: int
    probabilities: np.ndarray
    member_probabilities: np.ndarray
    """[K, C], as served: zero for members that did not answer."""
    used: int
    true_class: int


@dataclass
class _Served:
    version: int
    served: Served
    labelled: np.ndarray  # [B] bool
    expires: float


# What a kept request costs beyond its arrays: the key's strings, the entry and the dictionary slot.
_ENTRY_BYTES = 512
MAX_LABELS = 10_000
"""Most labels one report may carry: a report is joined on the event loop."""


def _size(key: tuple[str, str, str], served: _Served) -> int:
    arrays = served.served
    return (_ENTRY_BYTES + sum(len(part) for part in key) + arrays.probabilities.nbytes
            + arrays.member_probabilities.nbytes + arrays.used.nbytes + served.labelled.nbytes)


class PredictionStore:
    def __init__(self, max_predictions: int, ttl_seconds: float, max_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_predictions < 1 or ttl_seconds <= 0 or max_bytes < 1:
            raise ValueError("max_predictions and max_bytes must be >= 1 and ttl_seconds > 0")
        self.max_predictions, self.max_bytes = max_predictions, max_bytes
        self.ttl_seconds, self._clock = ttl_seconds, clock
        # Keyed by (caller, model, request id): a caller labels only its own predictions, and one caller's
        # request ids never replace another's.
        self._served: OrderedDict[tuple[str, str, str], _Served] = OrderedDict()
        self._count = self._bytes = 0
        # remember() runs on the event loop and join() may too; the lock keeps them whole if not.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Predictions kept now."""
        return self._count

    @property
    def bytes(self) -> int:
        """What the kept predictions cost, as the store counts it against `max_bytes`."""
        return self._bytes

    def remember(self, model: str, version: int, request_id: str, answer: Served, caller: str = "") -> None:
        """Keep what a request was served, for `caller`; a request without an id is not kept."""
        if not request_id:
            return
        key = (caller, model, request_id)
        images = len(answer.probabilities)
        with self._lock:
            now = self._clock()
            self._drop(key, self._served.pop(key, None))
            kept = Served(np.array(answer.probabilities, dtype=np.float32),
                          np.array(answer.member_probabilities, dtype=np.float32),
                          np.array(answer.used, dtype=np.int16))
            served = _Served(version, kept, np.zeros(images, dtype=bool), now + self.ttl_seconds)
            size = _size(key, served)
            if images > self.max_predictions or size > self.max_bytes:
                return
            self._expire(now)
            while self._count + images > self.max_predictions or self._bytes + size > self.max_bytes:
                self._drop(*self._served.popitem(last=False))
            self._served[key] = served
            self._count += images
            self._bytes += size

    def join(self, labels: Sequence[Label], caller: str = "") -> list[Joined]:
        """Join every label to a prediction `caller` was served, all or none: one bad label and nothing is marked
        labelled."""
        with self._lock:
            self._expire(self._clock())
            found: list[tuple[_Served, Label]] = []
            seen: set[tuple[str, str, int]] = set()
            for index, label in enumerate(labels):
                where = f"label {index} (model {label.model!r}, request id {label.request_id!r}, position " \
                        f"{label.position})"
                served = self._served.get((caller, label.model, label.request_id))
                if served is None:
                    raise UnknownPrediction(f"{where}: no prediction kept for it (never served with that id, or "
                                            f"older than {self.ttl_seconds:g} s or pushed out of the store); no "
                                            "label of this report was counted")
                if label.position >= len(served.labelled):
                    raise InvalidInput(f"{where}: that request had {len(served.labelled)} images; no label of this "
                                       "report was counted")
                classes = served.served.probabilities.shape[1]
                if label.true_class >= classes:
                    raise InvalidInput(f"{where}: true class {label.true_class} is not one of the model's "
                                       f"{classes} classes (0..{classes - 1}); no label of this report was counted")
                key = (label.model, label.request_id, label.position)
                if served.labelled[label.position] or key in seen:
                    raise AlreadyLabelled(f"{where}: already labelled, not counted twice; no label of this report "
                                          "was counted (send the others again without it)")
                seen.add(key)
                found.append((served, label))
            for served, label in found:
                served.labelled[label.position] = True
            return [Joined(label.model, served.version, served.served.probabilities[label.position],
                           served.served.member_probabilities[label.position],
                           int(served.served.used[label.position]), label.true_class)
                    for served, label in found]

    def _expire(self, now: float) -> None:
        # Entries are in arrival order and share one TTL, so the expired ones are at the front.
        while self._served:
            first = next(iter(self._served.values()))
            if first.expires > now:
                break
            self._drop(*self._served.popitem(last=False))

    def _drop(self, key: tuple[str, str, str], served: _Served | None) -> None:
        if served is not None:
            self._count -= len(served.labelled)
            self._bytes -= _size(key, served)


class CalibrationWindow:
    """ECE, accuracy, NLL and Brier over the last `size` labelled predictions, and what their members answered."""

    def __init__(self, size: int) -> None:
        self._scored: deque[Scored] = deque(maxlen=size)
        self._members: deque[tuple[np.ndarray, int, int]] = deque(maxlen=size)
        self.generation = 0
        """Counts the labels added: what was computed from the window is stale once it moves."""
        # Labels arrive on the event loop; a recalibration reads from a worker thread or the metrics server's.
        self._lock = threading.Lock()

    def add(self, scored: Scored, joined: Joined) -> None:
        with self._lock:
            self._scored.append(scored)
            # A copy: the joined row is a view of its whole request, which must not outlive the store's bounds.
            self._members.append((joined.member_probabilities.copy(), joined.used, joined.true_class))
            self.generation += 1

    def members(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window's member probabilities [N, K, C], members used [N] and true classes [N]."""
        with self._lock:
            entries = list(self._members)
        if not entries:
            return np.zeros((0, 0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return (np.stack([entry[0] for entry in entries]), np.array([entry[1] for entry in entries]),
                np.array([entry[2] for entry in entries]))

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
    """The server's feedback: its prediction store (None when feedback is off) and a window per model version."""

    def __init__(self, store: PredictionStore | None, window: int, observer: Observer) -> None:
        self.store, self.window, self._observer = store, window, observer
        self._windows: dict[tuple[str, int], CalibrationWindow] = {}

    def keeps(self, request_id: str) -> bool:
        """Whether what a request is served is kept for labels: feedback is on and the request has an id."""
        return self.store is not None and bool(request_id)

    def remember(self, model: str, version: int, request_id: str, answer: Served, caller: str = "") -> None:
        """Keep what a request with an id was served to `caller`, to join that caller's labels to it later."""
        if self.store is not None:
            self.store.remember(model, version, request_id, answer, caller)

    def window_of(self, model: str, version: int) -> CalibrationWindow | None:
        """The calibration window of a model version; None before its first label."""
        return self._windows.get((model, version))

    def windows(self) -> list[tuple[str, int, CalibrationWindow]]:
        """Every model version's calibration window."""
        return [(model, version, window) for (model, version), window in list(self._windows.items())]

    def report(self, labels: Sequence[Label], caller: str = "") -> int:
        """Join every label (all or none), count and score them; returns how many were accepted."""
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
        touched: dict[tuple[str, int], CalibrationWindow] = {}
        joined = self.store.join(labels, caller)
        for label in joined:
            key = (label.model, label.version)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = CalibrationWindow(self.window)
            scored = score(label.probabilities, label.true_class)
            window.add(scored, label)
            self._observer.observe_label(label.model, label.version, scored)
            touched[key] = window
        # The window's summary walks the whole window: once per model in the report, not per label.
        for (model, model_version), window in touched.items():
            self._observer.observe_window(model, model_version, window)
        return len(joined)
