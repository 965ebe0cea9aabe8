"""The feedback store in a SQL database: SQLite (a file on one machine) or PostgreSQL (a fleet).

Every process that opens the same database shares it: a label reported to any replica joins the
prediction another served, and survives restarts. Predictions are written off the request path
(`service.feedback.writer`); a label is committed before `join` returns. The database enforces
that a label is counted once: `valley_labels` has a primary key per labelled image, so of two
replicas joining the same label at the same moment one inserts it and the other meets the key
(not a check, then a write). Predictions and labels expire after `ttl_seconds`, and the oldest
predictions go once they hold more than `max_predictions` images; the writer thread cleans up
between batches, never on the request path.

The schema is versioned (`valley_schema`): `MIGRATIONS[n]` takes a database from version n to
n + 1, applied in order on first use under a lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from service.errors import AlreadyLabelled, StoreUnavailable, UnknownPrediction
from service.feedback.core import (
    Joined,
    Label,
    LabelledWindow,
    Prediction,
    Served,
    already_labelled,
    check_label,
    where,
)
from service.feedback.writer import Unavailable, Writer, WriterStats

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# One list of statements per schema version; {blob} and {bigint} are the dialect's types.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE valley_predictions (
            caller TEXT NOT NULL, model TEXT NOT NULL, request_id TEXT NOT NULL,
            version INTEGER NOT NULL, served_us {bigint} NOT NULL, replica TEXT NOT NULL,
            images INTEGER NOT NULL, classes INTEGER NOT NULL, members INTEGER NOT NULL,
            probabilities {blob} NOT NULL, member_probabilities {blob} NOT NULL, used {blob} NOT NULL,
            PRIMARY KEY (caller, model, request_id))""",
        "CREATE INDEX valley_predictions_served ON valley_predictions (served_us)",
        # A label belongs to one serving of a request (served_us): a request id served again is a new prediction,
        # and the labels of the earlier one stay in the windows.
        """CREATE TABLE valley_labels (
            caller TEXT NOT NULL, model TEXT NOT NULL, request_id TEXT NOT NULL, served_us {bigint} NOT NULL,
            position INTEGER NOT NULL, version INTEGER NOT NULL, true_class INTEGER NOT NULL,
            labelled_us {bigint} NOT NULL, replica TEXT NOT NULL,
            classes INTEGER NOT NULL, members INTEGER NOT NULL, used INTEGER NOT NULL,
            probabilities {blob} NOT NULL, member_probabilities {blob} NOT NULL,
            PRIMARY KEY (caller, model, request_id, served_us, position))""",
        "CREATE INDEX valley_labels_window ON valley_labels (model, version, labelled_us)",
    ],
    [
        # Prediction sets: the coverage asked for and the sets served ([images, classes] booleans), so that a
        # label joined on any replica counts whether the set held the true class. NULL: answered without sets.
        "ALTER TABLE valley_predictions ADD COLUMN coverage DOUBLE PRECISION",
        "ALTER TABLE valley_predictions ADD COLUMN sets {blob}",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION
_KEY_CHUNK = 400  # (model, request id) pairs per lookup: well under either database's parameter limit
FLUSH_ON_MISS_S = 5.0
# How long the pool keeps trying to reconnect in the background before it gives up on a connection slot; the writer
# asks again after its backoff anyway, so this only bounds the pool's own retries.
RECONNECT_S = 300.0


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def _blob(array: np.ndarray, dtype: type) -> bytes:
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _array(blob: bytes, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype)


class _Duplicate(Exception):
    """A label of the report was joined already (the database's primary key said so)."""


@dataclass(frozen=True)
class _Row:
    served_us: int
    version: int
    images: int
    classes: int
    members: int
    served: Served


class Dialect:
    """What differs between the databases: connections, placeholders, types, errors, locks."""

    kind: str
    types: ClassVar[dict[str, str]]

    def connect(self) -> AbstractContextManager[Any]:
        """A connection for one unit of work (a transaction is begun by `transaction`)."""
        raise NotImplementedError

    def transaction(self, connection: Any, exclusive: bool = False) -> AbstractContextManager[None]:
        raise NotImplementedError

    def sql(self, statement: str) -> str:
        """A statement written with ? placeholders, in this database's."""
        return statement

    def unavailable(self, error: BaseException) -> bool:
        """Whether `error` means the database cannot be reached now (worth retrying), not a refusal."""
        raise NotImplementedError

    def duplicate(self, error: BaseException) -> bool:
        """Whether `error` is a primary key met twice."""
        raise NotImplementedError

    def lock(self, name: str) -> AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqlStore:
    shared = True

    def __init__(self, dialect: Dialect, location: str, *, ttl_seconds: float, max_predictions: int,
                 queue_items: int = 10_000, queue_bytes: int = 64 << 20, flush_interval: float = 0.2,
                 replica: str = "", clock: Callable[[], float] = time.time) -> None:
        self.dialect, self.kind, self.location = dialect, dialect.kind, location
        self.ttl_seconds, self.max_predictions, self.replica = ttl_seconds, max_predictions, replica
        self._clock = clock
        self._migrated = False
        self._migrating = threading.Lock()
        self._writer: Writer[Prediction] = Writer(self._write, lambda prediction: prediction.nbytes,
                                                  max_items=queue_items, max_bytes=queue_bytes,
                                                  flush_interval=flush_interval, housekeeping=self._housekeep)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._writer.start()

    def migrate(self) -> int:
        """Bring the schema to `SCHEMA_VERSION` (once per process); returns the version found before. Raises
        `Unavailable` when the database cannot be reached."""
        with self._migrating:
            if self._migrated:
                return SCHEMA_VERSION
            with self._unit() as connection, self.dialect.transaction(connection, exclusive=True):
                connection.execute("CREATE TABLE IF NOT EXISTS valley_schema (version INTEGER NOT NULL)")
                row = connection.execute("SELECT MAX(version) FROM valley_schema").fetchone()
                found = int(row[0]) if row is not None and row[0] is not None else 0
                if found > SCHEMA_VERSION:
                    raise RuntimeError(f"the feedback store's schema is version {found}, newer than this valley "
                                       f"knows ({SCHEMA_VERSION}): upgrade valley")
                for version in range(found, SCHEMA_VERSION):
                    for statement in MIGRATIONS[version]:
                        connection.execute(statement.format(**self.dialect.types))
                    connection.execute(self.dialect.sql("INSERT INTO valley_schema (version) VALUES (?)"),
                                       (version + 1,))
            self._migrated = True
            if found < SCHEMA_VERSION:
                log.info("feedback store %s: schema version %d -> %d", self.location, found, SCHEMA_VERSION)
            return found

    def close(self, timeout: float) -> None:
        self._writer.close(timeout)
        self.dialect.close()

    def stats(self) -> WriterStats | None:
        return self._writer.stats()

    def unreachable(self) -> None:
        """The database did not answer when the store was opened: reported down until a write succeeds."""
        self._writer.mark_down()

    # -- predictions --------------------------------------------------------------------------

    def remember(self, prediction: Prediction) -> None:
        if prediction.request_id:  # one without an id could never be labelled
            self._writer.put(prediction)

    def _write(self, batch: Sequence[Prediction]) -> None:
        rows = []
        for prediction in batch:
            served = prediction.served
            images, members, classes = served.member_probabilities.shape
            sets = None if served.sets is None else _blob(served.sets, np.bool_)
            rows.append((prediction.caller, prediction.model, prediction.request_id, prediction.version,
                         _us(prediction.served_at), self.replica, images, classes, members,
                         _blob(served.probabilities, np.float32), _blob(served.member_probabilities, np.float32),
                         _blob(served.used, np.int16), None if sets is None else served.coverage, sets))
        statement = self.dialect.sql(
            "INSERT INTO valley_predictions (caller, model, request_id, version, served_us, replica, images, "
            "classes, members, probabilities, member_probabilities, used, coverage, sets) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (caller, model, request_id) DO UPDATE SET version = excluded.version, "
            "served_us = excluded.served_us, replica = excluded.replica, images = excluded.images, "
            "classes = excluded.classes, members = excluded.members, probabilities = excluded.probabilities, "
            "member_probabilities = excluded.member_probabilities, used = excluded.used, "
            "coverage = excluded.coverage, sets = excluded.sets")
        self.migrate()
        with self._unit() as connection, self.dialect.transaction(connection):
            connection.cursor().executemany(statement, rows)

    def _housekeep(self) -> None:
        """Forget what expired, then the oldest predictions beyond `max_predictions` images."""
        self.migrate()
        oldest = _us(self._clock() - self.ttl_seconds)
        with self._unit() as connection, self.dialect.transaction(connection):
            connection.execute(self.dialect.sql("DELETE FROM valley_predictions WHERE served_us < ?"), (oldest,))
            connection.execute(self.dialect.sql("DELETE FROM valley_labels WHERE labelled_us < ?"), (oldest,))
            # The newest serving time beyond which the images add up to more than the bound: it and older go.
            row = connection.execute(self.dialect.sql(
                "SELECT served_us FROM (SELECT served_us, SUM(images) OVER (ORDER BY served_us DESC) AS images_after "
                "FROM valley_predictions) AS ranked WHERE images_after > ? ORDER BY served_us DESC LIMIT 1"),
                (self.max_predictions,)).fetchone()
            if row is not None:
                connection.execute(self.dialect.sql("DELETE FROM valley_predictions WHERE served_us <= ?"),
                                   (int(row[0]),))

    # -- labels -------------------------------------------------------------------------------

    def join(self, labels: Sequence[Label], caller: str, replica: str = "") -> list[Joined]:
        try:
            return self._join(labels, caller, replica)
        except UnknownPrediction:
            # Perhaps this replica served it moments ago and it waits in the queue: write the queue now and look
            # again (a replica reads its own writes; another one sees them after the flush interval).
            if self._writer.idle() or not self._writer.flush(timeout=FLUSH_ON_MISS_S):
                raise
            return self._join(labels, caller, replica)

    def _join(self, labels: Sequence[Label], caller: str, replica: str) -> list[Joined]:
        seen: set[tuple[str, str, int]] = set()
        for index, label in enumerate(labels):
            key = (label.model, label.request_id, label.position)
            if key in seen:
                raise AlreadyLabelled(already_labelled(index, label))
            seen.add(key)
        now = self._clock()
        rows: dict[tuple[str, str], _Row] = {}
        try:
            self.migrate()
            with self._unit() as connection, self.dialect.transaction(connection):
                rows = self._predictions(connection, caller, labels, _us(now - self.ttl_seconds))
                inserts, joined = [], []
                for index, label in enumerate(labels):
                    row = rows.get((label.model, label.request_id))
                    if row is None:
                        raise UnknownPrediction(
                            f"{where(index, label)}: no prediction kept for it (never served with that id, older "
                            f"than {self.ttl_seconds:g} s, pushed out of the store, or served less than the "
                            "store's flush interval ago); no label of this report was counted")
                    check_label(index, label, row.images, row.classes)
                    position = label.position
                    served = row.served
                    joined.append(served.joined(label.model, row.version, position, label.true_class))
                    inserts.append((caller, label.model, label.request_id, row.served_us, position, row.version,
                                    label.true_class, _us(now), replica or self.replica, row.classes, row.members,
                                    int(served.used[position]), _blob(served.probabilities[position], np.float32),
                                    _blob(served.member_probabilities[position], np.float32)))
                try:
                    connection.cursor().executemany(self.dialect.sql(
                        "INSERT INTO valley_labels (caller, model, request_id, served_us, position, version, "
                        "true_class, labelled_us, replica, classes, members, used, probabilities, "
                        "member_probabilities) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"), inserts)
                except Exception as error:
                    if self.dialect.duplicate(error):
                        raise _Duplicate from None  # out of the transaction: it rolls back
                    raise
            return joined
        except _Duplicate:
            duplicate = self._first_labelled(caller, labels, rows)
            raise AlreadyLabelled(already_labelled(duplicate, labels[duplicate])) from None
        except Unavailable as error:
            raise StoreUnavailable(f"the feedback store ({self.kind}) cannot be reached, so no label of this report "
                                   f"was counted: report them again later ({error})") from None

    def _predictions(self, connection: Any, caller: str, labels: Sequence[Label], oldest_us: int
                     ) -> dict[tuple[str, str], _Row]:
        """The unexpired predictions `labels` name, by (model, request id)."""
        keys = sorted({(label.model, label.request_id) for label in labels})
        found: dict[tuple[str, str], _Row] = {}
        for start in range(0, len(keys), _KEY_CHUNK):
            chunk = keys[start:start + _KEY_CHUNK]
            pairs = " OR ".join(["(model = ? AND request_id = ?)"] * len(chunk))
            cursor = connection.execute(self.dialect.sql(
                "SELECT model, request_id, served_us, version, images, classes, members, probabilities, "
                "member_probabilities, used, coverage, sets FROM valley_predictions WHERE caller = ? AND "
                f"served_us >= ? AND ({pairs})"
            ), (caller, oldest_us, *(part for key in chunk for part in key)))
            for (model, request_id, served_us, version, images, classes, members, probabilities, member, used,
                 coverage, sets) in cursor:
                found[(model, request_id)] = _Row(int(served_us), int(version), int(images), int(classes),
                                                  int(members), Served(
                    _array(probabilities, np.float32, (images, classes)),
                    _array(member, np.float32, (images, members, classes)), _array(used, np.int16, (images,)),
                    None if coverage is None else float(coverage),
                    None if sets is None else _array(sets, np.bool_, (images, classes))))
        return found

    def _first_labelled(self, caller: str, labels: Sequence[Label], rows: dict[tuple[str, str], _Row]) -> int:
        """The index of the first label of a refused report that another report had labelled (for the message)."""
        with self._unit() as connection:
            for index, label in enumerate(labels):
                row = rows[(label.model, label.request_id)]
                found = connection.execute(self.dialect.sql(
                    "SELECT 1 FROM valley_labels WHERE caller = ? AND model = ? AND request_id = ? AND served_us = ? "
                    "AND position = ?"), (caller, label.model, label.request_id, row.served_us, label.position)
                ).fetchone()
                if found is not None:
                    return index
        return 0

    def window(self, model: str, version: int, size: int) -> LabelledWindow:
        try:
            self.migrate()
            with self._unit() as connection:
                rows = connection.execute(self.dialect.sql(
                    "SELECT classes, members, used, true_class, member_probabilities, probabilities FROM valley_labels "
                    "WHERE model = ? AND version = ? ORDER BY labelled_us DESC LIMIT ?"), (model, version, size)
                ).fetchall()
        except Unavailable as error:
            raise StoreUnavailable(f"the feedback store ({self.kind}) cannot be reached to read the labels of "
                                   f"{model!r} version {version}: try again later ({error})") from None
        rows.reverse()  # oldest first, as a window fills
        if not rows:
            return LabelledWindow.empty()
        return LabelledWindow(np.stack([_array(row[5], np.float32, (int(row[0]),)) for row in rows]),
                              np.stack([_array(row[4], np.float32, (int(row[1]), int(row[0]))) for row in rows]),
                              np.array([int(row[2]) for row in rows], dtype=np.int64),
                              np.array([int(row[3]) for row in rows], dtype=np.int64))

    def lock(self, name: str) -> AbstractContextManager[None]:
        return self.dialect.lock(name)

    @contextmanager
    def _unit(self) -> Iterator[Any]:
        """A connection; errors that mean the database is out of reach become `Unavailable`."""
        try:
            with self.dialect.connect() as connection:
                yield connection
        except Exception as error:
            if isinstance(error, Unavailable) or not self.dialect.unavailable(error):
                raise
            raise Unavailable(_one_line(error)) from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for a lock name (PostgreSQL's advisory locks take one)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


# -- SQLite -----------------------------------------------------------------------------------------------


class SqliteDialect(Dialect):
    kind = "sqlite"
    types: ClassVar[dict[str, str]] = {"blob": "BLOB", "bigint": "INTEGER"}

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path, self.busy_timeout = path, busy_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit: `transaction` begins and ends every transaction itself.
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # a label reported is on disk before Report answers
            self._local.connection = connection
            with self._guard:
                self._all.append(connection)
        yield connection

    @contextmanager
    def transaction(self, connection: sqlite3.Connection, exclusive: bool = False) -> Iterator[None]:
        connection.execute("BEGIN IMMEDIATE")  # the write lock at once: no deadlock upgrading a read
        try:
            yield
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def unavailable(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.OperationalError) and any(
            text in str(error) for text in ("locked", "busy", "disk I/O", "unable to open"))

    def duplicate(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        # A lock file beside the database: released by the kernel if the holder dies.
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        path = self.path.with_name(f"{self.path.name}.{safe}.lock")
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._guard:
            for connection in self._all:
                connection.close()
            self._all.clear()


# -- PostgreSQL -------------------------------------------------------------------------------------------


class PostgresDialect(Dialect):
    kind = "postgresql"
    types: ClassVar[dict[str, str]] = {"blob": "BYTEA", "bigint": "BIGINT"}

    def __init__(self, conninfo: str, connect_timeout: float = 2.0, pool_size: int = 4) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self._timeout = connect_timeout
        # The pool logs every failed connection attempt; the writer says once that the store is unreachable and
        # once that it is back.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        # A caller waits at most `connect_timeout` for a connection (the writer then backs off and tries again);
        # meanwhile the pool keeps trying to connect in the background, so a database that comes back is used at
        # once.
        self.pool = ConnectionPool(conninfo, min_size=0, max_size=pool_size, open=False, timeout=connect_timeout,
                                   kwargs={"connect_timeout": max(1, round(connect_timeout)),
                                           "application_name": "valley"},
                                   reconnect_timeout=RECONNECT_S, check=ConnectionPool.check_connection)
        self.pool.open(wait=False)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        with self.pool.connection() as connection:
            yield connection

    @contextmanager
    def transaction(self, connection: Any, exclusive: bool = False) -> Iterator[None]:
        with connection.transaction():
            if exclusive:  # migrations: one process at a time
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("valley:schema"),))
            yield

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def unavailable(self, error: BaseException) -> bool:
        from psycopg_pool import PoolTimeout

        return isinstance(error, PoolTimeout | self._psycopg.OperationalError | self._psycopg.InterfaceError)

    def duplicate(self, error: BaseException) -> bool:
        return isinstance(error, self._psycopg.errors.UniqueViolation)

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with self.connect() as connection:
            connection.autocommit = True
            connection.execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
            try:
                yield
            finally:
                connection.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))

    def close(self) -> None:
        self.pool.close(timeout=self._timeout)
