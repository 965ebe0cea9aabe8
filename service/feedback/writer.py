"""Served predictions on their way to a database: a bounded queue and the thread that writes it in batches.

Nothing on the request path waits for the database. `remember` puts a prediction in the queue and
returns; when the queue is full (the database is slow or down and the backlog reached its bound)
the prediction is dropped and counted by reason. One writer thread takes what is queued, at most
`batch` predictions or what arrived within `flush_interval` of the first, and writes it in one
transaction. A batch that fails for want of the database (a connection refused, lost or timed
out) is kept and written again after a backoff that doubles up to `max_backoff`; one the database
refuses for its content is dropped and counted. `close` writes what is queued within its
deadline; what is left then is dropped and counted. A SIGKILL loses what was queued: at most the
queue's bounds, in practice the predictions of the last `flush_interval` while the database keeps
up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")

QUEUE_FULL = "queue_full"
REJECTED = "rejected"
SHUTDOWN = "shutdown"
DROP_REASONS = (QUEUE_FULL, REJECTED, SHUTDOWN)


class Unavailable(Exception):
    """The database cannot be reached now: the batch is kept and written again later."""


@dataclass(frozen=True)
class WriterStats:
    """What the writer did since it started, read at scrape time."""

    queued: int
    queued_bytes: int
    written: int
    dropped: dict[str, int]
    up: bool
    """Whether the last attempt to reach the database succeeded."""


class Writer(Generic[Item]):
    """A bounded queue of items and one daemon thread writing them with `write` (a batch per transaction)."""

    def __init__(self, write: Callable[[Sequence[Item]], None], size_of: Callable[[Item], int], *,
                 max_items: int, max_bytes: int, batch: int = 512, flush_interval: float = 0.2,
                 max_backoff: float = 2.0, housekeeping: Callable[[], None] | None = None,
                 housekeeping_interval: float = 60.0, name: str = "feedback-writer") -> None:
        if max_items < 1 or max_bytes < 1 or batch < 1 or flush_interval <= 0:
            raise ValueError("max_items, max_bytes and batch must be >= 1 and flush_interval > 0")
        self._write, self._size_of = write, size_of
        self.max_items, self.max_bytes, self.batch = max_items, max_bytes, batch
        self.flush_interval, self.max_backoff = flush_interval, max_backoff
        self._housekeeping, self._housekeeping_interval = housekeeping, housekeeping_interval
        self._queue: deque[tuple[Item, int]] = deque()
        self._bytes = 0
        self._written = 0
        self._writing = 0  # items taken off the queue and not written or dropped yet
        self._queued_total = 0  # every item ever queued, and every one written or dropped since: `flush` waits on them
        self._done_total = 0
        self._hurry = False
        self._dropped: Counter[str] = Counter()
        self._up = True
        self._closing = False
        self._deadline = float("inf")
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def put(self, item: Item) -> bool:
        """Queue `item` without waiting; False (and counted as dropped) when the queue is full or closing."""
        size = self._size_of(item)
        with self._condition:
            if self._closing:
                self._dropped[SHUTDOWN] += 1
                return False
            if len(self._queue) >= self.max_items or self._bytes + size > self.max_bytes:
                self._dropped[QUEUE_FULL] += 1
                return False
            self._queue.append((item, size))
            self._bytes += size
            self._queued_total += 1
            if len(self._queue) == 1 or len(self._queue) >= self.batch:
                self._condition.notify()
            return True

    def flush(self, timeout: float) -> bool:
        """Write what is queued now without waiting for the flush interval; True once it is written (or dropped),
        False if `timeout` seconds passed first."""
        ends = time.monotonic() + timeout
        with self._condition:
            target = self._queued_total
            self._hurry = True
            self._condition.notify_all()
            while self._done_total < target:
                left = ends - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(left)
            return True

    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        with self._condition:
            return not self._queue and not self._writing

    def mark_down(self) -> None:
        """The database did not answer (at start, before anything was written): `up` says so until a write succeeds."""
        with self._condition:
            self._up = False

    def stats(self) -> WriterStats:
        with self._condition:
            return WriterStats(len(self._queue), self._bytes, self._written, dict(self._dropped), self._up)

    def close(self, timeout: float) -> None:
        """Write what is queued within `timeout` seconds, then stop; what could not be written is dropped and
        counted (`shutdown`)."""
        with self._condition:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._condition.notify_all()
        if self._started:
            self._thread.join(timeout + 1.0)
        with self._condition:
            left = len(self._queue)
            if left:
                self._dropped[SHUTDOWN] += left
                self._done_total += left
                self._queue.clear()
                self._bytes = 0
                self._condition.notify_all()
                log.warning("%d served predictions were still queued for the feedback store at shutdown and are "
                            "lost (their labels will be NOT_FOUND)", left)

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_housekeeping = time.monotonic() + self._housekeeping_interval
        while True:
            batch = self._next_batch(next_housekeeping)
            if batch is None:
                return
            if batch:
                self._write_with_retries(batch)
            if self._housekeeping is not None and time.monotonic() >= next_housekeeping and not self._closing:
                next_housekeeping = time.monotonic() + self._housekeeping_interval
                try:
                    self._housekeeping()
                except Unavailable:
                    pass  # the next round tries again
                except Exception:
                    log.exception("feedback store housekeeping failed")

    def _next_batch(self, housekeeping_at: float) -> list[Item] | None:
        """Up to `batch` items, once `flush_interval` passed since the first arrived (or the batch is full, or the
        writer is closing); [] when housekeeping is due with nothing queued; None to stop."""
        with self._condition:
            while not self._queue:
                if self._closing:
                    return None
                wait = housekeeping_at - time.monotonic()
                if wait <= 0:
                    return []
                self._condition.wait(wait)
            flush_at = time.monotonic() + self.flush_interval
            while len(self._queue) < self.batch and not self._closing and not self._hurry \
                    and (left := flush_at - time.monotonic()) > 0:
                self._condition.wait(left)
            self._hurry = False
            taken = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            self._bytes -= sum(size for _, size in taken)
            self._writing = len(taken)
            return [item for item, _ in taken]

    def _write_with_retries(self, batch: list[Item]) -> None:
        backoff = min(0.1, self.max_backoff)
        while True:
            try:
                self._write(batch)
            except Unavailable as error:
                with self._condition:
                    if self._up:
                        log.warning("the feedback store is unreachable (%s): %d predictions wait in a batch, the "
                                    "queue holds the next ones up to its bounds; retrying", error, len(batch))
                    self._up = False
                    if self._closing and time.monotonic() >= self._deadline:
                        self._dropped[SHUTDOWN] += len(batch)
                        self._finished(len(batch))
                        return
                    self._condition.wait(min(backoff, max(0.0, self._deadline - time.monotonic())))
                backoff = min(2 * backoff, self.max_backoff)
                continue
            except Exception:
                log.exception("the feedback store refused a batch of %d served predictions; they are dropped",
                              len(batch))
                with self._condition:
                    self._dropped[REJECTED] += len(batch)
                    self._finished(len(batch))
                return
            with self._condition:
                if not self._up:
                    log.warning("the feedback store is reachable again")
                self._up = True
                self._written += len(batch)
                self._finished(len(batch))
            return

    def _finished(self, count: int) -> None:
        """A batch of `count` was written or dropped (the condition's lock is held)."""
        self._writing = 0
        self._done_total += count
        self._condition.notify_all()
