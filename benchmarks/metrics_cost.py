"""What the serving metrics cost on the request path, in microseconds of the event loop.

Times `service.observe.metrics.ServingMetrics` as the server calls it, on a fresh registry:
- per request: the request counter and its duration (valley reads the in-flight count at scrape
  time; the baseline moves a gauge up and down);
- per model run of B images (each its own request): batch size, compute and queue times, and
  the label-free signals (four histograms and the predicted-class counter) of every image.
The signals go into a buffer that is counted every `FOLD_IMAGES` images; each timing round
spans at least two such folds. The baseline, timed in the same process, is the plain
prometheus_client way: the labelled children looked up on every call and one `observe` per
image and signal. A scrape is timed too, after the runs of one second at the given rate.

    python benchmarks/metrics_cost.py [--batches 1 8 64] [--classes 10] [--members 8] [--repeats 2000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from artefact.uncertainty import ensemble_outputs
from service.core.batching import BatchRecord
from service.observe import metrics
from service.observe.metrics import SIGNALS, ServingMetrics

MODEL = ("bench", "1")


def microseconds(call: Callable[[], object], repeats: int) -> float:
    """Median over five rounds of the mean time of one call."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        rounds.append((time.perf_counter() - started) / repeats * 1e6)
    return float(np.median(rounds))


def run_outputs(batch: int, members: int, classes: int, seed: int) -> dict[str, np.ndarray]:
    """Realistic outputs of one run: members' probabilities drawn around a shared prediction."""
    rng = np.random.default_rng(seed)
    shared = rng.dirichlet(np.full(classes, 0.3), size=batch)[:, None, :]
    member_probabilities = 0.8 * shared + 0.2 * rng.dirichlet(np.ones(classes), size=(batch, members))
    return ensemble_outputs(member_probabilities.astype(np.float32))


class PlainMetrics:
    """The baseline: the same series with prometheus_client used call by call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter("valley_requests_total", "", [*labels, "code"], registry=registry)
        self.request_seconds = Histogram("valley_request_duration_seconds", "", labels, registry=registry)
        self.queue_seconds = Histogram("valley_queue_duration_seconds", "", labels, registry=registry)
        self.compute_seconds = Histogram("valley_compute_duration_seconds", "", labels, registry=registry)
        self.batch_images = Histogram("valley_batch_images", "", labels, registry=registry)
        self.in_flight = Gauge("valley_in_flight_requests", "", labels, registry=registry)
        self.signals = {signal.output: Histogram(signal.name, "", labels, buckets=signal.buckets, registry=registry)
                        for signal in SIGNALS}
        self.predicted = Counter("valley_predicted_class", "", [*labels, "class"], registry=registry)

    def request(self) -> None:
        with self.in_flight.labels(*MODEL).track_inprogress():
            pass
        self.requests.labels(*MODEL, "OK").inc()
        self.request_seconds.labels(*MODEL).observe(0.01)

    def batch(self, classes: list[str], record: BatchRecord) -> None:
        self.batch_images.labels(*MODEL).observe(record.images)
        self.compute_seconds.labels(*MODEL).observe(record.compute_seconds)
        for seconds in record.queue_seconds:
            self.queue_seconds.labels(*MODEL).observe(seconds)
        for output, histogram in self.signals.items():
            child = histogram.labels(*MODEL)
            for value in record.outputs[output].tolist():
                child.observe(value)
        for index in record.outputs["predicted_class"].tolist():
            self.predicted.labels(*MODEL, classes[index]).inc()


def valley_request(metrics: ServingMetrics) -> None:
    metrics.observe_request(*MODEL, "OK", 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2000, help="calls per timing round")
    parser.add_argument("--rate", type=float, default=1000.0, help="images/s for the scrape timing and the shares")
    args = parser.parse_args()
    classes = [f"class-{index}" for index in range(args.classes)]

    valley, plain = ServingMetrics(CollectorRegistry()), PlainMetrics(CollectorRegistry())
    request, theirs = microseconds(lambda: valley_request(valley), args.repeats), \
        microseconds(plain.request, args.repeats)
    print(f"per request: valley {request:.1f} us, plain prometheus_client {theirs:.1f} us ({theirs / request:.1f}x)")
    print("| images per run | valley us/run | plain us/run | plain / valley | valley's share of a core at "
          f"{args.rate:,.0f} images/s, runs and requests |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        record = BatchRecord(batch, batch, [0.001] * batch, 0.01, run_outputs(batch, args.members, args.classes, 0))
        valley, plain = ServingMetrics(CollectorRegistry()), PlainMetrics(CollectorRegistry())
        # Every timing round spans at least two folds of the signal buffer, so their cost is in.
        repeats = max(args.repeats // batch, 2 * metrics.FOLD_IMAGES // batch)
        ours = microseconds(partial(valley.observe_batch, "bench", 1, classes, record), repeats)
        theirs = microseconds(partial(plain.batch, classes, record), repeats)
        # Each run's images came as one request each (the record's queue times say so).
        share = (ours + batch * request) * (args.rate / batch) / 1e6
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x | {share:.2%} |")

    registry = CollectorRegistry()
    valley = ServingMetrics(registry)
    record = BatchRecord(8, 8, [0.001] * 8, 0.01, run_outputs(8, args.members, args.classes, 1))
    for _ in range(int(args.rate // 8)):
        valley.observe_batch("bench", 1, classes, record)
    started = time.perf_counter()
    samples = sum(len(family.samples) for family in registry.collect())
    scrape = (time.perf_counter() - started) * 1e3
    print(f"one scrape after a second of runs at {args.rate:,.0f} images/s: {scrape:.2f} ms ({samples} samples)")


if __name__ == "__main__":
    main()
