"""Served predictions kept for a while, so labels reported later can be joined to them.

A prediction is named by (model, request id, position in that request's batch). Requests
without an id cannot be labelled and are not kept. The store is bounded twice: at most
`max_predictions` images (the oldest requests go first) and at most `ttl_seconds` old. A
second request with the same id for the same model replaces the first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidInput, ServingError


class UnknownPrediction(ServingError):
    """No kept prediction has that model, request id and position (never served, or expired): NOT_FOUND."""


class AlreadyLabelled(ServingError):
    """That prediction already has its label; it is not counted twice: ALREADY_EXISTS."""


@dataclass(frozen=True)
class Label:
    model: str
    request_id: str
    position: int
    true_class: int


@dataclass(frozen=True)
class Joined:
    """A label joined to what was served for it."""

    model: str
    version: int
    probabilities: np.ndarray
    true_class: int


@dataclass
class _Served:
    version: int
    probabilities: np.ndarray  # [B, C] as served
    labelled: np.ndarray  # [B] bool
    expires: float


class PredictionStore:
    def __init__(self, max_predictions: int, ttl_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_predictions < 1 or ttl_seconds <= 0:
            raise ValueError("max_predictions must be >= 1 and ttl_seconds > 0")
        self.max_predictions, self.ttl_seconds, self._clock = max_predictions, ttl_seconds, clock
        self._served: OrderedDict[tuple[str, str], _Served] = OrderedDict()
        self._count = 0
        # remember() runs on the event loop and join() may too; the lock keeps them whole if not.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Predictions kept now."""
        return self._count

    def remember(self, model: str, version: int, request_id: str, probabilities: np.ndarray) -> None:
        """Keep a request's probabilities [B, C]; a request without an id is not kept."""
        if not request_id or len(probabilities) > self.max_predictions:
            return
        with self._lock:
            now = self._clock()
            self._drop(self._served.pop((model, request_id), None))
            self._expire(now)
            while self._count + len(probabilities) > self.max_predictions:
                self._drop(self._served.popitem(last=False)[1])
            self._served[(model, request_id)] = _Served(version, np.array(probabilities, dtype=np.float32),
                                                        np.zeros(len(probabilities), dtype=bool),
                                                        now + self.ttl_seconds)
            self._count += len(probabilities)

    def join(self, labels: Sequence[Label]) -> list[Joined]:
        """Join every label to its prediction, all or none: one bad label and nothing is marked labelled."""
        with self._lock:
            self._expire(self._clock())
            found: list[tuple[_Served, Label]] = []
            seen: set[tuple[str, str, int]] = set()
            for index, label in enumerate(labels):
                where = f"label {index} (model {label.model!r}, request id {label.request_id!r}, position " \
                        f"{label.position})"
                served = self._served.get((label.model, label.request_id))
                if served is None:
                    raise UnknownPrediction(f"{where}: no prediction kept for it (never served with that id, or "
                                            f"older than {self.ttl_seconds:g} s or pushed out of the store); no "
                                            "label of this report was counted")
                if label.position >= len(served.labelled):
                    raise InvalidInput(f"{where}: that request had {len(served.labelled)} images; no label of this "
                                       "report was counted")
                classes = served.probabilities.shape[1]
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
            return [Joined(label.model, served.version, served.probabilities[label.position], label.true_class)
                    for served, label in found]

    def _expire(self, now: float) -> None:
        # Entries are in arrival order and share one TTL, so the expired ones are at the front.
        while self._served:
            first = next(iter(self._served.values()))
            if first.expires > now:
                break
            self._drop(self._served.popitem(last=False)[1])

    def _drop(self, served: _Served | None) -> None:
        if served is not None:
            self._count -= len(served.labelled)
