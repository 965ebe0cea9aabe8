"""The feedback stores a fleet shares, on real databases: SQLite files and a throwaway PostgreSQL server.

Two store objects on one database stand for two replicas: what one serves, the other joins labels to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.errors import AlreadyLabelled, InvalidInput, StoreUnavailable, UnknownPrediction
from service.feedback import Label, Prediction, Served, StoreConfigError, open_store
from service.feedback.sql import MIGRATIONS, SCHEMA_VERSION, SqlStore
from service.feedback.writer import QUEUE_FULL, SHUTDOWN, Unavailable, Writer
from tests.postgres import PostgresServer

Opener = Callable[..., SqlStore]


def _served(images: int = 3, members: int = 4, classes: int = 5, seed: int = 0) -> Served:
    rng = np.random.default_rng(seed)
    member = rng.dirichlet(np.ones(classes), (images, members)).astype(np.float32)
    used = rng.integers(1, members + 1, images).astype(np.int64)
    for row, count in enumerate(used):
        member[row, count:] = 0
    probabilities = (member.sum(axis=1) / used[:, None]).astype(np.float32)
    return Served(probabilities, member, used)


def _prediction(request_id: str, served: Served, caller: str = "alice", model: str = "fm", version: int = 1,
                served_at: float | None = None) -> Prediction:
    return Prediction(caller, model, request_id, version, served, time.time() if served_at is None else served_at)


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one fresh database (each call: another replica's store), closing them at the end."""
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'feedback.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.database()
    opened: list[SqlStore] = []

    def open_(**settings: object) -> SqlStore:
        options: dict[str, object] = {"ttl_seconds": 3600.0, "max_predictions": 10_000, "max_bytes": 1 << 30,
                                      "replica": f"replica-{len(opened)}", "flush_interval": 0.05, **settings}
        store = open_store(url, **options)  # type: ignore[arg-type]
        assert isinstance(store, SqlStore)
        store.start()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close(timeout=5)


def _flushed(store: SqlStore, expected: int | None = None) -> None:
    """Wait until the store's writer has written what was queued (`expected` requests in all, when given)."""
    for _ in range(500):
        stats = store.stats()
        assert stats is not None
        if stats.queued == 0 and (expected is None or stats.written >= expected) and store._writer.idle():
            return
        time.sleep(0.01)
    raise AssertionError("the writer did not flush within 5 s")


def test_a_label_joins_at_another_replica_and_is_kept(opener: Opener) -> None:
    serving, labelling = opener(), opener()
    served = _served()
    serving.remember(_prediction("r1", served))
    _flushed(serving)
    joined = labelling.join([Label("fm", "r1", 2, 4), Label("fm", "r1", 0, 1)], "alice", "replica-1")
    assert [(j.version, j.true_class, j.used) for j in joined] == [(1, 4, int(served.used[2])), (1, 1,
                                                                                               int(served.used[0]))]
    np.testing.assert_array_equal(joined[0].probabilities, served.probabilities[2])
    np.testing.assert_array_equal(joined[0].member_probabilities, served.member_probabilities[2])
    for store in (serving, labelling):  # every replica reads the same window, oldest first
        window = store.window("fm", 1, 10)
        assert window.labels.tolist() == [4, 1] and window.used.tolist() == [served.used[2], served.used[0]]
        np.testing.assert_array_equal(window.members[1], served.member_probabilities[0])
        np.testing.assert_array_equal(window.probabilities[0], served.probabilities[2])
    assert len(serving.window("fm", 2, 10)) == 0 and len(serving.window("fm", 1, 1)) == 1


def test_a_label_is_counted_once_and_a_report_is_all_or_none(opener: Opener) -> None:
    store = opener()
    store.remember(_prediction("r1", _served()))
    _flushed(store)
    assert len(store.join([Label("fm", "r1", 0, 1)], "alice")) == 1
    with pytest.raises(AlreadyLabelled, match=r"label 1 \(model 'fm', request id 'r1', position 0\): already"):
        store.join([Label("fm", "r1", 1, 1), Label("fm", "r1", 0, 2)], "alice")
    with pytest.raises(AlreadyLabelled, match=r"label 1 .*position 2"):
        store.join([Label("fm", "r1", 2, 1), Label("fm", "r1", 2, 1)], "alice")
    with pytest.raises(InvalidInput, match="that request had 3 images"):
        store.join([Label("fm", "r1", 1, 1), Label("fm", "r1", 3, 1)], "alice")
    with pytest.raises(InvalidInput, match="true class 5 is not one of the model's 5 classes"):
        store.join([Label("fm", "r1", 1, 5)], "alice")
    with pytest.raises(UnknownPrediction, match="no prediction kept for it"):
        store.join([Label("fm", "r1", 1, 1), Label("fm", "r2", 0, 1)], "alice")
    with pytest.raises(UnknownPrediction):
        store.join([Label("fm", "r1", 1, 1)], "mallory")  # callers see only their own predictions
    assert store.window("fm", 1, 10).labels.tolist() == [1], "no refused report left a label behind"
    assert len(store.join([Label("fm", "r1", 1, 3), Label("fm", "r1", 2, 0)], "alice")) == 2


def test_two_replicas_reporting_one_label_at_once_accept_it_once(opener: Opener) -> None:
    serving, first, second = opener(), opener(), opener()
    rounds = 15
    for index in range(rounds):
        serving.remember(_prediction(f"race-{index}", _served(seed=index)))
    _flushed(serving)
    outcomes: list[str] = []
    lock = threading.Lock()

    def report(store: SqlStore, label: Label, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            store.join([label], "alice")
            outcome = "accepted"
        except AlreadyLabelled:
            outcome = "already"
        with lock:
            outcomes.append(outcome)

    for index in range(rounds):
        barrier = threading.Barrier(2)
        label = Label("fm", f"race-{index}", 1, 2)
        threads = [threading.Thread(target=report, args=(store, label, barrier)) for store in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(outcomes) == ["accepted"] * rounds + ["already"] * rounds
    assert len(serving.window("fm", 1, 100)) == rounds


def test_a_request_served_again_is_a_new_prediction(opener: Opener) -> None:
    store = opener()
    store.remember(_prediction("r1", _served(seed=1)))
    _flushed(store)
    store.join([Label("fm", "r1", 0, 1)], "alice")
    again = _served(images=2, seed=2)
    store.remember(_prediction("r1", again, version=2))
    _flushed(store)
    joined = store.join([Label("fm", "r1", 0, 3)], "alice")
    assert joined[0].version == 2 and np.array_equal(joined[0].probabilities, again.probabilities[0])
    with pytest.raises(InvalidInput, match="that request had 2 images"):
        store.join([Label("fm", "r1", 2, 1)], "alice")
    assert len(store.window("fm", 1, 10)) == 1 and len(store.window("fm", 2, 10)) == 1


def test_predictions_expire_and_the_oldest_go_beyond_the_bound(opener: Opener) -> None:
    now = [time.time()]
    store = opener(ttl_seconds=100.0, max_predictions=7)
    store._clock = lambda: now[0]
    for index in range(4):  # 3 images each: 12 images, 7 allowed
        store.remember(_prediction(f"r{index}", _served(), served_at=now[0] + index))
    store.remember(_prediction("old", _served(), served_at=now[0] - 500))
    _flushed(store)
    with pytest.raises(UnknownPrediction, match="older than 100 s"):
        store.join([Label("fm", "old", 0, 1)], "alice")
    store._housekeep()
    kept = [f"r{index}" for index in range(4) if _joins(store, f"r{index}")]
    assert kept == ["r2", "r3"], "the newest requests up to 7 images stay"
    now[0] += 200
    store._housekeep()
    assert store.window("fm", 1, 10).labels.size == 0, "labels expire with the same age"
    assert not _joins(store, "r3")


def _joins(store: SqlStore, request_id: str) -> bool:
    try:
        store.join([Label("fm", request_id, 0, 1)], "alice")
    except UnknownPrediction:
        return False
    return True


def test_close_writes_what_is_queued(opener: Opener) -> None:
    store = opener(flush_interval=30.0)  # nothing would be written for half a minute
    for index in range(50):
        store.remember(_prediction(f"q{index}", _served(seed=index)))
    stats = store.stats()
    assert stats is not None and stats.queued == 50
    store.close(timeout=10)
    reader = opener()
    assert len(reader.join([Label("fm", f"q{index}", 0, 1) for index in range(50)], "alice")) == 50
    closed = store.stats()
    assert closed is not None and closed.written == 50 and not closed.dropped


def test_the_schema_is_versioned_and_migrated_once(opener: Opener) -> None:
    first = opener()
    assert first.migrate() == SCHEMA_VERSION and len(MIGRATIONS) == SCHEMA_VERSION
    with first._unit() as connection:
        versions = [row[0] for row in connection.execute("SELECT version FROM valley_schema").fetchall()]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        connection.execute("INSERT INTO valley_schema (version) VALUES (99)")
        if first.kind == "postgresql":
            connection.commit()
    with pytest.raises(StoreConfigError, match="schema is version 99, newer than this valley knows"):
        opener()


def test_the_writer_drops_and_counts_what_does_not_fit_while_the_database_is_away() -> None:
    written: list[list[int]] = []
    away = threading.Event()
    away.set()

    def write(batch: Sequence[int]) -> None:
        if away.is_set():
            raise Unavailable("connection refused")
        written.append(list(batch))

    writer: Writer[int] = Writer(write, lambda item: 100, max_items=10, max_bytes=1 << 20, flush_interval=0.01,
                                 max_backoff=0.05)
    writer.start()
    accepted = [writer.put(item) for item in range(40)]
    time.sleep(0.3)
    stats = writer.stats()
    assert not stats.up and stats.dropped.get(QUEUE_FULL, 0) == accepted.count(False) > 0
    away.clear()
    for _ in range(100):
        if writer.stats().queued == 0 and writer.stats().up:
            break
        time.sleep(0.02)
    kept = [item for batch in written for item in batch]
    assert kept == [item for item, ok in zip(range(40), accepted, strict=True) if ok], "in order, none twice"
    assert writer.put(100) and writer.stats().up
    writer.close(timeout=2)
    assert 100 in [item for batch in written for item in batch]
    assert not writer.put(101) and writer.stats().dropped[SHUTDOWN] == 1


def test_a_database_that_is_down_refuses_reports_with_unavailable(postgres: PostgresServer) -> None:
    store = open_store(postgres.database(), ttl_seconds=60.0, max_predictions=100, max_bytes=1 << 20, replica="r")
    assert isinstance(store, SqlStore)
    store.start()
    try:
        store.remember(_prediction("r1", _served()))
        _flushed(store)
        postgres.stop()
        try:
            with pytest.raises(StoreUnavailable, match="cannot be reached, so no label of this report was counted"):
                store.join([Label("fm", "r1", 0, 1)], "alice")
        finally:
            postgres.start()
        for _ in range(50):  # the pool reconnects
            try:
                assert len(store.join([Label("fm", "r1", 0, 1)], "alice")) == 1
                break
            except StoreUnavailable:
                time.sleep(0.2)
        else:
            raise AssertionError("the store did not reconnect")
    finally:
        store.close(timeout=5)


def test_a_replica_reads_its_own_predictions_before_they_are_flushed(opener: Opener) -> None:
    """Within the flush interval another replica does not see a prediction yet; the replica that served it writes
    its queue at once when a label for it finds nothing, so a client labelling right away is not refused."""
    serving, other = opener(flush_interval=30.0), opener()
    serving.remember(_prediction("fresh", _served()))
    with pytest.raises(UnknownPrediction):
        other.join([Label("fm", "fresh", 0, 1)], "alice")
    started = time.monotonic()
    assert len(serving.join([Label("fm", "fresh", 0, 1)], "alice")) == 1
    assert time.monotonic() - started < 5
    assert len(other.join([Label("fm", "fresh", 1, 1)], "alice")) == 1
    with pytest.raises(UnknownPrediction):  # a miss with nothing queued is refused at once
        serving.join([Label("fm", "never", 0, 1)], "alice")


def test_auto_is_sqlite_in_the_state_folder_or_memory_where_it_cannot_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    options: dict[str, object] = {"ttl_seconds": 60.0, "max_predictions": 100, "max_bytes": 1 << 20,
                                  "replica": "one"}
    store = open_store("auto", state_dir=tmp_path / "state", **options)  # type: ignore[arg-type]
    try:
        assert store.kind == "sqlite" and (tmp_path / "state" / "feedback.sqlite3").is_file()
    finally:
        store.close(timeout=5)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level("WARNING"):
        fallback = open_store("auto", state_dir=blocker / "state", **options)  # type: ignore[arg-type]
    assert fallback.kind == "memory"
    assert "cannot be written" in caplog.text and "lost at exit" in caplog.text
