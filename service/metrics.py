"""Every Prometheus metric the server exports, defined once, on an injected registry.

Names follow Prometheus conventions (base units, `_total` on counters, HELP on all), and every
series carries the ensemble's `model` and `version`. The transport and the repository call the
`observe_*` methods; nothing else in the server touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batching import BatchRecord
from service.calibration import CalibrationWindow, Scored
from service.ensemble import Ensemble
from service.manifest import Manifest

# Latency buckets from 0.5 ms to 10 s: batch-1 CPU requests sit in the low milliseconds, big
# batches on a busy server in the hundreds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The 15 equal-width confidence bins of ECE (upper edges, as `le`), so histogram buckets and
# the feedback bins line up with training.metrics.ece.
CONFIDENCE_BUCKETS = tuple(float(edge) for edge in np.linspace(1 / 15, 1.0, 15))
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
NATS_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
MODEL = ("model", "version")

# The outputs every model run computes so that the label-free signals cover every request and
# the probabilities can be kept for feedback, whatever each client asked for (cheap next to the
# members' compute).
SIGNAL_OUTPUTS = ("probabilities", "predicted_class", "confidence", "entropy", "mutual_information",
                  "member_disagreement")


class _QueueCollector(Collector):
    """Gauges read at scrape time from the live batchers (no bookkeeping on the request path)."""

    def __init__(self, depths: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._depths = depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("valley_queue_depth_requests", "Requests waiting for a model run", labels=MODEL)
        for name, version, depth in self._depths():
            family.add_metric([name, version], depth)
        yield family


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry,
                 depths: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()) -> None:
        self.requests = Counter("valley_requests_total", "Inference requests answered, by gRPC status code",
                                [*MODEL, "code"], registry=registry)
        self.request_seconds = Histogram("valley_request_duration_seconds", "Time from a request's arrival to its "
                                         "answer", MODEL, buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("valley_queue_duration_seconds", "Time a request waited for its model run",
                                       MODEL, buckets=LATENCY_BUCKETS, registry=registry)
        self.compute_seconds = Histogram("valley_compute_duration_seconds", "Time of one model run (a whole batch)",
                                         MODEL, buckets=LATENCY_BUCKETS, registry=registry)
        self.member_seconds = Histogram("valley_member_compute_duration_seconds", "Time of one member's run, in "
                                        "per-member execution", [*MODEL, "member"], buckets=LATENCY_BUCKETS,
                                        registry=registry)
        self.batch_images = Histogram("valley_batch_images", "Images in one model run (dynamic batching)", MODEL,
                                      buckets=BATCH_BUCKETS, registry=registry)
        self.in_flight = Gauge("valley_in_flight_requests", "Inference requests being served", MODEL,
                               registry=registry)
        self.ready = Gauge("valley_model_ready", "1 while the ensemble version serves, 0 once it stopped", MODEL,
                           registry=registry)
        self.provider = Gauge("valley_execution_provider_info", "The onnxruntime execution provider in use (1)",
                              [*MODEL, "provider"], registry=registry)
        self.confidence = Histogram("valley_confidence_ratio", "Ensemble confidence (top probability) of each "
                                    "served image", MODEL, buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.entropy = Histogram("valley_predictive_entropy_nats", "Predictive entropy of each served image", MODEL,
                                 buckets=NATS_BUCKETS, registry=registry)
        self.mutual_information = Histogram("valley_mutual_information_nats", "Mutual information (members' "
                                            "disagreement, epistemic) of each served image", MODEL,
                                            buckets=NATS_BUCKETS, registry=registry)
        self.disagreement = Histogram("valley_member_disagreement_ratio", "Fraction of members whose top class "
                                      "differs from the ensemble's, per served image", MODEL, buckets=RATIO_BUCKETS,
                                      registry=registry)
        self.predicted = Counter("valley_predicted_class_total", "Served images by predicted class (its name)",
                                 [*MODEL, "class"], registry=registry)
        self.offline = Gauge("valley_offline_metric", "The ensemble's test-split quality measured at export "
                             "(accuracy, ece as fractions; nll, brier), before and after temperature scaling",
                             [*MODEL, "metric", "calibrated"], registry=registry)
        self.temperature = Gauge("valley_temperature", "The temperature the ensemble's softmax is divided by",
                                 MODEL, registry=registry)
        self.feedback_labels = Counter("valley_feedback_labels_total", "Labelled predictions, by confidence bin "
                                       "(15 equal-width bins, 0-14)", [*MODEL, "bin"], registry=registry)
        self.feedback_correct = Counter("valley_feedback_correct_total", "Labelled predictions whose predicted "
                                        "class was right, by confidence bin", [*MODEL, "bin"], registry=registry)
        self.feedback_confidence = Counter("valley_feedback_confidence_total", "Sum of the confidence of labelled "
                                           "predictions, by confidence bin", [*MODEL, "bin"], registry=registry)
        self.feedback_nll = Counter("valley_feedback_nll_total", "Sum of the negative log-likelihood (nats) of "
                                    "labelled predictions", MODEL, registry=registry)
        self.feedback_brier = Counter("valley_feedback_brier_total", "Sum of the Brier score of labelled "
                                      "predictions", MODEL, registry=registry)
        self.live = Gauge("valley_live_metric", "ECE and accuracy (fractions), NLL and Brier over the last "
                          "labelled predictions (the calibration window)", [*MODEL, "metric"], registry=registry)
        self.live_count = Gauge("valley_live_window_predictions", "Labelled predictions in the calibration window",
                                MODEL, registry=registry)
        registry.register(_QueueCollector(depths))

    # -- models ---------------------------------------------------------------------------

    def observe_load(self, ensemble: Ensemble) -> None:
        """A version started serving: its provider, offline quality and temperature."""
        manifest: Manifest = ensemble.manifest
        labels = (manifest.name, str(manifest.version))
        self.ready.labels(*labels).set(1)
        self.provider.labels(*labels, ensemble.providers[0]).set(1)
        self.temperature.labels(*labels).set(manifest.temperature)
        for calibrated, metrics in (("false", manifest.metrics.uncalibrated), ("true", manifest.metrics.calibrated)):
            for metric in ("accuracy", "ece", "nll", "brier"):
                self.offline.labels(*labels, metric, calibrated).set(getattr(metrics, metric))

    def observe_unload(self, name: str, version: int) -> None:
        self.ready.labels(name, str(version)).set(0)

    def member_timer(self, name: str, version: int) -> Callable[[list[float]], None]:
        """The callback an ensemble in per-member execution reports its members' times to."""
        children = {}

        def observe(seconds: list[float]) -> None:
            for member, value in enumerate(seconds):
                if member not in children:
                    children[member] = self.member_seconds.labels(name, str(version), str(member))
                children[member].observe(value)

        return observe

    # -- requests and runs ----------------------------------------------------------------

    def observe_request(self, name: str, version: str, code: str, seconds: float | None) -> None:
        """One answered request: its status code and, when it reached a model, its duration."""
        self.requests.labels(name, version, code).inc()
        if seconds is not None:
            self.request_seconds.labels(name, version).observe(seconds)

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        """One model run: its size and times, and the label-free signals of every image in it."""
        labels = (name, str(version))
        self.batch_images.labels(*labels).observe(record.images)
        self.compute_seconds.labels(*labels).observe(record.compute_seconds)
        queue = self.queue_seconds.labels(*labels)
        for seconds in record.queue_seconds:
            queue.observe(seconds)
        outputs = record.outputs
        for histogram, output in ((self.confidence, "confidence"), (self.entropy, "entropy"),
                                  (self.mutual_information, "mutual_information"),
                                  (self.disagreement, "member_disagreement")):
            if output in outputs:
                _observe_all(histogram.labels(*labels), outputs[output])
        if "predicted_class" in outputs:
            predicted, counts = np.unique(outputs["predicted_class"], return_counts=True)
            for index, count in zip(predicted.tolist(), counts.tolist(), strict=True):
                self.predicted.labels(*labels, classes[index]).inc(count)


    def observe_feedback(self, name: str, version: int, scored: Scored, window: CalibrationWindow) -> None:
        """One label joined to its prediction: the bin counters and sums, and the window's gauges."""
        labels = (name, str(version))
        bin_labels = (*labels, str(scored.bin))
        self.feedback_labels.labels(*bin_labels).inc()
        self.feedback_correct.labels(*bin_labels).inc(int(scored.correct))
        self.feedback_confidence.labels(*bin_labels).inc(scored.confidence)
        self.feedback_nll.labels(*labels).inc(scored.nll)
        self.feedback_brier.labels(*labels).inc(scored.brier)
        for metric, value in window.summary().items():
            self.live.labels(*labels, metric).set(value)
        self.live_count.labels(*labels).set(len(window))


def _observe_all(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """Observe many values at once: one numpy pass instead of a Python call per image.

    Uses the histogram's bucket and sum cells (prometheus_client's own layout: per-bucket,
    non-cumulative counts, `le` semantics); another layout falls back to `observe` per value.
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in array.tolist():
            histogram.observe(value)
        return
    index = np.minimum(np.searchsorted(np.asarray(bounds, dtype=np.float64), array, side="left"), len(bounds) - 1)
    counts = np.bincount(index, minlength=len(bounds))
    for bucket in np.flatnonzero(counts).tolist():
        buckets[bucket].inc(int(counts[bucket]))
    total.inc(float(array.sum()))
