from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.core.batching import BatchRecord
from service.observe import metrics
from service.observe.metrics import SIGNALS, ServingMetrics

CLASSES = ["a", "b", "c"]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(registry: CollectorRegistry) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
            if s.name.startswith("valley_") and not s.name.endswith("_created")}


def _runs(seed: int, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    edges = np.array([edge for signal in SIGNALS for edge in signal.buckets])
    runs = []
    for size in sizes:
        # Values on every bucket edge, at zero, far above the last bucket, and in between.
        values = np.concatenate([edges, [0.0, 1e9], rng.random(size) * 6])[:size] if size else np.zeros(0)
        run: dict[str, np.ndarray] = {signal.output: rng.permutation(values).astype(np.float32) for signal in SIGNALS}
        run["predicted_class"] = rng.integers(0, len(CLASSES), size, dtype=np.int64)
        run["probabilities"] = rng.random((size, len(CLASSES))).astype(np.float32)
        runs.append(run)
    return runs


@pytest.mark.parametrize("fold_images", [1, 10, 4096])
def test_signals_render_exactly_as_one_observe_per_image(monkeypatch: pytest.MonkeyPatch, fold_images: int) -> None:
    """Folded at scrape time or on the way, the exposition equals prometheus_client's own per-value one."""
    monkeypatch.setattr(metrics, "FOLD_IMAGES", fold_images)
    served, expected = CollectorRegistry(), CollectorRegistry()
    serving = ServingMetrics(served)
    histograms = {signal.output: Histogram(signal.name, signal.documentation, ["model", "version"],
                                           buckets=signal.buckets, registry=expected) for signal in SIGNALS}
    predicted = Counter("valley_predicted_class", "", ["model", "version", "class"], registry=expected)
    for model, seed in (("m", 0), ("n", 1)):
        for run in _runs(seed, [5, 1, 64, 0, 37]):
            serving.observe_batch(model, 1, CLASSES, BatchRecord(len(run["predicted_class"]), 1, [0.0], 0.01, run))
            for output, histogram in histograms.items():
                for value in run[output].tolist():
                    histogram.labels(model, "1").observe(value)
            for index in run["predicted_class"].tolist():
                predicted.labels(model, "1", CLASSES[index]).inc()
        _samples(served)  # a scrape between the two models' runs must not lose or repeat any
    names = {signal.name for signal in SIGNALS} | {"valley_predicted_class"}
    got = {key: value for key, value in _samples(served).items() if key[0].rsplit("_", 1)[0] in names}
    want = _samples(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_runs_without_the_signal_outputs_are_not_counted() -> None:
    registry = CollectorRegistry()
    serving = ServingMetrics(registry)
    run = {"probabilities": np.full((2, 3), 1 / 3, dtype=np.float32)}
    serving.observe_batch("m", 1, CLASSES, BatchRecord(2, 1, [0.0], 0.01, run))
    assert registry.get_sample_value("valley_batch_images_sum", {"model": "m", "version": "1"}) == 2
    assert registry.get_sample_value("valley_confidence_ratio_count", {"model": "m", "version": "1"}) is None


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"model": "m", "version": "1", **labels})


def test_a_version_exported_again_with_other_classes_keeps_counting_by_name() -> None:
    registry = CollectorRegistry()
    serving = ServingMetrics(registry)
    first, second = _runs(0, [6])[0], _runs(1, [9])[0]
    second["predicted_class"] = np.full(9, 3)
    serving.observe_batch("m", 1, CLASSES, BatchRecord(6, 1, [0.0], 0.01, first))
    serving.observe_batch("m", 1, [*CLASSES, "d"], BatchRecord(9, 1, [0.0], 0.01, second))
    assert _count(registry, "valley_predicted_class_total", **{"class": "d"}) == 9
    assert sum(_count(registry, "valley_predicted_class_total", **{"class": name}) or 0 for name in CLASSES) == 6
    assert _count(registry, "valley_confidence_ratio_count") == 15


def test_unloading_counts_what_waits_and_frees_the_buffer() -> None:
    registry = CollectorRegistry()
    serving = ServingMetrics(registry)
    run = _runs(0, [7])[0]
    serving.observe_batch("m", 1, CLASSES, BatchRecord(7, 1, [0.0], 0.01, run))
    serving.observe_unload("m", 1)
    assert serving._signals._models[("m", "1")]._values is None
    assert _count(registry, "valley_predictive_entropy_nats_count") == 7
    serving.observe_batch("m", 1, CLASSES, BatchRecord(7, 1, [0.0], 0.01, run))  # loaded again
    assert _count(registry, "valley_predictive_entropy_nats_count") == 14
