from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.core.batching import Answer, BatchRecord, DynamicBatcher, RunOutput, Segment
from service.core.ensemble import Ensemble, load_ensemble
from service.core.observer import NullObserver
from service.errors import DeadlineExceeded, QueueFull, QueueWait
from tests.conftest import Gate, until_entered


@pytest.fixture(scope="module")
def ensemble(exported: Path) -> Ensemble:
    return load_ensemble(exported)


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1, 16, 16), dtype=np.uint8)


Pending = asyncio.Future[Answer]


class Recorder(NullObserver):
    """Keeps every run the batcher reports."""

    def __init__(self, records: list[BatchRecord]) -> None:
        self.records = records

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        self.records.append(record)


async def _held(run: Gate, max_queue_size: int = 1024) -> tuple[DynamicBatcher, Pending]:
    """A started one-image-per-batch batcher whose worker is held inside the run of a first request."""
    batcher = DynamicBatcher([run], max_batch_size=1, max_queue_delay=0, max_queue_size=max_queue_size)
    batcher.start()
    busy = asyncio.ensure_future(batcher.submit(_images(1, 0), ["confidence"]))
    await until_entered(run)
    return batcher, busy


def test_concurrent_requests_are_merged_and_answered_exactly(ensemble: Ensemble) -> None:
    records: list[BatchRecord] = []
    inputs = [_images(1, seed) for seed in range(16)]

    async def main() -> list[Answer]:
        batcher = DynamicBatcher([ensemble.run], max_batch_size=64, max_queue_delay=0.05, observer=Recorder(records))
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x, ["probabilities", "predicted_class"]) for x in inputs))
        await batcher.stop()
        return list(results)

    results = asyncio.run(main())
    assert len(records) < 16 and sum(r.requests for r in records) == 16, "requests were merged"
    for pixels, result in zip(inputs, results, strict=True):
        alone = ensemble.infer(pixels, ["probabilities", "predicted_class"])
        np.testing.assert_allclose(result.outputs["probabilities"], alone["probabilities"], atol=1e-6)
        assert result.outputs["predicted_class"].tolist() == alone["predicted_class"].tolist()


def test_batches_respect_the_size_bound_without_splitting_requests(ensemble: Ensemble) -> None:
    run = Gate(ensemble.run, opened=True)

    async def main() -> None:
        batcher = DynamicBatcher([run], max_batch_size=8, max_queue_delay=0.05)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(_images(3, s), ["confidence"]) for s in range(6)))
        assert all(r.outputs["confidence"].shape == (3,) for r in results)
        await batcher.stop()

    asyncio.run(main())
    assert sum(run.batches) == 18 and all(size <= 8 and size % 3 == 0 for size in run.batches)


def test_a_batch_at_a_preferred_size_leaves_without_waiting_out_the_delay(ensemble: Ensemble) -> None:
    run = Gate(ensemble.run, opened=True)

    async def main(preferred: tuple[int, ...]) -> float:
        batcher = DynamicBatcher([run], max_batch_size=64, max_queue_delay=1.5, preferred=preferred)
        batcher.start()
        started = time.monotonic()
        await asyncio.gather(*(batcher.submit(_images(1, s), ["confidence"]) for s in range(8)))
        elapsed = time.monotonic() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(main((2, 4))) < 1.0, "batches of 4 left at once"
    assert run.batches == [4, 4]
    run.batches.clear()
    assert asyncio.run(main(())) >= 1.5, "without preferred sizes the batch waits the delay for more"
    assert run.batches == [8]
    with pytest.raises(ValueError, match="preferred batch sizes"):
        DynamicBatcher([run], max_batch_size=8, preferred=(16,))


def test_a_full_queue_is_refused_at_once(ensemble: Ensemble) -> None:
    run = Gate(ensemble.run)

    async def main() -> None:
        batcher, busy = await _held(run, max_queue_size=2)
        queued = [asyncio.ensure_future(batcher.submit(_images(1, s), ["confidence"])) for s in (1, 2)]
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(_images(1, 3), ["confidence"])
        assert time.monotonic() - started < 0.5
        run.open.set()
        await asyncio.gather(busy, *queued)
        await batcher.stop()

    asyncio.run(main())


def test_an_expired_request_is_dropped_before_compute(ensemble: Ensemble) -> None:
    run = Gate(ensemble.run)

    async def main() -> None:
        batcher, busy = await _held(run)
        late = asyncio.ensure_future(batcher.submit(_images(2, 1), ["confidence"], deadline=time.monotonic() + 0.02))
        await asyncio.sleep(0.1)
        run.open.set()
        await busy
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.stop()

    asyncio.run(main())
    assert run.batches == [1], "the expired 2-image request never reached the model"


def test_a_cancelled_request_past_its_deadline_does_not_stop_the_worker(ensemble: Ensemble) -> None:
    """What a gRPC client's timeout does: the call is cancelled while queued, and its deadline passes."""
    run = Gate(ensemble.run)

    async def main() -> None:
        batcher, busy = await _held(run)
        gone = asyncio.ensure_future(batcher.submit(_images(2, 1), ["confidence"], deadline=time.monotonic() + 0.02))
        await asyncio.sleep(0.05)
        gone.cancel()
        run.open.set()
        await busy
        after = await asyncio.wait_for(batcher.submit(_images(3, 2), ["confidence"]), 10)
        assert after.outputs["confidence"].shape == (3,)
        await batcher.stop()

    asyncio.run(main())
    assert run.batches == [1, 3]


def test_instances_compute_in_parallel(ensemble: Ensemble) -> None:
    """While one instance is held inside a run, the other takes the next batch."""
    first, second = Gate(ensemble.run), Gate(ensemble.run, opened=True)

    async def main() -> None:
        batcher = DynamicBatcher([first, second], max_batch_size=4, max_queue_delay=0)
        batcher.start()
        held = asyncio.ensure_future(batcher.submit(_images(1, 0), ["confidence"]))
        await until_entered(first)
        passed = await asyncio.wait_for(batcher.submit(_images(3, 1), ["confidence"]), 10)
        assert passed.outputs["confidence"].shape == (3,) and not held.done()
        first.open.set()
        await held
        await batcher.stop()

    asyncio.run(main())
    assert first.batches == [1] and second.batches == [3]


def test_stop_finishes_queued_work(ensemble: Ensemble) -> None:
    async def main() -> None:
        batcher = DynamicBatcher([ensemble.run], max_batch_size=2, max_queue_delay=0.01)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(_images(1, s), ["entropy"])) for s in range(5)]
        await asyncio.sleep(0.01)  # every submit is queued
        await batcher.stop()
        assert all(f.done() and not f.exception() for f in futures)

    asyncio.run(main())


class Refusals(NullObserver):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def observe_refusal(self, name: str, version: str, reason: str) -> None:
        self.reasons.append(reason)


def test_a_request_that_would_wait_past_the_bound_is_refused_at_once(ensemble: Ensemble) -> None:
    def slow(pixels: np.ndarray, outputs: Sequence[str], segments: Sequence[Segment]) -> RunOutput:
        time.sleep(0.05)
        return ensemble.run(pixels, outputs, segments)

    refusals = Refusals()

    async def main() -> None:
        batcher = DynamicBatcher([slow], max_batch_size=1, max_queue_delay=0, observer=refusals,
                                 max_queue_wait=0.12)
        batcher.start()
        await batcher.submit(_images(1, 0), ["confidence"])  # one run teaches the batcher what a run costs
        burst = [asyncio.ensure_future(batcher.submit(_images(1, seed), ["confidence"])) for seed in range(10)]
        await asyncio.sleep(0)  # every submit ran up to its queueing
        refused = [task for task in burst if task.done()]
        assert len(refused) >= 7, "the requests past ~2 runs of waiting are refused before any run finishes"
        for task in refused:
            with pytest.raises(QueueWait, match="would wait about"):
                task.result()
        accepted = [task for task in burst if not task.done()]
        assert accepted, "the requests within the bound are queued"
        for task in accepted:
            assert (await task).outputs["confidence"].shape == (1,)
        await batcher.stop()

    asyncio.run(main())
    assert refusals.reasons and set(refusals.reasons) == {"queue_wait"}


class SlowAnswers(NullObserver):
    """Blocks the event loop after every run, as answering many requests does: work outside the model run."""

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        time.sleep(0.03)


def test_the_wait_is_estimated_from_the_measured_service_rate_not_the_run_time(ensemble: Ensemble) -> None:
    def run(pixels: np.ndarray, outputs: Sequence[str], segments: Sequence[Segment]) -> RunOutput:
        time.sleep(0.02)
        return ensemble.run(pixels, outputs, segments)

    async def main() -> tuple[float, float, float]:
        batcher = DynamicBatcher([run], max_batch_size=2, max_queue_delay=0, observer=SlowAnswers())
        batcher.start()
        assert batcher.service_rate() == 0, "nothing measured before a backlog"
        await asyncio.gather(*(batcher.submit(_images(2, seed), ["confidence"]) for seed in range(12)))
        rate = batcher.service_rate()
        held = asyncio.ensure_future(batcher.submit(_images(2, 99), ["confidence"]))
        queued = [asyncio.ensure_future(batcher.submit(_images(2, seed), ["confidence"])) for seed in range(10)]
        await asyncio.sleep(0)
        wait = batcher.expected_wait()
        await asyncio.gather(held, *queued)
        await batcher.stop()
        return rate, wait, batcher._run_seconds

    rate, wait, run_seconds = asyncio.run(main())
    # Each batch of 2 takes 20 ms to run and 30 ms to answer: 40 images/s, where the run time alone says 100.
    assert 25 < rate < 50, rate
    # The run time alone promises (run + 30 ms) / run times the rate: 2.5x at 20 ms, still 1.5x at 60 ms of a busy run.
    assert 2 / run_seconds > 1.5 * rate, "the run time alone would promise far more than the measured rate"
    assert wait == pytest.approx(20 / rate, rel=0.15), "the images queued, at the measured rate"


def test_a_request_that_waited_past_the_bound_is_refused_before_compute(ensemble: Ensemble) -> None:
    run = Gate(ensemble.run)

    async def main() -> None:
        batcher = DynamicBatcher([run], max_batch_size=1, max_queue_delay=0, max_queue_wait=0.05)
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(_images(1, 0), ["confidence"]))
        await until_entered(run)
        waiting = asyncio.ensure_future(batcher.submit(_images(1, 1), ["confidence"]))  # no run measured yet
        await asyncio.sleep(0.1)
        run.open.set()
        assert (await busy).outputs["confidence"].shape == (1,)
        with pytest.raises(QueueWait, match="waited"):
            await waiting
        await batcher.stop()

    asyncio.run(main())
    assert run.batches == [1], "the request that waited too long never reached the model"


def test_a_drained_queue_takes_requests_whatever_the_last_runs_cost(ensemble: Ensemble) -> None:
    """Slow runs under an old load must not keep refusing: with nothing queued, a request is always taken."""
    delays = [0.3, 0.0, 0.0]

    def slowing(pixels: np.ndarray, outputs: Sequence[str], segments: Sequence[Segment]) -> RunOutput:
        time.sleep(delays.pop(0) if delays else 0.0)
        return ensemble.run(pixels, outputs, segments)

    async def main() -> None:
        batcher = DynamicBatcher([slowing], max_batch_size=1, max_queue_delay=0, max_queue_wait=0.1)
        batcher.start()
        await batcher.submit(_images(1, 0), ["confidence"])  # a 0.3 s run: three times the bound
        for seed in (1, 2):
            assert (await batcher.submit(_images(1, seed), ["confidence"])).outputs["confidence"].shape == (1,)
        await batcher.stop()

    asyncio.run(main())
