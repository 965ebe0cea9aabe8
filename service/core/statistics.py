"""Per-model counters behind the ModelStatistics RPC (Triton's meaning of each field).

`inference_count` counts images and `execution_count` model runs, so their ratio is the
mean batch size the dynamic batcher achieved. Durations are kept in nanoseconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.batching import BatchRecord


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStatistics:
    """What one served model version has done since it was loaded."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)
    """Model runs by batch size."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(self, record: BatchRecord) -> None:
        with self._lock:
            self.inference_count += record.images
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            for seconds in record.queue_seconds:
                self.queue.add(seconds)
            # As in Triton: every request of a run is charged the run's compute time here,
            # while the per-batch-size table counts each run once.
            self.compute.add(record.compute_seconds * record.requests, record.requests)
            self.batches.setdefault(record.images, Duration()).add(record.compute_seconds)

    def snapshot(self) -> ModelStatistics:
        """A consistent copy, for reading while requests go on."""
        with self._lock:
            return replace(self, success=replace(self.success), fail=replace(self.fail), queue=replace(self.queue),
                           compute=replace(self.compute),
                           batches={size: replace(runs) for size, runs in self.batches.items()},
                           _lock=threading.Lock())

    def record_request(self, seconds: float, ok: bool) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(seconds)
