"""Every Prometheus metric the server exports, defined once, on an injected registry.

Names follow Prometheus conventions (base units, `_total` on counters, HELP on all), and every
series carries the ensemble's `model` and `version`. `ServingMetrics` is the server's observer
(`service.core.observer`): the repository, the batchers, the data plane and the feedback report to
its `observe_*` methods; nothing else in the server touches prometheus_client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from artefact.calibration import Scored, bin_upper_edges
from artefact.manifest import Manifest
from service.control.recalibrate import Suggestion
from service.core.batching import BatchRecord
from service.core.drift import DriftWindow
from service.core.ensemble import MEMBERS_USED, Ensemble
from service.core.sets import coverage_label
from service.feedback import CalibrationWindow, Store
from service.feedback.writer import DROP_REASONS

# Latency buckets from 0.5 ms to 10 s: batch-1 CPU requests sit in the low milliseconds, big
# batches on a busy server in the hundreds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The 15 equal-width confidence bins of ECE (upper edges, as `le`), so histogram buckets and
# the feedback bins line up with the ECE training computes.
CONFIDENCE_BUCKETS = tuple(float(edge) for edge in bin_upper_edges())
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
NATS_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
MODEL = ("model", "version")

# The outputs every model run computes so that the label-free signals cover every request and
# the probabilities can be kept for feedback, whatever each client asked for (cheap next to the
# members' compute).
SIGNAL_OUTPUTS = ("probabilities", "predicted_class", "confidence", "entropy", "mutual_information",
                  "member_disagreement")


# (model, version, value) of every ensemble version being served, read at scrape time.
LiveValues = Callable[[], Iterable[tuple[str, str, int]]]
# (model, version, suggestion) of every version whose live labels suggest a temperature, read at scrape time.
Suggestions = Callable[[], Iterable[tuple[str, str, Suggestion]]]


def _nothing() -> Iterable[tuple[str, str, int]]:
    return ()


def _no_suggestions() -> Iterable[tuple[str, str, Suggestion]]:
    return ()


class _LiveCollector(Collector):
    """Gauges read at scrape time from the live server (no bookkeeping on the request path)."""

    def __init__(self, depths: LiveValues, in_flight: LiveValues) -> None:
        self._depths, self._in_flight = depths, in_flight

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, documentation, values in (
                ("valley_queue_depth_requests", "Requests waiting for a model run", self._depths),
                ("valley_in_flight_requests", "Inference requests being served", self._in_flight)):
            family = GaugeMetricFamily(name, documentation, labels=MODEL)
            for model, version, value in values():
                family.add_metric([model, version], value)
            yield family


class FeedbackStoreCollector(Collector):
    """The feedback store's writer, read at scrape time: what waits for the database, what was written and dropped."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        store = self._store
        stats = store.stats()
        info = GaugeMetricFamily("valley_feedback_store_info", "The feedback store in use (1): memory, sqlite or "
                                 "postgresql", labels=["store"])
        info.add_metric([store.kind], 1)
        up = GaugeMetricFamily("valley_feedback_store_up", "1 while the feedback store answers (the last write or "
                               "attempt to reach it succeeded), 0 while served predictions wait for it")
        up.add_metric([], 1 if stats is None or stats.up else 0)
        queued = GaugeMetricFamily("valley_feedback_queue_predictions", "Served requests waiting to be written to "
                                   "the feedback store")
        queued.add_metric([], stats.queued if stats is not None else 0)
        written = CounterMetricFamily("valley_feedback_written", "Served requests written to the feedback store")
        written.add_metric([], stats.written if stats is not None else 0)
        dropped = CounterMetricFamily("valley_feedback_dropped", "Served requests the feedback store lost, by "
                                      "reason: queue_full (it fell behind: the queue was at its bound), rejected "
                                      "(the database refused them), shutdown (still queued at the end of the grace "
                                      "period)", labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], stats.dropped.get(reason, 0) if stats is not None else 0)
        yield from (info, up, queued, written, dropped)


@dataclass(frozen=True)
class _Signal:
    output: str
    name: str
    documentation: str
    buckets: tuple[float, ...]


SIGNALS = (
    _Signal("confidence", "valley_confidence_ratio", "Ensemble confidence (top probability) of each served image",
            CONFIDENCE_BUCKETS),
    _Signal("entropy", "valley_predictive_entropy_nats", "Predictive entropy of each served image", NATS_BUCKETS),
    _Signal("mutual_information", "valley_mutual_information_nats", "Mutual information (members' disagreement, "
            "epistemic) of each served image", NATS_BUCKETS),
    _Signal("member_disagreement", "valley_member_disagreement_ratio", "Fraction of members whose top class differs "
            "from the ensemble's, per served image", RATIO_BUCKETS),
)
# Each run's signals are copied into a fixed buffer and counted once this many images wait (or
# at scrape time): the request path does a few slice copies, the counting is one numpy pass, and
# neither memory nor the time a fold holds the lock grows with the traffic.
FOLD_IMAGES = 4096


class _SignalCounts:
    """The label-free signals of one ensemble version: per-bucket counts and sums, classes served."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = classes
        self.buckets = [np.zeros(len(signal.buckets) + 1, dtype=np.int64) for signal in SIGNALS]  # last: +Inf
        self.sums = np.zeros(len(SIGNALS), dtype=np.float64)
        self.predicted = dict.fromkeys(classes, 0)
        self._values: np.ndarray | None = None  # [signal, image], allocated on the first run
        self._predicted = np.zeros(0, dtype=np.int64)
        self._waiting = 0

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        if self._values is None:
            self._values = np.empty((len(SIGNALS), FOLD_IMAGES), dtype=np.float64)
            self._predicted = np.empty(FOLD_IMAGES, dtype=np.int64)
        images, done = len(outputs["predicted_class"]), 0
        while done < images:
            take = min(images - done, FOLD_IMAGES - self._waiting)
            into = slice(self._waiting, self._waiting + take)
            for index, signal in enumerate(SIGNALS):
                self._values[index, into] = outputs[signal.output][done:done + take]
            self._predicted[into] = outputs["predicted_class"][done:done + take]
            self._waiting += take
            done += take
            if self._waiting == FOLD_IMAGES:
                self.fold()

    def fold(self) -> None:
        """Count the waiting images. They leave the buffer first: a failure loses them, never counts them twice."""
        waiting, self._waiting = self._waiting, 0
        if not waiting or self._values is None:
            return
        values = self._values[:, :waiting]
        # `le` semantics: a value on an upper bound counts in that bucket; above the last, +Inf.
        buckets = [np.bincount(np.searchsorted(signal.buckets, values[index], side="left"),
                               minlength=len(signal.buckets) + 1) for index, signal in enumerate(SIGNALS)]
        sums = values.sum(axis=1)
        predicted = np.bincount(self._predicted[:waiting], minlength=len(self.classes))
        for index, counts in enumerate(buckets):
            self.buckets[index] += counts
        self.sums += sums
        for name, count in zip(self.classes, predicted.tolist(), strict=False):
            self.predicted[name] = self.predicted.get(name, 0) + count

    def release(self) -> None:
        """Count what waits and give the buffer back (the version stopped serving)."""
        self.fold()
        self._values, self._predicted = None, np.zeros(0, dtype=np.int64)


class _SignalCollector(Collector):
    """Histograms of the label-free signals and the predicted-class counter, rendered at scrape time.

    prometheus_client's own Histogram takes a lock per observation; with every image of every
    run observed four times that cost showed up in throughput, so the runs are buffered and
    counted in bulk.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], _SignalCounts] = {}
        self._lock = threading.Lock()

    def add(self, labels: tuple[str, str], classes: Sequence[str], outputs: dict[str, np.ndarray]) -> None:
        with self._lock:
            counts = self._models.get(labels)
            if counts is None:
                counts = self._models[labels] = _SignalCounts(classes)
            elif counts.classes is not classes:  # the version was exported again and reloaded
                counts.fold()
                counts.classes = classes
            counts.add(outputs)

    def release(self, labels: tuple[str, str]) -> None:
        with self._lock:
            counts = self._models.get(labels)
            if counts is not None:
                counts.release()

    def collect(self) -> Iterable[HistogramMetricFamily | CounterMetricFamily]:
        with self._lock:
            for counts in self._models.values():
                counts.fold()
            snapshot = {labels: ([b.copy() for b in counts.buckets], counts.sums.copy(), dict(counts.predicted))
                        for labels, counts in self._models.items()}
        for index, signal in enumerate(SIGNALS):
            family = HistogramMetricFamily(signal.name, signal.documentation, labels=MODEL)
            edges = [*(repr(float(edge)) for edge in signal.buckets), "+Inf"]  # as Histogram writes `le`
            for labels, (buckets, sums, _) in snapshot.items():
                cumulative = np.cumsum(buckets[index]).tolist()
                family.add_metric(list(labels), list(zip(edges, cumulative, strict=True)), float(sums[index]))
            yield family
        counter = CounterMetricFamily("valley_predicted_class", "Served images by predicted class (its name)",
                                      labels=[*MODEL, "class"])
        for labels, (_, _, predicted) in snapshot.items():
            for name, count in predicted.items():
                counter.add_metric([*labels, name], count)
        yield counter


class _DriftCollector(Collector):
    """Each version's drift score, computed from its window of answers at scrape time."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], DriftWindow] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        windows = list(self.windows.items())  # one step under the GIL: loads and unloads may change the dict
        score = GaugeMetricFamily("valley_drift_score", "Label-free drift: Jensen-Shannon divergence (bits, 0-1) of "
                                  "the last answers' confidence, entropy, mutual information and predicted-class "
                                  "histograms from the validation baseline's, averaged; absent until the window "
                                  "is full", labels=MODEL)
        clean = GaugeMetricFamily("valley_drift_clean_level", "The drift score that clean windows of this size "
                                  "stay under 99 times in 100 (fitted on validation at export)", labels=MODEL)
        filled = GaugeMetricFamily("valley_drift_window_images", "Answers in the drift window now", labels=MODEL)
        size = GaugeMetricFamily("valley_drift_window_size_images", "Answers the drift window holds when full "
                                 "(--drift-window)", labels=MODEL)
        estimated = GaugeMetricFamily("valley_estimated_accuracy", "Accuracy estimated without labels over the drift "
                                      "window's answers: each answer's confidence bin's validation accuracy, "
                                      "averaged (absent while the window is empty or the version has no map)",
                                      labels=MODEL)
        validation = GaugeMetricFamily("valley_validation_accuracy", "The accuracy on the validation split at export "
                                       "(what valley_estimated_accuracy reads on validation)", labels=MODEL)
        for labels, window in windows:
            value = window.score()
            if value is not None:
                score.add_metric(list(labels), value)
            clean.add_metric(list(labels), window.clean_level)
            filled.add_metric(list(labels), window.filled)
            size.add_metric(list(labels), window.size)
            accuracy = window.estimated_accuracy()
            if accuracy is not None:
                estimated.add_metric(list(labels), accuracy)
            if window.validation_accuracy is not None:
                validation.add_metric(list(labels), window.validation_accuracy)
        yield from (score, clean, filled, size, estimated, validation)


class _RecalibrationCollector(Collector):
    """What the temperature live labels suggest would do, per version, computed at scrape time."""

    def __init__(self, suggestions: Suggestions) -> None:
        self._suggestions = suggestions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        suggested = GaugeMetricFamily("valley_suggested_temperature", "The temperature that minimises the NLL of the "
                                      "labelled live predictions in the calibration window (the fit export runs)",
                                      labels=MODEL)
        labels = GaugeMetricFamily("valley_suggested_temperature_labels", "Labelled predictions the suggested "
                                   "temperature was fitted on", labels=MODEL)
        metric = GaugeMetricFamily("valley_recalibration_metric", "NLL, ECE and accuracy (fractions) of the "
                                   "calibration window at the current and at the suggested temperature",
                                   labels=[*MODEL, "metric", "temperature"])
        for model, version, suggestion in self._suggestions():
            suggested.add_metric([model, version], suggestion.suggested)
            labels.add_metric([model, version], suggestion.labels)
            for which, values in (("current", suggestion.current_metrics), ("suggested", suggestion.suggested_metrics)):
                for name, value in values.items():
                    metric.add_metric([model, version, name, which], value)
        yield from (suggested, labels, metric)


@dataclass(frozen=True)
class _Series:
    """One ensemble version's children of the request-path metrics, looked up once, not per request."""

    ok: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_images: Histogram
    member_images: Counter
    front_images: Counter
    member_seconds: list[Histogram]
    """One child per member, added as members are first timed."""


class ServingMetrics:
    """Every valley metric on `registry`; `depths` and `in_flight` give the live gauges at scrape time."""

    signal_outputs: tuple[str, ...] = (*SIGNAL_OUTPUTS, MEMBERS_USED)

    def __init__(self, registry: CollectorRegistry, depths: LiveValues = _nothing,
                 in_flight: LiveValues = _nothing, suggestions: Suggestions = _no_suggestions) -> None:
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
        self.refused = Counter("valley_refused_requests_total", "Requests refused UNAVAILABLE to protect the server, "
                               "by reason: queue_full, queue_wait (would wait past --max-queue-wait-ms), "
                               "concurrency (past --max-concurrent-rpcs; no model)", [*MODEL, "reason"],
                               registry=registry)
        self.load_failures = Counter("valley_model_load_failures_total", "Versions refused at load (files, manifest, "
                                     "samples or graphs); the version serving before keeps serving", MODEL,
                                     registry=registry)
        self.member_images = Counter("valley_member_images_total", "Images run through a member: each served image "
                                     "counts the members that answered it (divided by valley_batch_images_sum: "
                                     "members per image)", MODEL, registry=registry)
        self.front_images = Counter("valley_front_images_total", "Images run through the front network (a version "
                                    "whose cascade starts with one): added to valley_member_images_total, the "
                                    "networks run", MODEL, registry=registry)
        self.degraded = Counter("valley_degraded_requests_total", "Requests whose default plan overload cut to the "
                                "degraded plan (the first stage's members; --degrade-queue-ms)", MODEL,
                                registry=registry)
        self.batch_images = Histogram("valley_batch_images", "Images in one model run (dynamic batching)", MODEL,
                                      buckets=BATCH_BUCKETS, registry=registry)
        self.ready = Gauge("valley_model_ready", "1 while the ensemble version serves, 0 once it stopped", MODEL,
                           registry=registry)
        self.provider = Gauge("valley_execution_provider_info", "The onnxruntime execution provider in use (1)",
                              [*MODEL, "provider"], registry=registry)
        self.precision = Gauge("valley_precision_info", "The precision of the graphs that serve (1), and the one "
                               "asked for: they differ when a variant's samples did not reproduce on this CPU and "
                               "the FP32 graphs serve instead", [*MODEL, "precision", "requested"], registry=registry)
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
        self.selective = Counter("valley_selective_images_total", "Images answered with an abstain output, by "
                                 "whether the ensemble abstained (below its target accuracy's threshold)",
                                 [*MODEL, "abstained"], registry=registry)
        self.set_images = Counter("valley_prediction_set_images_total", "Images answered with a prediction set, by "
                                  "the coverage asked for (up to three decimals; finer ones: other)",
                                  [*MODEL, "coverage"], registry=registry)
        self.set_classes = Counter("valley_prediction_set_classes_total", "Classes in the prediction sets answered "
                                   "(over valley_prediction_set_images_total: the mean set size)",
                                   [*MODEL, "coverage"], registry=registry)
        self.feedback_sets = Counter("valley_feedback_sets_total", "Labelled predictions that were answered with a "
                                     "prediction set, by the coverage asked for", [*MODEL, "coverage"],
                                     registry=registry)
        self.feedback_covered = Counter("valley_feedback_set_covered_total", "Labelled predictions whose prediction "
                                        "set held the true class, by the coverage asked for", [*MODEL, "coverage"],
                                        registry=registry)
        self.feedback_target = Counter("valley_feedback_set_target_total", "Sum of the coverages asked for of the "
                                       "labelled predictions with a set (the covered count expected)",
                                       [*MODEL, "coverage"], registry=registry)
        self._signals = _SignalCollector()
        registry.register(self._signals)
        self._drift = _DriftCollector()
        registry.register(self._drift)
        registry.register(_RecalibrationCollector(suggestions))
        registry.register(_LiveCollector(depths, in_flight))
        self._series: dict[tuple[str, str], _Series] = {}

    def _of(self, name: str, version: str) -> _Series:
        series = self._series.get((name, version))
        if series is None:
            series = self._series[(name, version)] = _Series(
                self.requests.labels(name, version, "OK"), self.request_seconds.labels(name, version),
                self.queue_seconds.labels(name, version), self.compute_seconds.labels(name, version),
                self.batch_images.labels(name, version), self.member_images.labels(name, version),
                self.front_images.labels(name, version), [])
        return series

    # -- models ---------------------------------------------------------------------------

    def observe_load(self, ensemble: Ensemble, drift_window: int = 0) -> None:
        """A version started serving: its provider, offline quality and temperature; its drift score over
        `drift_window` answers (0: the window its baseline was fitted for)."""
        manifest: Manifest = ensemble.manifest
        labels = (manifest.name, str(manifest.version))
        self.ready.labels(*labels).set(1)
        self.provider.labels(*labels, ensemble.providers[0]).set(1)
        self.precision.labels(*labels, ensemble.precision, ensemble.requested_precision).set(1)
        self.temperature.labels(*labels).set(manifest.temperature)
        # Counters a dashboard divides by exist from the load on, at 0, so rate() has a start.
        self.degraded.labels(*labels)
        self.member_images.labels(*labels)
        self.front_images.labels(*labels)
        if manifest.selective is not None:
            for abstained in ("true", "false"):
                self.selective.labels(*labels, abstained)
        if manifest.conformal is not None:
            level = coverage_label(manifest.conformal.default_coverage)
            for counter in (self.set_images, self.set_classes, self.feedback_sets, self.feedback_covered,
                            self.feedback_target):
                counter.labels(*labels, level)
        if manifest.drift is not None:
            self._drift.windows[labels] = DriftWindow(manifest, drift_window)
        for calibrated, metrics in (("false", manifest.metrics.uncalibrated), ("true", manifest.metrics.calibrated)):
            for metric in ("accuracy", "ece", "nll", "brier"):
                self.offline.labels(*labels, metric, calibrated).set(getattr(metrics, metric))

    def observe_unload(self, name: str, version: int) -> None:
        self.ready.labels(name, str(version)).set(0)
        self._signals.release((name, str(version)))
        self._drift.windows.pop((name, str(version)), None)

    # -- requests and runs ----------------------------------------------------------------

    def observe_request(self, name: str, version: str, code: str, seconds: float | None) -> None:
        """One answered request: its status code and, when it reached a model, its duration."""
        if code == "OK":
            series = self._of(name, version)
            series.ok.inc()
            if seconds is not None:
                series.request_seconds.observe(seconds)
            return
        self.requests.labels(name, version, code).inc()
        if seconds is not None:
            self.request_seconds.labels(name, version).observe(seconds)

    def observe_refusal(self, name: str, version: str, reason: str) -> None:
        self.refused.labels(name, version, reason).inc()

    def observe_load_failure(self, name: str, version: int) -> None:
        self.load_failures.labels(name, str(version)).inc()

    def observe_degraded(self, name: str, version: str, requests: int) -> None:
        self.degraded.labels(name, version).inc(requests)

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        """One model run: its size and times, and the label-free signals of every image in it."""
        labels = (name, str(version))
        series = self._of(*labels)
        series.batch_images.observe(record.images)
        if MEMBERS_USED in record.outputs:
            series.member_images.inc(int(record.outputs[MEMBERS_USED].sum()))
        if record.front_images:
            series.front_images.inc(record.front_images)
        series.compute_seconds.observe(record.compute_seconds)
        for seconds in record.queue_seconds:
            series.queue_seconds.observe(seconds)
        members = series.member_seconds
        for member, seconds in enumerate(record.member_seconds):
            if member == len(members):
                members.append(self.member_seconds.labels(*labels, str(member)))
            members[member].observe(seconds)
        if all(output in record.outputs for output in SIGNAL_OUTPUTS):
            self._signals.add(labels, classes, record.outputs)
            window = self._drift.windows.get(labels)
            if window is not None:
                window.add(record.outputs)

    def observe_abstentions(self, name: str, version: str, images: int, abstained: int) -> None:
        self.selective.labels(name, version, "true").inc(abstained)
        self.selective.labels(name, version, "false").inc(images - abstained)

    def observe_sets(self, name: str, version: str, coverage: float, sizes: np.ndarray) -> None:
        level = coverage_label(coverage)
        self.set_images.labels(name, version, level).inc(len(sizes))
        self.set_classes.labels(name, version, level).inc(int(sizes.sum()))

    def observe_set_label(self, name: str, version: int, coverage: float, covered: bool) -> None:
        labels = (name, str(version), coverage_label(coverage))
        self.feedback_sets.labels(*labels).inc()
        self.feedback_covered.labels(*labels).inc(int(covered))
        self.feedback_target.labels(*labels).inc(coverage)

    def observe_label(self, name: str, version: int, scored: Scored) -> None:
        """One label joined to its prediction: the bin counters and the sums."""
        labels = (name, str(version))
        bin_labels = (*labels, str(scored.bin))
        self.feedback_labels.labels(*bin_labels).inc()
        self.feedback_correct.labels(*bin_labels).inc(int(scored.correct))
        self.feedback_confidence.labels(*bin_labels).inc(scored.confidence)
        self.feedback_nll.labels(*labels).inc(scored.nll)
        self.feedback_brier.labels(*labels).inc(scored.brier)

    def observe_window(self, name: str, version: int, window: CalibrationWindow) -> None:
        """The calibration window's gauges, after labels were added to it."""
        labels = (name, str(version))
        for metric, value in window.summary().items():
            self.live.labels(*labels, metric).set(value)
        self.live_count.labels(*labels).set(len(window))
