"""`--feedback-store URL`: which store a server (or `valley-recalibrate`) keeps predictions and labels in.

- `memory:` this process only (nothing survives it, no other process joins its labels);
- `sqlite:PATH` (`sqlite:///abs/path.db`, `sqlite:relative.db`) a file on this machine, shared by the
  processes that open it, kept across restarts;
- `postgresql://[user[:password]@]host[:port]/database[?options]` (or `postgres://`) a PostgreSQL
  database, for a fleet: libpq's environment variables (PGPASSWORD, PGPASSFILE, PGSSLMODE, ...) and
  a password file apply, so the URL need not hold the password;
- `auto` (the default) `sqlite:` in the state folder (`--state-dir`, by default
  `$XDG_STATE_HOME/valley` or `~/.local/state/valley`), or `memory:` where that folder cannot be
  written (a read-only container), with a warning.

A URL is never logged or shown with its password (`redact`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from service.feedback.core import Store
from service.feedback.memory import MemoryStore
from service.feedback.sql import PostgresDialect, SqliteDialect, SqlStore
from service.feedback.writer import Unavailable

log = logging.getLogger(__name__)

SQLITE_FILE = "feedback.sqlite3"


class StoreConfigError(Exception):
    """A store URL that cannot work: a typo, an unknown scheme, a folder that cannot be written, credentials the
    database refuses. The message names the problem, never the password."""


_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    redacted = _PASSWORD.sub(r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", redacted)


def default_state_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "valley"


def open_store(url: str, *, ttl_seconds: float, max_predictions: int, max_bytes: int, replica: str,
               state_dir: Path | None = None, flush_interval: float = 0.2, queue_items: int = 10_000,
               queue_bytes: int = 64 << 20) -> Store:
    """The store `url` names, checked: a SQL store's schema is created or migrated when its database answers; one
    that does not answer yet is opened anyway (its writer keeps trying). `StoreConfigError` for a URL that cannot
    work."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else url.lower()
    if scheme == "memory":
        if url.lower() not in ("memory", "memory:"):
            raise StoreConfigError(f"the memory store takes no location: --feedback-store memory: (got {url!r})")
        return MemoryStore(max_predictions, ttl_seconds, max_bytes)
    if scheme == "auto":
        folder = state_dir or default_state_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".valley-write-test"
            probe.touch()
            probe.unlink()
        except OSError as error:
            log.warning("feedback: the state folder %s cannot be written (%s): predictions and labels are kept in "
                        "memory and are lost at exit; give --state-dir or --feedback-store", folder,
                        error.strerror or error)
            return MemoryStore(max_predictions, ttl_seconds, max_bytes)
        return _sqlite(folder / SQLITE_FILE, ttl_seconds, max_predictions, replica, flush_interval, queue_items,
                       queue_bytes)
    if scheme == "sqlite":
        path = urlsplit(url).path
        if not path:
            raise StoreConfigError(f"{redact(url)!r} names no file: --feedback-store sqlite:///absolute/path.db or "
                                   "sqlite:relative.db")
        return _sqlite(Path(path), ttl_seconds, max_predictions, replica, flush_interval, queue_items, queue_bytes)
    if scheme in ("postgresql", "postgres"):
        return _postgres(url, ttl_seconds, max_predictions, replica, flush_interval, queue_items, queue_bytes)
    raise StoreConfigError(f"unknown feedback store {redact(url)!r}: give memory:, sqlite:PATH, "
                           "postgresql://user@host/database or auto")


def _sqlite(path: Path, ttl_seconds: float, max_predictions: int, replica: str, flush_interval: float,
            queue_items: int, queue_bytes: int) -> SqlStore:
    if not path.parent.is_dir():
        raise StoreConfigError(f"the feedback store's folder {path.parent} does not exist")
    store = SqlStore(SqliteDialect(path), str(path), ttl_seconds=ttl_seconds, max_predictions=max_predictions,
                     replica=replica, flush_interval=flush_interval, queue_items=queue_items,
                     queue_bytes=queue_bytes)
    try:
        store.migrate()
    except Unavailable as error:
        raise StoreConfigError(f"the feedback store {path} cannot be opened: {error}") from None
    except Exception as error:  # sqlite3.DatabaseError: not a database, a newer schema
        raise StoreConfigError(f"the feedback store {path} cannot be used: {' '.join(str(error).split())}") \
            from None
    return store


def _postgres(url: str, ttl_seconds: float, max_predictions: int, replica: str, flush_interval: float,
              queue_items: int, queue_bytes: int) -> SqlStore:
    try:
        import psycopg
    except ImportError:
        raise StoreConfigError("a postgresql:// feedback store needs psycopg: pip install "
                               "'valley-ensembles[serve]'") from None
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as error:
        raise StoreConfigError(f"the feedback store URL {redact(url)!r} cannot be read: "
                               f"{redact(' '.join(str(error).split()))}") from None
    location = redact(url)
    # One connection first, to tell a configuration that cannot work from a database that is down for now.
    try:
        with psycopg.connect(url, connect_timeout=5, application_name="valley") as connection:
            connection.execute("SELECT 1")
    except psycopg.OperationalError as error:
        problem = _connection_problem(error)
        if problem == "the URL cannot be read":
            detail = redact(" ".join(str(error).split())).removeprefix("connection is bad: ")
            raise StoreConfigError(f"the feedback store URL {location!r} cannot be read: {detail}") from None
        if problem is not None:
            raise StoreConfigError(f"the feedback store {location} refused the connection: {problem}") from None
        log.warning("feedback: the store %s cannot be reached now (%s); serving goes on, and served predictions "
                    "queue for it until it answers", location, redact(" ".join(str(error).split()))[:300])
    store = SqlStore(PostgresDialect(url), location, ttl_seconds=ttl_seconds, max_predictions=max_predictions,
                     replica=replica, flush_interval=flush_interval, queue_items=queue_items,
                     queue_bytes=queue_bytes)
    try:
        store.migrate()
    except Unavailable:
        store.unreachable()  # the writer migrates once the database answers
    except Exception as error:
        raise StoreConfigError(f"the feedback store {location} cannot be used: "
                               f"{redact(' '.join(str(error).split()))[:300]}") from None
    return store


# SQLSTATE classes of a connection refused for its configuration, not for the database being down.
_REFUSALS = {"28000": "the user is not allowed to connect (pg_hba.conf)", "28P01": "wrong password",
             "3D000": "no such database", "42501": "permission denied"}


def _connection_problem(error: BaseException) -> str | None:
    """What is wrong with a refused connection's configuration, or None when the database is merely down."""
    state = getattr(error, "sqlstate", None)
    if state in _REFUSALS:
        return _REFUSALS[state]
    text = str(error)
    for marker, problem in (("password authentication failed", "wrong user or password"),
                            ("no password supplied", "no password given (the URL, PGPASSWORD or a password file)"),
                            ("does not exist", "no such database or user"),
                            ("no pg_hba.conf entry", "the user is not allowed to connect (pg_hba.conf)"),
                            ("connection is bad: invalid", "the URL cannot be read")):
        if marker in text:
            return problem
    return None
