"""Start `valley-serve` as a child process on free ports, and learn the ports without racing.

The server is started with `--grpc-port 0 --http-port 0 --metrics-port 0 --ready-file F`: the kernel picks
free ports when it binds them, and once the ensembles are loaded the server writes what it
bound to F. Nothing guesses a free port first (which another process could take meanwhile).
Standard library only, so tests, benchmarks and client programs use it without the server's
own dependencies.

    with start_server(Path("runs/ensembles")) as server:
        client = tritonclient.grpc.InferenceServerClient(server.url)

`throwaway_credentials` makes a private CA, a certificate and a token, so that examples run the
server as production does: TLS and bearer tokens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class Credentials:
    """What it takes to run a server as production runs it: TLS with a certificate a private CA signed, and a
    bearer token with every role (infer, feedback, admin)."""

    ca: Path
    cert: Path
    key: Path
    tokens_file: Path
    token: str

    @property
    def flags(self) -> list[str]:
        """valley-serve's flags for them."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tokens-file", str(self.tokens_file)]

    @property
    def headers(self) -> dict[str, str]:
        """What a tritonclient call sends to authenticate (`headers=`)."""
        return {"authorization": f"Bearer {self.token}"}


def throwaway_credentials(folder: Path) -> Credentials:
    """A new private CA, a server certificate for localhost and 127.0.0.1 that it signed, and a random token, in
    `folder` (made by the `openssl` command; valid for a day). For examples and tests: production certificates
    come from the cluster's issuer (deploy/README.md)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        try:
            subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise ServerStartError("the openssl command is needed to make a throwaway certificate: install it "
                                   "(apt-get install openssl)") from None

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=valley CA")
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.crt", "-days", "1", "-extfile", "server.ext")
    token = secrets.token_urlsafe(32)
    tokens_file = folder / "tokens"
    tokens_file.write_text(f"{token} infer,feedback,admin\n")
    tokens_file.chmod(0o600)
    return Credentials(folder / "ca.crt", folder / "server.crt", folder / "server.key", tokens_file, token)


class ServerStartError(RuntimeError):
    """valley-serve exited, or wrote no ready file in time; the message ends with what it logged."""


@dataclass
class ServerProcess:
    """A running valley-serve: its process, the ports it bound, and whether it was ready when it said so."""

    process: subprocess.Popen[bytes]
    host: str
    grpc_port: int
    metrics_port: int
    ready: bool
    """Whether every ensemble had loaded (ServerReady) when the server wrote its ready file."""
    log: Path | None
    _folder: Path
    health_port: int | None = None
    """The plaintext health-only port, when the server was given --health-port."""
    http_port: int | None = None
    """The HTTP/REST port; None when the server was started with --http false."""

    @property
    def url(self) -> str:
        """HOST:PORT of the gRPC server, as tritonclient.grpc takes it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """HOST:PORT of the HTTP/REST server, as tritonclient.http takes it."""
        if self.http_port is None:
            raise ValueError("this server serves no HTTP (it was started with --http false)")
        return f"{self.host}:{self.http_port}"

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Ask the server to stop (SIGTERM: a graceful drain), kill it after `timeout` s; its exit status."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(self.process)
                self.process.wait()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process, or its whole process group when it leads one (started with a session of its own)."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:
        pass


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(its output went to this terminal)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(repository: Path, *flags: str, host: str = "127.0.0.1", log: Path | None = None,
                 env: Mapping[str, str] | None = None, python: str = sys.executable, cwd: Path | None = None,
                 timeout: float = 180.0, new_session: bool = False) -> ServerProcess:
    """Start `python -m service.cli` on `repository` with `flags`, and return once it wrote its ready file.

    `log`: a file for the server's output (stdout and stderr); without one its log goes to this
    process's stderr. `new_session`: the server leads a process group of its own, which `stop`
    kills as a whole if it does not exit in time. Raises `ServerStartError` if the server exits
    first or says nothing within `timeout` seconds.
    """
    folder = Path(tempfile.mkdtemp(prefix="valley-serve-"))
    ready_file = folder / "ready.json"
    command = [python, "-m", "service.cli", "--repository", str(repository), "--host", host, "--grpc-port", "0",
               "--http-port", "0", "--metrics-port", "0", "--ready-file", str(ready_file), *flags]
    with open(log, "wb") if log is not None else open(os.devnull, "wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, env=None if env is None else {**os.environ, **env},
                                   stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT if log is not None else None,
                                   start_new_session=new_session)
    deadline = time.monotonic() + timeout
    try:
        while not ready_file.is_file():
            if process.poll() is not None:
                raise ServerStartError(f"valley-serve exited with status {process.returncode} before it was "
                                       f"ready; its log:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"valley-serve wrote no ready file in {timeout:.0f} s; its log:\n{_tail(log)}")
            time.sleep(0.05)
        announced = json.loads(ready_file.read_text())
        health, http = announced.get("health_port"), announced.get("http_port")
        return ServerProcess(process, host, int(announced["grpc_port"]), int(announced["metrics_port"]),
                             bool(announced["ready"]), log, folder, None if health is None else int(health),
                             None if http is None else int(http))
    except BaseException:  # whatever went wrong, no server is left running
        _kill(process)
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)
        raise
