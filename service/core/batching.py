"""Dynamic batching: requests from many clients merged into one model run.

A bounded queue feeds one worker task per model instance. A free worker takes the oldest
request, then keeps taking requests until the batch holds `max_batch_size` images (the largest
preferred batch size, where some are given) or `max_queue_delay` has passed since it started
collecting; a batch that has reached a preferred size leaves at once when nothing else waits.
Requests whose deadline has already passed are dropped before compute. Each instance runs in a thread of its own, so the
event loop never blocks on compute, and while one instance computes another collects the
next batch. Every finished run goes into the model's statistics and to the observer, as one
`BatchRecord`.

The queue is bounded by count and by waiting time (Triton's queue policy with REJECT): a
full queue is refused at once (`QueueFull`); so is a request that would wait longer than
`ADMIT_SHARE` of `max_queue_wait` (`QueueWait`), as estimated from the images ahead of it and
the rate the queue is measured to drain at (each instance's images per cycle, taken to taken,
while a backlog keeps it busy: compute, collecting and answering included); and a request that
did wait longer than the bound is refused when it is taken, before compute. Under overload the
queue settles where the estimate meets the admission bound, so without the margin about half the
requests admitted there would wait past the bound and be refused only after waiting it; with it,
only a sudden slowdown does that. An overloaded model answers UNAVAILABLE within a millisecond,
and the requests it accepts are answered within the bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from artefact.cascade import Cascade
from service.core.cpus import lower_thread_priority
from service.core.members import Plan
from service.core.observer import NULL_OBSERVER, Observer
from service.core.statistics import ModelStatistics
from service.errors import DeadlineExceeded, QueueFull, QueueWait, Retired

log = logging.getLogger(__name__)

ADMIT_SHARE = 0.8
"""A request is admitted while its expected wait is within this share of the wait bound: the rest of the bound
absorbs the estimate's noise, so admitted requests are served, not refused after waiting."""
RATE_SECONDS = 0.5
"""The measured rate's memory: a cycle weighs by its length, so the rate averages about the last half second of
busy cycles whether they are 3 or 300 ms long (a change of load shows within a second, one slow cycle does not
swing it)."""


@dataclass(frozen=True)
class RunOutput:
    """What one model run returns: every output asked for, and each member's compute time when timed."""

    outputs: dict[str, np.ndarray]
    member_seconds: list[float] = field(default_factory=list)
    front_images: int = 0
    """Images the front network ran on."""


Segment = tuple[int, Cascade | None]
"""Consecutive rows of a batch and the cascade that answers them (None: every member)."""
RunBatch = Callable[[np.ndarray, Sequence[str], Sequence[Segment]], RunOutput]


@dataclass(frozen=True)
class ModelKey:
    """The ensemble version a batcher serves, as its reports name it."""

    name: str = ""
    version: int = 0
    classes: Sequence[str] = ()


NO_MODEL = ModelKey()


@dataclass(frozen=True)
class Answer:
    """One request's outputs, the plan that answered it, and whether overload cut its plan."""

    outputs: dict[str, np.ndarray]
    plan: Plan | None = None
    degraded: bool = False


@dataclass
class _Pending:
    pixels: np.ndarray
    outputs: tuple[str, ...]
    deadline: float | None
    future: asyncio.Future[Answer]
    plan: Plan | None = None
    degraded: bool = False
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchRecord:
    """What one model run did: for statistics and metrics."""

    images: int
    requests: int
    queue_seconds: list[float]
    compute_seconds: float
    outputs: dict[str, np.ndarray]
    """Every output the run computed, for all its images."""
    member_seconds: list[float] = field(default_factory=list)
    """Each member's compute time, in per-member execution."""
    front_images: int = 0
    """Images the front network ran on."""


class DynamicBatcher:
    def __init__(self, runs: Sequence[RunBatch], max_batch_size: int = 64, max_queue_delay: float = 0.002,
                 max_queue_size: int = 1024, model: ModelKey = NO_MODEL, observer: Observer = NULL_OBSERVER,
                 max_queue_wait: float | None = None, degraded: Plan | None = None,
                 degrade_after: float | None = None, preferred: Sequence[int] = ()) -> None:
        """`runs`: one callable per model instance; each gets a worker and a compute thread of its own.

        `max_queue_wait`: seconds a request may wait for its run (None: no bound but its deadline).
        `degraded`: the plan a batch runs instead of its requests' default plans once its oldest request has waited
        `degrade_after` seconds (None: never).
        `preferred`: batch sizes (Triton's preferred_batch_size) a batch leaves at without waiting out the delay
        when no other request waits; the largest is the size batches are collected up to.
        """
        if not runs or max_batch_size < 1 or max_queue_size < 1 or max_queue_delay < 0:
            raise ValueError("at least one run, max_batch_size and max_queue_size >= 1, max_queue_delay >= 0")
        if any(not 1 <= size <= max_batch_size for size in preferred):
            raise ValueError("preferred batch sizes are between 1 and max_batch_size")
        self.preferred = frozenset(preferred)
        self._target = max(preferred, default=max_batch_size)
        if max_queue_wait is not None and max_queue_wait <= 0:
            raise ValueError("max_queue_wait must be > 0, or None for no bound")
        self.max_queue_wait = max_queue_wait
        self.degraded, self.degrade_after = degraded, degrade_after
        self._queued_images = 0
        self._run_seconds = 0.0
        """Recent model runs' mean time (exponentially weighted): the estimate before any rate is measured."""
        self._cycle_images = [0.0] * len(runs)
        self._cycle_seconds = [0.0] * len(runs)
        """Each instance's recent images per batch and seconds from one batch taken to the next (exponentially
        weighted), measured while a backlog keeps it busy."""
        self._taken = [(0.0, 0)] * len(runs)
        """When each instance last took a batch, and how many images."""
        self._backlogged = [False] * len(runs)
        """Whether requests were waiting when each instance finished its last batch."""
        self._runs, self._model, self._observer = list(runs), model, observer
        self.statistics = ModelStatistics()
        self.max_batch_size, self.max_queue_delay = max_batch_size, max_queue_delay
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_queue_size)
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"valley-compute-{i}",
                                              initializer=lower_thread_priority) for i in range(len(runs))]
        self._workers: list[asyncio.Task[None]] = []
        self._collecting = asyncio.Lock()
        self._carry: _Pending | None = None
        self._stopping = False

    @property
    def max_queue_size(self) -> int:
        """Requests that may wait at once."""
        return self._queue.maxsize

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return self._queue.qsize()

    def start(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._serve(index), name=f"valley-batcher-{index}")
                             for index in range(len(self._runs))]

    async def stop(self) -> None:
        """Take no more requests (`Retired`), finish every queued one, then stop the workers."""
        self._stopping = True
        await self._queue.join()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for executor in self._executors:
            executor.shutdown(wait=True)

    def service_rate(self) -> float:
        """Images per second the queue drains at when busy: the instances' measured rates summed (instances not
        measured yet counted at the measured ones' mean); 0 before any is measured."""
        rates = [images / seconds for images, seconds in zip(self._cycle_images, self._cycle_seconds, strict=True)
                 if seconds > 0]
        return sum(rates) / len(rates) * len(self._runs) if rates else 0.0

    def expected_wait(self) -> float:
        """Seconds a request queued now would wait to be taken: the images queued ahead of it at the measured
        service rate (before one is measured, the batches ahead at the recent run time, shared among the
        instances). Zero with nothing queued, so an idle model always takes a request, and rates measured under an
        old load cannot keep refusing once the queue has drained."""
        if not self._queued_images:
            return 0.0
        rate = self.service_rate()
        if rate > 0:
            return self._queued_images / rate
        batches = -(-self._queued_images // self.max_batch_size)
        return batches * self._run_seconds / len(self._runs)

    async def submit(self, pixels: np.ndarray, outputs: Sequence[str], deadline: float | None = None,
                     plan: Plan | None = None) -> Answer:
        """Queue one request (uint8 pixels [B, ...]) to be answered by `plan` (None: every member); `deadline` is a
        `time.monotonic()` instant."""
        if self._stopping:
            raise Retired(f"version {self._model.version} of {self._model.name!r} stopped taking requests")
        images = int(pixels.shape[0])
        if self.max_queue_wait is not None and (wait := self.expected_wait()) > ADMIT_SHARE * self.max_queue_wait:
            self._refuse("queue_wait")
            raise QueueWait(f"the model is overloaded: a request queued now would wait about "
                            f"{wait * 1e3:.0f} ms, near or over this server's bound of "
                            f"{self.max_queue_wait * 1e3:.0f} ms; retry later or on another replica")
        pending = _Pending(pixels, tuple(outputs), deadline, asyncio.get_running_loop().create_future(), plan)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self._refuse("queue_full")
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting): retry later") from None
        self._queued_images += images
        return await pending.future

    def _refuse(self, reason: str) -> None:
        self._observer.observe_refusal(self._model.name, str(self._model.version), reason)

    async def _collect(self, instance: int) -> list[_Pending]:
        """The next batch for `instance`; a request that does not fit is kept to open the one after."""
        # Requests waited both when it finished its last batch and now that it collects: it never idled between.
        busy = self._backlogged[instance] and (self._carry is not None or not self._queue.empty())
        first, self._carry = self._carry, None
        if first is None:
            first = await self._queue.get()
            self._queued_images -= first.pixels.shape[0]
        batch = [first]
        images = batch[0].pixels.shape[0]
        closes = time.monotonic() + self.max_queue_delay
        while images < self._target:
            if self._queue.empty():
                if images in self.preferred:
                    break
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            else:
                item = self._queue.get_nowait()
            self._queued_images -= item.pixels.shape[0]
            if images + item.pixels.shape[0] > self.max_batch_size:
                self._carry = item  # requests are never split across batches
                break
            batch.append(item)
            images += item.pixels.shape[0]
        self._measure(instance, busy, images)
        return batch

    def _measure(self, instance: int, busy: bool, images: int) -> None:
        """A batch of `images` was taken by `instance`; `busy`: requests were waiting all along, so the time since
        it took its last batch was all work (that batch's run and answers, waiting its turn to collect, collecting),
        no idling."""
        now = time.monotonic()
        last, last_images = self._taken[instance]
        self._taken[instance] = (now, images)
        if not busy or not last:
            return
        seconds = now - last
        weight = 1.0 if self._cycle_seconds[instance] == 0 else -math.expm1(-seconds / RATE_SECONDS)
        self._cycle_images[instance] += weight * (last_images - self._cycle_images[instance])
        self._cycle_seconds[instance] += weight * (seconds - self._cycle_seconds[instance])

    async def _serve(self, instance: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # One worker collects at a time: idle instances would otherwise split the traffic
            # into small batches. The others wait here and take the next batch in turn.
            async with self._collecting:
                batch = await self._collect(instance)
            try:
                await self._run_batch(loop, batch, self._runs[instance], self._executors[instance])
            except Exception as error:  # a bug here must not stop the worker: fail this batch, go on
                log.exception("the batcher failed a batch")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
            finally:
                self._backlogged[instance] = self._carry is not None or not self._queue.empty()
                for _ in batch:
                    self._queue.task_done()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], run: RunBatch,
                         executor: ThreadPoolExecutor) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # the client went away (its call was cancelled)
                continue
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
            elif self.max_queue_wait is not None and now - item.enqueued > self.max_queue_wait:
                self._refuse("queue_wait")
                item.future.set_exception(QueueWait(
                    f"the model is overloaded: the request waited {(now - item.enqueued) * 1e3:.0f} ms in the queue, "
                    f"over this server's bound of {self.max_queue_wait * 1e3:.0f} ms; retry later or on another "
                    "replica"))
            else:
                live.append(item)
        if live:
            self._degrade(live, now)
            await self._compute(loop, live, now, run, executor)

    def _degrade(self, live: list[_Pending], now: float) -> None:
        """Cut the default plans of a batch that waited too long to the degraded plan: fewer members per image
        while the queue is long, every member again once it has drained (batch by batch, no state)."""
        degraded, bound = self.degraded, self.degrade_after
        if degraded is None or bound is None or now - min(item.enqueued for item in live) <= bound:
            return
        cut = 0
        for item in live:
            if item.plan is not None and not item.plan.chosen and item.plan.members > degraded.members:
                item.plan, item.degraded = degraded, True
                cut += 1
        if cut:
            self._observer.observe_degraded(self._model.name, str(self._model.version), cut)

    async def _compute(self, loop: asyncio.AbstractEventLoop, live: list[_Pending], now: float, run: RunBatch,
                       executor: ThreadPoolExecutor) -> None:
        pixels = live[0].pixels if len(live) == 1 else np.concatenate([item.pixels for item in live])
        outputs = sorted({name for item in live for name in item.outputs})
        segments = _segments(live)
        started = time.monotonic()
        try:
            computed = await loop.run_in_executor(executor, run, pixels, outputs, segments)
        except Exception as error:  # the transport turns it into INTERNAL or INVALID_ARGUMENT
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        compute = time.monotonic() - started
        # Weighted so that a change of load shows within a few runs, and one slow run does not refuse a burst.
        self._run_seconds = compute if self._run_seconds == 0 else 0.8 * self._run_seconds + 0.2 * compute
        results = computed.outputs
        row = 0
        for item in live:
            rows = item.pixels.shape[0]
            if not item.future.done():
                item.future.set_result(Answer({name: results[name][row:row + rows] for name in item.outputs},
                                              item.plan, item.degraded))
            row += rows
        record = BatchRecord(images=int(pixels.shape[0]), requests=len(live),
                             queue_seconds=[now - item.enqueued for item in live], compute_seconds=compute,
                             outputs=results, member_seconds=computed.member_seconds,
                             front_images=computed.front_images)
        self.statistics.record_batch(record)
        model = self._model
        self._observer.observe_batch(model.name, model.version, model.classes, record)


def _segments(live: list[_Pending]) -> list[Segment]:
    """The batch's rows by plan, consecutive requests of one plan merged; none when every member answers all."""
    segments: list[Segment] = []
    for item in live:
        cascade = item.plan.cascade if item.plan is not None else None
        rows = int(item.pixels.shape[0])
        if segments and segments[-1][1] == cascade:
            segments[-1] = (segments[-1][0] + rows, cascade)
        else:
            segments.append((rows, cascade))
    return [] if all(cascade is None for _, cascade in segments) else segments
