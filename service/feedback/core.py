"""What feedback is made of: predictions served, labels sent back, their join, and the store interface.

A prediction is named by (caller, model, request id); a label by that and the image's position
in the request's batch. A store keeps predictions for labels to join and keeps the joined labels:
`MemoryStore` in this process (`service.feedback.memory`), `SqlStore` in SQLite or PostgreSQL,
shared by every process that opens the same database (`service.feedback.sql`). Joining is all or
none: one label of a report that cannot be joined and none is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import InvalidInput
from service.feedback.writer import WriterStats


@dataclass(frozen=True)
class Label:
    model: str
    request_id: str
    position: int
    true_class: int


def where(index: int, label: Label) -> str:
    """How a report's label is named in an error (both stores say it in the same words)."""
    return f"label {index} (model {label.model!r}, request id {label.request_id!r}, position {label.position})"


def check_label(index: int, label: Label, images: int, classes: int) -> None:
    """`InvalidInput` unless the label's position and class fit the prediction it names."""
    if label.position >= images:
        raise InvalidInput(f"{where(index, label)}: that request had {images} images; no label of this report was "
                           "counted")
    if label.true_class >= classes:
        raise InvalidInput(f"{where(index, label)}: true class {label.true_class} is not one of the model's "
                           f"{classes} classes (0..{classes - 1}); no label of this report was counted")


def already_labelled(index: int, label: Label) -> str:
    return (f"{where(index, label)}: already labelled, not counted twice; no label of this report was counted "
            "(send the others again without it)")


@dataclass(frozen=True)
class Served:
    """What one request was served: the ensemble's probabilities [B, C], its members' [B, K, C] (zero for members
    an image did not go through), how many members answered each image [B], and where it was answered with
    prediction sets, their coverage and the sets [B, C]."""

    probabilities: np.ndarray
    member_probabilities: np.ndarray
    used: np.ndarray
    coverage: float | None = None
    sets: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return (self.probabilities.nbytes + self.member_probabilities.nbytes + self.used.nbytes
                + (self.sets.nbytes if self.sets is not None else 0))

    def joined(self, model: str, version: int, position: int, true_class: int) -> Joined:
        """Image `position`'s answer joined to its label."""
        covered = None if self.sets is None else bool(self.sets[position, true_class])
        return Joined(model, version, self.probabilities[position], self.member_probabilities[position],
                      int(self.used[position]), true_class, self.coverage if self.sets is not None else None,
                      covered)


@dataclass(frozen=True)
class Prediction:
    """A served request as a store keeps it."""

    caller: str
    model: str
    request_id: str
    version: int
    served: Served
    served_at: float
    """Seconds since the epoch (the serving replica's clock)."""

    @property
    def nbytes(self) -> int:
        return self.served.nbytes + len(self.caller) + len(self.model) + len(self.request_id)


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
    coverage: float | None = None
    """The coverage of the prediction set it was answered with; None: answered without one."""
    covered: bool | None = None
    """Whether that set held the true class."""


@dataclass(frozen=True)
class LabelledWindow:
    """The last labelled predictions of a model version, oldest first: the ensemble's probabilities [N, C] and its
    members' [N, K, C] as served, members used [N], true classes [N]."""

    probabilities: np.ndarray
    members: np.ndarray
    used: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> LabelledWindow:
        return cls(np.zeros((0, 0), dtype=np.float32), np.zeros((0, 0, 0), dtype=np.float32),
                   np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)


class Store(Protocol):
    kind: str
    """memory, sqlite or postgresql."""
    shared: bool
    """Whether other processes opening the same URL see the same predictions and labels."""
    location: str
    """Where it keeps them, for logs: a path or a URL without its password."""

    def start(self) -> None:
        """Start writing in the background (and create the schema once the database answers)."""

    def remember(self, prediction: Prediction) -> None:
        """Keep a served prediction without waiting; it may be dropped (and counted) when the store falls behind."""

    def join(self, labels: Sequence[Label], caller: str, replica: str) -> list[Joined]:
        """Join every label to a prediction `caller` was served (all or none) and keep the joined labels before
        returning; `UnknownPrediction`, `InvalidInput` or `AlreadyLabelled` name the first label that fails."""

    def window(self, model: str, version: int, size: int) -> LabelledWindow | None:
        """The last `size` labels joined to predictions of a model version, from every process sharing the store;
        None when the store keeps no labels itself (memory: the server's own windows hold them)."""

    def lock(self, name: str) -> AbstractContextManager[None]:
        """Exclusive across every process sharing the store while held (recalibration publishes under it)."""

    def stats(self) -> WriterStats | None:
        """The background writer's counts; None for a store without one."""

    def close(self, timeout: float) -> None:
        """Write what is queued within `timeout` seconds, then release the store."""
