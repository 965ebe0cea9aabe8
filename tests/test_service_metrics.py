from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from service.metrics import CONFIDENCE_BUCKETS, NATS_BUCKETS, _observe_all


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get("le")): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_bulk_observation_equals_one_observe_per_value() -> None:
    values = np.concatenate([np.random.default_rng(0).random(500) * 6, np.array(CONFIDENCE_BUCKETS), [0.0, 1e9]])
    for buckets in (CONFIDENCE_BUCKETS, NATS_BUCKETS):
        one_by_one, bulk = CollectorRegistry(), CollectorRegistry()
        single = Histogram("h", "h", buckets=buckets, registry=one_by_one)
        for value in values:
            single.observe(float(value))
        _observe_all(Histogram("h", "h", buckets=buckets, registry=bulk), values)
        expected, got = _samples(one_by_one), _samples(bulk)
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert got[key] == value or abs(got[key] - value) < 1e-9, key
