"""The feedback store of one process: predictions kept in memory, labels joined at once.

Bounded three times: at most `max_predictions` images and `max_bytes` bytes (the oldest requests
go first, and a model with many classes costs more per image), and at most `ttl_seconds` old. A
second request with the same id for the same caller and model replaces the first. Nothing
survives the process, and only this process can join labels to what it served: a fleet shares a
SQL store instead (`service.feedback.sql`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from service.errors import AlreadyLabelled, UnknownPrediction
from service.feedback.core import (
    Joined,
    Label,
    LabelledWindow,
    Prediction,
    Served,
    already_labelled,
    check_label,
    where,
)
from service.feedback.writer import WriterStats

# What a kept request costs beyond its arrays: the key's strings, the entry and the dictionary slot.
_ENTRY_BYTES = 512


@dataclass
class _Kept:
    version: int
    served: Served
    labelled: np.ndarray  # [B] bool
    expires: float


def _size(key: tuple[str, str, str], kept: _Kept) -> int:
    return _ENTRY_BYTES + sum(len(part) for part in key) + kept.served.nbytes + kept.labelled.nbytes


class MemoryStore:
    kind = "memory"
    shared = False
    location = "this process's memory"

    def __init__(self, max_predictions: int, ttl_seconds: float, max_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_predictions < 1 or ttl_seconds <= 0 or max_bytes < 1:
            raise ValueError("max_predictions and max_bytes must be >= 1 and ttl_seconds > 0")
        self.max_predictions, self.max_bytes = max_predictions, max_bytes
        self.ttl_seconds, self._clock = ttl_seconds, clock
        # Keyed by (caller, model, request id): a caller labels only its own predictions, and one caller's
        # request ids never replace another's.
        self._kept: OrderedDict[tuple[str, str, str], _Kept] = OrderedDict()
        self._count = self._bytes = 0
        # remember() runs on the event loop and join() may too; the lock keeps them whole if not.
        self._lock = threading.Lock()
        self._exclusive = threading.Lock()

    def __len__(self) -> int:
        """Predictions kept now."""
        return self._count

    @property
    def bytes(self) -> int:
        """What the kept predictions cost, as the store counts it against `max_bytes`."""
        return self._bytes

    def start(self) -> None:
        pass

    def remember(self, prediction: Prediction) -> None:
        if not prediction.request_id:  # it could never be labelled
            return
        key = (prediction.caller, prediction.model, prediction.request_id)
        answer = prediction.served
        images = len(answer.probabilities)
        with self._lock:
            now = self._clock()
            self._drop(key, self._kept.pop(key, None))
            kept = _Kept(prediction.version, Served(np.array(answer.probabilities, dtype=np.float32),
                                                    np.array(answer.member_probabilities, dtype=np.float32),
                                                    np.array(answer.used, dtype=np.int16), answer.coverage,
                                                    None if answer.sets is None else np.array(answer.sets,
                                                                                              dtype=bool)),
                         np.zeros(images, dtype=bool), now + self.ttl_seconds)
            size = _size(key, kept)
            if images > self.max_predictions or size > self.max_bytes:
                return
            self._expire(now)
            while self._count + images > self.max_predictions or self._bytes + size > self.max_bytes:
                self._drop(*self._kept.popitem(last=False))
            self._kept[key] = kept
            self._count += images
            self._bytes += size

    def join(self, labels: Sequence[Label], caller: str, replica: str = "") -> list[Joined]:
        with self._lock:
            self._expire(self._clock())
            found: list[tuple[_Kept, Label]] = []
            seen: set[tuple[str, str, int]] = set()
            for index, label in enumerate(labels):
                kept = self._kept.get((caller, label.model, label.request_id))
                if kept is None:
                    raise UnknownPrediction(f"{where(index, label)}: no prediction kept for it (never served with "
                                            f"that id, or older than {self.ttl_seconds:g} s or pushed out of the "
                                            "store); no label of this report was counted")
                check_label(index, label, len(kept.labelled), kept.served.probabilities.shape[1])
                key = (label.model, label.request_id, label.position)
                if kept.labelled[label.position] or key in seen:
                    raise AlreadyLabelled(already_labelled(index, label))
                seen.add(key)
                found.append((kept, label))
            for kept, label in found:
                kept.labelled[label.position] = True
            return [kept.served.joined(label.model, kept.version, label.position, label.true_class)
                    for kept, label in found]

    def window(self, model: str, version: int, size: int) -> LabelledWindow | None:
        return None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self._exclusive:
            yield

    def stats(self) -> WriterStats | None:
        return None

    def close(self, timeout: float) -> None:
        pass

    def _expire(self, now: float) -> None:
        # Entries are in arrival order and share one TTL, so the expired ones are at the front.
        while self._kept:
            first = next(iter(self._kept.values()))
            if first.expires > now:
                break
            self._drop(*self._kept.popitem(last=False))

    def _drop(self, key: tuple[str, str, str], kept: _Kept | None) -> None:
        if kept is not None:
            self._count -= len(kept.labelled)
            self._bytes -= _size(key, kept)
