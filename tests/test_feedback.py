from __future__ import annotations

import numpy as np
import pytest

from service.core.observer import NULL_OBSERVER
from service.errors import AlreadyLabelled, InvalidInput, UnknownPrediction
from service.feedback import MAX_LABELS, Feedback, Label, MemoryStore, Prediction, Served


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _served(rows: int, seed: int = 0, classes: int = 4, members: int = 2) -> Served:
    """What `rows` images were served by an ensemble of `members`, all of them answering."""
    member_probabilities = np.random.default_rng(seed).dirichlet(np.ones(classes), size=(rows, members))
    return Served(member_probabilities.mean(axis=1).astype(np.float32), member_probabilities.astype(np.float32),
                  np.full(rows, members))


def _kept(model: str, version: int, request_id: str, served: Served, caller: str = "") -> Prediction:
    return Prediction(caller, model, request_id, version, served, 0.0)


def test_labels_join_the_prediction_served_for_them() -> None:
    store = MemoryStore(max_predictions=100, ttl_seconds=60)
    served = _served(3)
    store.remember(_kept("m", 2, "req-1", served))
    joined = store.join([Label("m", "req-1", 2, 1), Label("m", "req-1", 0, 3)], "")
    assert [(j.version, j.true_class, j.used) for j in joined] == [(2, 1, 2), (2, 3, 2)]
    np.testing.assert_array_equal(joined[0].probabilities, served.probabilities[2])
    np.testing.assert_array_equal(joined[1].probabilities, served.probabilities[0])
    np.testing.assert_array_equal(joined[0].member_probabilities, served.member_probabilities[2])


def test_a_second_label_for_one_prediction_is_refused_and_nothing_of_that_report_counts() -> None:
    store = MemoryStore(max_predictions=100, ttl_seconds=60)
    store.remember(_kept("m", 1, "r", _served(2)))
    store.join([Label("m", "r", 0, 1)], "")
    with pytest.raises(AlreadyLabelled, match="already labelled"):
        store.join([Label("m", "r", 1, 0), Label("m", "r", 0, 2)], "")
    assert len(store.join([Label("m", "r", 1, 0)], "")) == 1, "position 1 was not marked by the refused report"
    with pytest.raises(AlreadyLabelled):
        store.join([Label("m", "r", 1, 0)], "")
    store.remember(_kept("m", 1, "s", _served(1)))
    with pytest.raises(AlreadyLabelled):
        store.join([Label("m", "s", 0, 0), Label("m", "s", 0, 0)], "")


@pytest.mark.parametrize(("label", "error", "words"), [
    (Label("m", "nope", 0, 0), UnknownPrediction, "no prediction kept"),
    (Label("other", "r", 0, 0), UnknownPrediction, "no prediction kept"),
    (Label("m", "r", 5, 0), InvalidInput, "had 2 images"),
    (Label("m", "r", 0, 4), InvalidInput, "not one of the model's 4 classes"),
])
def test_bad_labels_are_named(label: Label, error: type[Exception], words: str) -> None:
    store = MemoryStore(max_predictions=100, ttl_seconds=60)
    store.remember(_kept("m", 1, "r", _served(2)))
    with pytest.raises(error, match=words):
        store.join([label], "")


def test_predictions_expire_and_the_oldest_go_when_full() -> None:
    clock = Clock()
    store = MemoryStore(max_predictions=5, ttl_seconds=10, clock=clock)
    store.remember(_kept("m", 1, "old", _served(2)))
    clock.now = 5
    store.remember(_kept("m", 1, "mid", _served(2)))
    store.remember(_kept("m", 1, "new", _served(2)))  # 6 > 5: "old" is pushed out
    assert len(store) == 4
    with pytest.raises(UnknownPrediction):
        store.join([Label("m", "old", 0, 0)], "")
    clock.now = 15.5  # "mid" and "new" were served at 5: expired
    with pytest.raises(UnknownPrediction):
        store.join([Label("m", "mid", 0, 0)], "")
    assert len(store) == 0
    store.remember(_kept("m", 1, "", _served(1)))
    assert len(store) == 0, "a request without an id cannot be labelled, so it is not kept"


def test_the_store_is_bounded_in_bytes_whatever_the_classes_and_ids() -> None:
    budget = 64 << 10
    store = MemoryStore(max_predictions=1_000_000, ttl_seconds=60, max_bytes=budget)
    rng = np.random.default_rng(0)
    for index in range(300):  # 1000 classes, 2 members: 12 kB per image, far over the budget in total
        store.remember(_kept("m", 1, f"{index:0>200}", _served(int(rng.integers(1, 4)), index, classes=1000),
                             caller="c" * 64))
        assert store.bytes <= budget
    assert 0 < len(store) < 300 * 3
    newest = store.join([Label("m", f"{299:0>200}", 0, 1)], caller="c" * 64)
    assert len(newest) == 1, "the newest request is kept; the oldest went first"
    store.remember(_kept("m", 1, "huge", _served(100, classes=1000)))
    assert store.bytes <= budget, "a request larger than the whole budget is not kept"
    with pytest.raises(UnknownPrediction):
        store.join([Label("m", "huge", 0, 0)], "")


def test_a_report_with_too_many_labels_is_refused_before_any_is_joined() -> None:
    feedback = Feedback(MemoryStore(max_predictions=10, ttl_seconds=60), window=10, observer=NULL_OBSERVER)
    with pytest.raises(InvalidInput, match="more than 10000 labels"):
        feedback.report([Label("m", "r", 0, 0)] * (MAX_LABELS + 1))


def test_the_same_id_again_replaces_the_prediction() -> None:
    store = MemoryStore(max_predictions=10, ttl_seconds=60)
    store.remember(_kept("m", 1, "r", _served(1, seed=1)))
    second = _served(3, seed=2)
    store.remember(_kept("m", 1, "r", second))
    assert len(store) == 3
    np.testing.assert_array_equal(store.join([Label("m", "r", 2, 0)], "")[0].probabilities, second.probabilities[2])
