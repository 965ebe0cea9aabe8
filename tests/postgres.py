"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` package, a cluster of its own on a free port.

`initdb` and `pg_ctl` refuse to run as root, so as root they run as the `postgres` user (which the package
creates) in a folder it owns. The server listens on 127.0.0.1 only, with password authentication, and holds one
database and one user for valley; `stop` and `start` take it down and bring it back on the same port (the
fleet tests stop it under load).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DATABASE = "valley"
USER = "valley"


def _binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parent.parent.name))
    assert found, "PostgreSQL is missing: `make data` installs Debian's postgresql package"
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A running PostgreSQL cluster in `folder`; `url` reaches its valley database as the valley user."""

    def __init__(self, durable: bool = False) -> None:
        self.bin = _binaries()
        # The tests run without fsync (a crash of the machine loses nothing they need); a benchmark pays for it.
        self.durable = durable
        # Its own folder under /tmp: as root the server runs as `postgres`, which cannot enter pytest's private one.
        folder = self.folder = Path(tempfile.mkdtemp(prefix="valley-postgres-"))
        self.data = folder / "data"
        self.sockets = folder / "sockets"
        self.password = secrets.token_urlsafe(16)
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._databases = 0
        folder.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            for path in (folder, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        secret = folder / "superuser-password"
        secret.write_text(self.password + "\n")
        if self._as_postgres:
            os.chown(secret, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256",
                  f"--pwfile={secret}", "-E", "UTF8", "--no-sync")
        secret.unlink()
        self.start()
        self._sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")
        self._sql(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def database(self) -> str:
        """The URL of a new, empty database of the valley user (a test of its own)."""
        self._databases += 1
        name = f"{DATABASE}_{self._databases}"
        self._sql(f"CREATE DATABASE {name} OWNER {USER}")
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{name}"

    def url_with(self, password: str) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   f"-c fsync={'on' if self.durable else 'off'} -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w",
                  "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def pid(self) -> int:
        """The postmaster's process id (every server process is its child)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def running(self) -> bool:
        return subprocess.run(self._command("pg_ctl", "-D", str(self.data), "status"), capture_output=True
                              ).returncode == 0

    def close(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _sql(self, statement: str) -> None:
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-v",
                  "ON_ERROR_STOP=1", "-c", statement, env={"PGPASSWORD": self.password})

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin / program), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else command

    def _run(self, program: str, *args: str, env: dict[str, str] | None = None) -> None:
        started = time.monotonic()
        result = subprocess.run(self._command(program, *args), capture_output=True, text=True, timeout=120,
                                env={**os.environ, **(env or {})}, cwd="/")
        if result.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed after {time.monotonic() - started:.1f} s:\n"
                               f"{result.stdout}\n{result.stderr}\n{tail}")
