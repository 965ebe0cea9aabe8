"""Server processes for the serving benchmark: start and stop them, and account for their CPU time from /proc.

valley is started with `service.launch.start_server`: on port 0, so the kernel picks free ports
when the server binds them, and the server names them in a ready file once its ensembles are
loaded. PyTriton cannot report the ports it bound, so it gets ports that were free a moment
before (`free_ports`). Every server leads a process group of its own: its CPU time is the
group's, and stopping it stops the whole group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

from artefact.manifest import Manifest
from service.launch import ServerProcess, start_server

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- CPU accounting from /proc


def group_processes(pgid: int) -> list[tuple[str, int]]:
    """(state, user + system CPU ticks) of every process in process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append((fields[0], int(fields[11]) + int(fields[12])))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group `pgid`."""
    return sum(ticks for _, ticks in group_processes(pgid)) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle, since boot (all cores)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting for their reaper do not count)."""
    return any(state not in "ZX" for state, _ in group_processes(pgid))


# ---------------------------------------------------------------- starting and stopping servers


@dataclass
class Started:
    """A server that was started: its process, which leads a process group of its own, and its gRPC URL."""

    process: subprocess.Popen[bytes]
    url: str
    valley: ServerProcess | None = None
    """valley's handle from `start_server`, which also owns the folder of its ready file."""
    http_url: str = ""
    """HOST:PORT of its HTTP/REST port."""

    @property
    def pgid(self) -> int:
        """The server's process group (it leads one of its own)."""
        return self.process.pid

    def stop(self, timeout: float) -> None:
        """Stop the whole process group (`stop_group`) and remove what starting it left behind."""
        stop_group(self.process, timeout)
        if self.valley is not None:
            self.valley.stop()  # the server has exited by now: this only removes its ready file's folder


@contextlib.contextmanager
def serving(server: str, version_dir: Path, manifest: Manifest, args: argparse.Namespace,
            log_dir: Path) -> Iterator[Started]:
    """Start `server`, wait until the model is ready, yield it (its gRPC url, its process group); always stop it.

    `args`: serving_throughput.py's command line. A start that fails is tried again (`--start-attempts`):
    PyTriton's second model instance sometimes reaches the first one's handshake socket before it
    listens, on a busy machine, and the ports PyTriton is given may be taken before it binds them.
    """
    for attempt in range(1, args.start_attempts + 1):
        log_path = log_dir / (f"{server}.log" if attempt == 1 else f"{server}-{attempt}.log")
        began = time.monotonic()
        started = None
        try:
            if server == "valley":
                started = start_valley(version_dir, manifest, args, log_dir, log_path)
            else:
                started = start_pytriton(version_dir, args, log_dir, log_path)
            wait_ready(started.process, started.url, manifest.name, str(manifest.version),
                       began + args.start_timeout, log_path)
        except RuntimeError as error:  # also ServerStartError: valley exited or wrote no ready file in time
            if started is not None:
                started.stop(args.stop_timeout)
            if attempt == args.start_attempts:
                raise
            print(f"{server} did not start (attempt {attempt} of {args.start_attempts}): {error}", flush=True)
            continue
        except BaseException:
            if started is not None:
                started.stop(args.stop_timeout)
            raise
        print(f"{server} ready at {started.url} after {time.monotonic() - began:.1f} s", flush=True)
        break
    assert started is not None  # the last failed attempt raised
    try:
        yield started
    finally:
        started.stop(args.stop_timeout)


def start_valley(version_dir: Path, manifest: Manifest, args: argparse.Namespace, folder: Path,
                 log_path: Path) -> Started:
    """Start valley-serve on ports the kernel picks; returns once it wrote its ready file (ensembles loaded)."""
    repository = args.valley_repository or valley_repository(version_dir, manifest, folder)
    command = [args.valley_python, "-m", "service.cli", "--repository", str(repository), *args.valley_arg]
    print(f"starting valley on port 0: {' '.join(command)}  (log: {log_path})", flush=True)
    valley = start_server(repository, *args.valley_arg, log=log_path, python=args.valley_python, cwd=ROOT,
                          timeout=args.start_timeout, new_session=True)
    return Started(valley.process, valley.url, valley, valley.http_url)


def start_pytriton(version_dir: Path, args: argparse.Namespace, folder: Path, log_path: Path) -> Started:
    """Start benchmarks/pytriton_ensemble.py with the PyTriton venv's python, on ports that were just free."""
    # PyTriton cannot report the ports it bound, so it cannot take port 0: it gets ports found free
    # a moment before, which another process may take first (then the start fails and is retried).
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [args.pytriton_python, str(ROOT / "benchmarks" / "pytriton_ensemble.py"),
               "--version-dir", str(version_dir), "--port", str(grpc_port), "--http-port", str(http_port),
               "--metrics-port", str(metrics_port), "--max-batch-size", str(args.pytriton_max_batch_size),
               "--max-queue-delay-us", str(args.pytriton_max_queue_delay_us),
               "--workspace", str(folder / f"pytriton-workspace-{grpc_port}"), *args.pytriton_arg]
    print(f"starting pytriton: {' '.join(command)}  (log: {log_path})", flush=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Started(process, f"127.0.0.1:{grpc_port}", http_url=f"127.0.0.1:{http_port}")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 when this looked (nothing holds them after)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def valley_repository(version_dir: Path, manifest: Manifest, folder: Path) -> Path:
    """A repository in `folder` holding only `<name>/<version>`, a link to `version_dir`.

    The ensemble's own repository may hold later versions (valley serves the latest) or other ensembles.
    """
    repository = folder / "repository"
    (repository / manifest.name).mkdir(parents=True, exist_ok=True)
    link = repository / manifest.name / str(manifest.version)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(version_dir, target_is_directory=True)
    return repository


def wait_ready(process: subprocess.Popen[bytes], url: str, model: str, version: str, deadline: float,
               log_path: Path) -> None:
    """Return once the server at `url` says `model` `version` is ready; fail if it exits or the deadline passes."""
    client = grpcclient.InferenceServerClient(url)
    try:
        while True:  # asked at least once: valley may have used most of the time to write its ready file
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready:\n"
                                   f"{tail(log_path)}")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready(model, version):
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
    finally:
        client.close()
    raise RuntimeError(f"model {model!r} version {version} not ready at {url} by the start timeout:\n"
                       f"{tail(log_path)}")


def stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT to the server, SIGKILL to what is left of its process group after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process.poll() is None or group_alive(process.pid)):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a server's log, for an error message; empty when there is none."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
