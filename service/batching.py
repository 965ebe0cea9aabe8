"""Dynamic batching: requests from many clients merged into one model run.

A bounded queue feeds one worker task per model instance. A free worker takes the oldest
request, then keeps taking requests until the batch holds `max_batch_size` images or
`max_queue_delay` has passed since it started collecting; requests whose deadline has
already passed are dropped before compute. Each instance runs in a thread of its own, so the
event loop never blocks on compute, and while one instance computes another collects the
next batch. A full queue is refused at once (`QueueFull`), never waited on. Every finished
run goes into the model's statistics and to the observer, as one `BatchRecord`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, QueueFull
from service.observer import NULL_OBSERVER, Observer
from service.statistics import ModelStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutput:
    """What one model run returns: every output asked for, and each member's compute time when timed."""

    outputs: dict[str, np.ndarray]
    member_seconds: list[float] = field(default_factory=list)


RunBatch = Callable[[np.ndarray, Sequence[str]], RunOutput]


@dataclass(frozen=True)
class ModelKey:
    """The ensemble version a batcher serves, as its reports name it."""

    name: str = ""
    version: int = 0
    classes: Sequence[str] = ()


NO_MODEL = ModelKey()


@dataclass
class _Pending:
    pixels: np.ndarray
    outputs: tuple[str, ...]
    deadline: float | None
    future: asyncio.Future[dict[str, np.ndarray]]
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


class DynamicBatcher:
    def __init__(self, runs: Sequence[RunBatch], max_batch_size: int = 64, max_queue_delay: float = 0.002,
                 max_queue_size: int = 1024, model: ModelKey = NO_MODEL, observer: Observer = NULL_OBSERVER) -> None:
        """`runs`: one callable per model instance; each gets a worker and a compute thread of its own."""
        if not runs or max_batch_size < 1 or max_queue_size < 1 or max_queue_delay < 0:
            raise ValueError("at least one run, max_batch_size and max_queue_size >= 1, max_queue_delay >= 0")
        self._runs, self._model, self._observer = list(runs), model, observer
        self.statistics = ModelStatistics()
        self.max_batch_size, self.max_queue_delay = max_batch_size, max_queue_delay
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_queue_size)
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"valley-compute-{i}") for i in range(len(runs))]
        self._workers: list[asyncio.Task[None]] = []
        self._collecting = asyncio.Lock()
        self._carry: _Pending | None = None

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
        """Finish every queued request, then stop the workers."""
        await self._queue.join()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        for executor in self._executors:
            executor.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray, outputs: Sequence[str], deadline: float | None = None
                     ) -> dict[str, np.ndarray]:
        """Queue one request (uint8 pixels [B, ...]); `deadline` is a `time.monotonic()` instant."""
        pending = _Pending(pixels, tuple(outputs), deadline, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting): retry later") from None
        return await pending.future

    async def _collect(self) -> list[_Pending]:
        """The next batch; a request that does not fit is kept to open the one after."""
        first, self._carry = self._carry, None
        batch = [first if first is not None else await self._queue.get()]
        images = batch[0].pixels.shape[0]
        closes = time.monotonic() + self.max_queue_delay
        while images < self.max_batch_size:
            if self._queue.empty():
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            else:
                item = self._queue.get_nowait()
            if images + item.pixels.shape[0] > self.max_batch_size:
                self._carry = item  # requests are never split across batches
                break
            batch.append(item)
            images += item.pixels.shape[0]
        return batch

    async def _serve(self, instance: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # One worker collects at a time: idle instances would otherwise split the traffic
            # into small batches. The others wait here and take the next batch in turn.
            async with self._collecting:
                batch = await self._collect()
            try:
                await self._run_batch(loop, batch, self._runs[instance], self._executors[instance])
            except Exception as error:  # a bug here must not stop the worker: fail this batch, go on
                log.exception("the batcher failed a batch")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
            finally:
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
            else:
                live.append(item)
        if live:
            await self._compute(loop, live, now, run, executor)

    async def _compute(self, loop: asyncio.AbstractEventLoop, live: list[_Pending], now: float, run: RunBatch,
                       executor: ThreadPoolExecutor) -> None:
        pixels = live[0].pixels if len(live) == 1 else np.concatenate([item.pixels for item in live])
        outputs = sorted({name for item in live for name in item.outputs})
        started = time.monotonic()
        try:
            computed = await loop.run_in_executor(executor, run, pixels, outputs)
        except Exception as error:  # the transport turns it into INTERNAL or INVALID_ARGUMENT
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        compute = time.monotonic() - started
        results = computed.outputs
        row = 0
        for item in live:
            rows = item.pixels.shape[0]
            if not item.future.done():
                item.future.set_result({name: results[name][row:row + rows] for name in item.outputs})
            row += rows
        record = BatchRecord(images=int(pixels.shape[0]), requests=len(live),
                             queue_seconds=[now - item.enqueued for item in live], compute_seconds=compute,
                             outputs=results, member_seconds=computed.member_seconds)
        self.statistics.record_batch(record)
        model = self._model
        self._observer.observe_batch(model.name, model.version, model.classes, record)
