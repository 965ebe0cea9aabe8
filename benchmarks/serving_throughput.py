"""Serving throughput: one ensemble served by valley, by Triton through PyTriton, and in-process.

Each server runs as a subprocess on free ports, alone on the machine while it is measured; a
closed-loop load generator (tritonclient gRPC, `--client-processes` processes with sync clients
in threads, `concurrency` requests always in flight) drives it for `--duration` seconds per
scenario after `--warmup` seconds. Every response is checked: `probabilities` must match the
in-process fused graph's for the same images within `--tolerance`, or it counts as an error.
The in-process row is the fused graph (`manifest.fused`) called in a loop at the scenario's batch
size in this process: the limit a server can approach. Inputs are Fashion-MNIST test images when
the dataset is installed, else random pixels.

    .venv/bin/python benchmarks/serving_throughput.py [--version-dir runs/ensembles/fashion-mnist/1] \\
        [--scenarios 1x16 32x4 | --batch-size 1 32 --concurrency 4 16] [--duration 10] \\
        [--servers valley,pytriton,inprocess] [--json results.json]

PyTriton runs `benchmarks/pytriton_ensemble.py` with `--pytriton-python` (default
`.venv-pytriton/bin/python`), a venv made from Debian's own python3.11:

    /usr/bin/python3.11 -m venv .venv-pytriton && .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime numpy

valley runs `python -m service.cli --repository REPO --grpc-port P --metrics-port M [--valley-arg ...]`,
where REPO is a temporary repository holding only `<name>/<version>`, a link to the measured version
(`--valley-repository` to serve another). Requests name the version. Servers get SIGINT, then SIGKILL
after `--stop-timeout` seconds; their whole process group goes, also when this script fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnxruntime
import tritonclient.grpc as grpcclient
from tqdm import tqdm

from artefact.manifest import Manifest, load_manifest
from service.ensemble import create_session

ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
OUTPUT = "probabilities"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    batch: int
    concurrency: int


@dataclass
class Result:
    server: str
    batch: int
    concurrency: int
    seconds: float
    requests: int
    errors: int
    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    other_cpu: float = 0.0
    error_samples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadSpec:
    """What one load-generator process does; picklable for the spawned process."""

    url: str
    model: str
    version: str
    input_name: str
    batch: int
    threads: int
    tolerance: float
    timeout: float
    seed: int


# ---------------------------------------------------------------- inputs and the reference


def load_images(count: int, seed: int) -> tuple[np.ndarray, str]:
    """`count` uint8 images [N, 1, 28, 28]: Fashion-MNIST's test split if installed, else random."""
    if FASHION_MNIST_TEST.exists():
        with gzip.open(FASHION_MNIST_TEST, "rb") as handle:
            data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16)
        images = data.reshape(-1, 1, 28, 28)[:count]
        return np.ascontiguousarray(images), f"Fashion-MNIST test ({len(images)} images)"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 1, 28, 28), dtype=np.uint8), f"random pixels ({count} images)"


def fused_session(version_dir: Path, manifest: Manifest, threads: int = 0) -> onnxruntime.InferenceSession:
    """The fused graph on the CPU; `threads` 0 keeps onnxruntime's default, one spinning pool over the cores."""
    return create_session(version_dir / manifest.fused.file, "cpu", threads, spinning=True)


def reference_probabilities(session: onnxruntime.InferenceSession, input_name: str, images: np.ndarray) -> np.ndarray:
    parts = [session.run([OUTPUT], {input_name: images[start:start + 256]})[0]
             for start in range(0, len(images), 256)]
    return np.concatenate(parts).astype(np.float32)


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


# ---------------------------------------------------------------- load generator


def client_process(spec: LoadSpec, images: np.ndarray, reference: np.ndarray,
                   control: Queue[tuple[float, float]], results: Queue[dict[str, Any]]) -> None:
    """Closed loop: `spec.threads` threads, each with its own client, one request in flight each.

    Requests are built once (inputs serialised up front) and cycled. A response completed inside
    [start, stop] counts: as a latency if its probabilities match `reference` for its images within
    the tolerance, else (a failure, a wrong shape or wrong numbers) as an error.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    rng = np.random.default_rng(spec.seed)
    per_thread = max(1, min(64, len(images) // spec.batch))
    plans = []
    for _ in range(spec.threads):
        requests = []
        for offset in rng.integers(0, len(images) - spec.batch + 1, per_thread):
            pixels = images[offset:offset + spec.batch]
            request = grpcclient.InferInput(spec.input_name, list(pixels.shape), "UINT8")
            request.set_data_from_numpy(pixels)
            requests.append((request, reference[offset:offset + spec.batch]))
        plans.append(requests)
    outputs = [grpcclient.InferRequestedOutput(OUTPUT)]
    results.put({"ready": True})
    start, stop = control.get()

    latencies: list[list[float]] = [[] for _ in range(spec.threads)]
    errors = [0] * spec.threads
    samples: list[str] = []

    def loop(index: int) -> None:
        client = grpcclient.InferenceServerClient(spec.url)
        mine, out = plans[index], latencies[index]
        position = 0
        while (began := time.monotonic()) < stop:
            request, expected = mine[position]
            position = (position + 1) % len(mine)
            problem = ""
            try:
                answer = client.infer(spec.model, [request], spec.version, outputs=outputs,
                                      client_timeout=spec.timeout).as_numpy(OUTPUT)
                if answer is None or answer.shape != expected.shape:
                    problem = f"shape {None if answer is None else answer.shape} != {expected.shape}"
                elif not float(np.abs(answer - expected).max()) <= spec.tolerance:
                    problem = f"probabilities differ by {float(np.abs(answer - expected).max()):.2e}"
            except Exception as error:  # every failure is an error of this response
                problem = f"{type(error).__name__}: {error}"
            ended = time.monotonic()
            if not start <= ended <= stop:
                continue
            if not problem:
                out.append(ended - began)
            else:
                errors[index] += 1
                if len(samples) < 5:
                    samples.append(problem)
        client.close()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(spec.threads)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start - time.monotonic()))
    cpu_start = time.process_time()
    time.sleep(max(0.0, stop - time.monotonic()))
    cpu_used = time.process_time() - cpu_start
    for thread in threads:
        thread.join()
    results.put({"latencies": np.concatenate([np.asarray(x, dtype=np.float64) for x in latencies]),
                 "errors": sum(errors), "samples": samples, "cpu": cpu_used})


def split(total: int, parts: int) -> list[int]:
    """`total` threads over at most `parts` processes, as evenly as possible, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(server: str, url: str, manifest: Manifest, scenario: Scenario, images: np.ndarray,
             reference: np.ndarray, args: argparse.Namespace, server_pgid: int) -> Result:
    """Closed-loop load at `scenario` against the server at `url`; one Result."""
    context = multiprocessing.get_context("spawn")
    results: Queue[dict[str, Any]] = context.Queue()
    controls: list[Queue[tuple[float, float]]] = []
    processes = []
    try:
        for index, threads in enumerate(split(scenario.concurrency, args.client_processes)):
            spec = LoadSpec(url, manifest.name, str(manifest.version), manifest.input.name, scenario.batch, threads,
                            args.tolerance, args.request_timeout, args.seed + index)
            control: Queue[tuple[float, float]] = context.Queue()
            process = context.Process(target=client_process, args=(spec, images, reference, control, results),
                                      daemon=True)
            process.start()
            processes.append(process)
            controls.append(control)
        for _ in processes:
            receive(results, processes, 120)
        start = time.monotonic() + args.warmup
        stop = start + args.duration
        for control in controls:
            control.put((start, stop))
        time.sleep(max(0.0, start - time.monotonic()))
        server_cpu, machine_cpu, own_cpu = group_cpu_seconds(server_pgid), machine_busy_seconds(), time.process_time()
        wait_with_progress(stop, f"{server} batch {scenario.batch} x {scenario.concurrency}")
        server_cpu = group_cpu_seconds(server_pgid) - server_cpu
        machine_cpu = machine_busy_seconds() - machine_cpu
        own_cpu = time.process_time() - own_cpu
        reports = [receive(results, processes, args.request_timeout + 30) for _ in processes]
        for process in processes:
            process.join(timeout=10)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    latencies = np.concatenate([report["latencies"] for report in reports])
    result = summarise(server, scenario, latencies, sum(report["errors"] for report in reports), args.duration)
    client_cpu = sum(report["cpu"] for report in reports) + own_cpu
    result.client_cpu = client_cpu / args.duration
    result.server_cpu = server_cpu / args.duration
    result.other_cpu = max(0.0, machine_cpu - client_cpu - server_cpu) / args.duration
    result.error_samples = [sample for report in reports for sample in report["samples"]][:5]
    return result


def receive(results: Queue[dict[str, Any]], processes: Sequence[BaseProcess], timeout: float) -> dict[str, Any]:
    """The next message of a load-generator process; fails when one died or none spoke within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            return results.get(timeout=0.5)
        dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a load-generator process failed (exit code {dead[0]})")
    raise RuntimeError(f"the load generator sent nothing for {timeout:.0f} s")


def wait_with_progress(until: float, label: str) -> None:
    total = max(0.0, until - time.monotonic())
    with tqdm(total=round(total, 1), desc=label, unit="s", disable=None, leave=False) as bar:
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            bar.n = round(total - max(0.0, until - time.monotonic()), 1)
            bar.refresh()


def summarise(server: str, scenario: Scenario, latencies: np.ndarray, errors: int, seconds: float) -> Result:
    count = len(latencies)
    p50, p99 = (float(v) * 1e3 for v in np.percentile(latencies, [50, 99])) if count else (float("nan"),) * 2
    return Result(server, scenario.batch, scenario.concurrency, seconds, count, errors,
                  count * scenario.batch / seconds, count / seconds, p50, p99)


# ---------------------------------------------------------------- in-process


def run_inprocess(session: onnxruntime.InferenceSession, manifest: Manifest, scenario: Scenario, images: np.ndarray,
                  reference: np.ndarray, args: argparse.Namespace) -> Result:
    """The fused graph in a loop in this process, one call per batch: the limit."""
    rng = np.random.default_rng(args.seed)
    offsets = rng.integers(0, len(images) - scenario.batch + 1, 64)
    batches = [(images[o:o + scenario.batch], reference[o:o + scenario.batch]) for o in offsets]
    name = manifest.input.name
    until = time.monotonic() + args.warmup
    while time.monotonic() < until:
        session.run([OUTPUT], {name: batches[0][0]})
    latencies, errors, position = [], 0, 0
    cpu, machine = time.process_time(), machine_busy_seconds()
    began = start = time.monotonic()
    stop = start + args.duration
    with tqdm(total=args.duration, desc=f"inprocess batch {scenario.batch}", unit="s", disable=None,
              leave=False) as bar:
        while began < stop:
            pixels, expected = batches[position]
            position = (position + 1) % len(batches)
            answer = session.run([OUTPUT], {name: pixels})[0]
            ended = time.monotonic()
            if float(np.abs(answer - expected).max()) <= args.tolerance:
                latencies.append(ended - began)
            else:
                errors += 1
            if ended - start - bar.n >= 0.5:
                bar.n = round(min(ended - start, args.duration), 1)
                bar.refresh()
            began = ended
    elapsed = began - start
    result = summarise("inprocess", Scenario(scenario.batch, 1), np.asarray(latencies), errors, elapsed)
    cpu, machine = time.process_time() - cpu, machine_busy_seconds() - machine
    result.client_cpu = cpu / elapsed
    result.other_cpu = max(0.0, machine - cpu) / elapsed
    return result


# ---------------------------------------------------------------- server processes


def free_ports(count: int) -> list[int]:
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


def server_command(server: str, version_dir: Path, manifest: Manifest, args: argparse.Namespace,
                   folder: Path) -> tuple[list[str], int]:
    """The command line that serves the ensemble, and its gRPC port."""
    grpc_port, http_port, metrics_port = free_ports(3)
    if server == "valley":
        repository = args.valley_repository or valley_repository(version_dir, manifest, folder)
        command = [args.valley_python, "-m", "service.cli", "--repository", str(repository),
                   "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), *args.valley_arg]
    else:
        command = [args.pytriton_python, str(ROOT / "benchmarks" / "pytriton_ensemble.py"),
                   "--version-dir", str(version_dir), "--port", str(grpc_port), "--http-port", str(http_port),
                   "--metrics-port", str(metrics_port), "--max-batch-size", str(args.pytriton_max_batch_size),
                   "--max-queue-delay-us", str(args.pytriton_max_queue_delay_us),
                   "--workspace", str(folder / f"pytriton-workspace-{grpc_port}"), *args.pytriton_arg]
    return command, grpc_port


@contextlib.contextmanager
def serving(server: str, version_dir: Path, manifest: Manifest, args: argparse.Namespace,
            log_dir: Path) -> Iterator[tuple[str, int]]:
    """Start `server`, wait until the model is ready, yield (url, process group); always stop it.

    A start that fails is tried again (`--start-attempts`): PyTriton's second model instance
    sometimes reaches the first one's handshake socket before it listens, on a busy machine.
    """
    for attempt in range(1, args.start_attempts + 1):
        command, port = server_command(server, version_dir, manifest, args, log_dir)
        url = f"127.0.0.1:{port}"
        log_path = log_dir / (f"{server}.log" if attempt == 1 else f"{server}-{attempt}.log")
        print(f"starting {server}: {' '.join(command)}  (log: {log_path})", flush=True)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        began = time.monotonic()
        try:
            wait_ready(process, url, manifest.name, str(manifest.version), args.start_timeout, log_path)
        except RuntimeError as error:
            stop_group(process, args.stop_timeout)
            if attempt == args.start_attempts:
                raise
            print(f"{server} did not start (attempt {attempt} of {args.start_attempts}): {error}", flush=True)
            continue
        except BaseException:
            stop_group(process, args.stop_timeout)
            raise
        print(f"{server} ready after {time.monotonic() - began:.1f} s", flush=True)
        break
    try:
        yield url, process.pid
    finally:
        stop_group(process, args.stop_timeout)


def wait_ready(process: subprocess.Popen[bytes], url: str, model: str, version: str, timeout: float,
               log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(url)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready:\n"
                                   f"{tail(log_path)}")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready(model, version):
                    return
            time.sleep(0.25)
    finally:
        client.close()
    raise RuntimeError(f"model {model!r} version {version} not ready at {url} after {timeout:.0f} s:\n"
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


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies waiting for their reaper do not count)."""
    return any(state not in "ZX" for state, _ in group_processes(pgid))


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---------------------------------------------------------------- report


def ratio(numerator: Result | None, denominator: Result | None) -> str:
    if numerator is None or denominator is None or not denominator.images_per_s:
        return "-"
    return f"{numerator.images_per_s / denominator.images_per_s:.2f}x"


def markdown(results: list[Result], scenarios: list[Scenario]) -> str:
    lines = ["| server | batch | concurrency | images/s | requests/s | p50 ms | p99 ms | errors "
             "| client CPU | server CPU | other CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.server} | {r.batch} | {r.concurrency} | {r.images_per_s:,.0f} | {r.requests_per_s:,.0f} "
                     f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.client_cpu:.2f} | {r.server_cpu:.2f} "
                     f"| {r.other_cpu:.2f} |")
    lines += ["", "| batch | concurrency | valley / pytriton | valley / inprocess | pytriton / inprocess |",
              "|---:|---:|---:|---:|---:|"]
    for s in scenarios:
        found = {r.server: r for r in results if r.batch == s.batch and (r.concurrency == s.concurrency
                                                                        or r.server == "inprocess")}
        valley, pytriton, inprocess = found.get("valley"), found.get("pytriton"), found.get("inprocess")
        lines.append(f"| {s.batch} | {s.concurrency} | {ratio(valley, pytriton)} | {ratio(valley, inprocess)} "
                     f"| {ratio(pytriton, inprocess)} |")
    lines += ["", "CPU columns: cores busy on average over the measured window. client: the load generator (for "
              "inprocess: this process running the graph); server: the server's process group; other: the rest of "
              "the machine, which should be near 0 for numbers worth comparing."]
    busy = [r for r in results if r.other_cpu > 0.2]
    if busy:
        lines.append(f"WARNING: other work used {max(r.other_cpu for r in busy):.2f} cores during "
                     f"{', '.join(f'{r.server} {r.batch}x{r.concurrency}' for r in busy)}: rerun on a quiet machine.")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_scenario(text: str) -> Scenario:
    batch, _, concurrency = text.lower().partition("x")
    return Scenario(int(batch), int(concurrency))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=ROOT / "runs/ensembles/fashion-mnist/1")
    parser.add_argument("--scenarios", type=parse_scenario, nargs="+",
                        default=[Scenario(1, 16), Scenario(32, 4)], help="BATCHxCONCURRENCY pairs (default 1x16 32x4)")
    parser.add_argument("--batch-size", type=int, nargs="+", help="with --concurrency: every pair of the two lists")
    parser.add_argument("--concurrency", type=int, nargs="+")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before each scenario")
    parser.add_argument("--servers", default="valley,pytriton,inprocess")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load-generator processes; the concurrency is split over their threads (one process "
                             "costs the least CPU per request here, and its GIL caps it far above 2 cores' servers)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |p - reference| a response may have")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request is an error")
    parser.add_argument("--images", type=int, default=4096, help="distinct images the requests are drawn from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valley-python", default=sys.executable)
    parser.add_argument("--valley-arg", action="append", default=[],
                        help="extra flag for valley's CLI (repeatable), e.g. --valley-arg=--session-threads=1")
    parser.add_argument("--valley-repository", type=Path,
                        help="serve this repository (default: a temporary one linking only the measured version)")
    parser.add_argument("--pytriton-python", default=str(ROOT / ".venv-pytriton/bin/python"))
    parser.add_argument("--pytriton-max-batch-size", type=int, default=64)
    parser.add_argument("--pytriton-max-queue-delay-us", type=int, default=0)
    parser.add_argument("--pytriton-arg", action="append", default=[],
                        help="extra flag for pytriton_ensemble.py (repeatable), e.g. --pytriton-arg=--instances=1")
    parser.add_argument("--inprocess-threads", type=int, default=0,
                        help="intra-op threads of the in-process session (0: onnxruntime's default, one per core)")
    parser.add_argument("--start-attempts", type=int, default=3, help="tries to start each server")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to be ready")
    parser.add_argument("--stop-timeout", type=float, default=15.0, help="seconds after SIGINT before SIGKILL")
    parser.add_argument("--log-dir", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if (args.batch_size is None) != (args.concurrency is None):
        parser.error("--batch-size and --concurrency go together")
    if args.batch_size:
        args.scenarios = [Scenario(b, c) for b in args.batch_size for c in args.concurrency]
    if any(s.batch < 1 or s.concurrency < 1 or s.batch > args.images for s in args.scenarios):
        parser.error(f"batch sizes must be 1..--images ({args.images}) and concurrencies at least 1")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - {"valley", "pytriton", "inprocess"}
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every server is stopped


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, _interrupt)
    version_dir = args.version_dir.resolve()
    manifest = load_manifest(version_dir)
    session = fused_session(version_dir, manifest, args.inprocess_threads)
    images, source = load_images(args.images, args.seed)
    reference = reference_probabilities(session, manifest.input.name, images)
    print(f"{manifest.name} v{manifest.version}: {len(manifest.members)} members; inputs: {source}; "
          f"{os.cpu_count()} CPUs; {args.duration:g} s per scenario after {args.warmup:g} s warm-up", flush=True)

    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        log_dir = (args.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-")))).resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        for server in args.servers:
            if server == "inprocess":
                for batch in dict.fromkeys(s.batch for s in args.scenarios):
                    results.append(run_inprocess(session, manifest, Scenario(batch, 1), images, reference, args))
                    print(f"  {summary_line(results[-1])}", flush=True)
                continue
            with serving(server, version_dir, manifest, args, log_dir) as (url, pgid):
                for scenario in args.scenarios:
                    results.append(run_load(server, url, manifest, scenario, images, reference, args, pgid))
                    print(f"  {summary_line(results[-1])}", flush=True)

    print()
    print(markdown(results, args.scenarios))
    for result in results:
        for sample in result.error_samples:
            print(f"{result.server} batch {result.batch} x {result.concurrency}: {sample}")
    if args.json:
        payload = {"ensemble": manifest.name, "version": manifest.version, "members": len(manifest.members),
                   "inputs": source, "cpus": os.cpu_count(), "duration": args.duration,
                   "results": [{key: None if isinstance(value, float) and value != value else value  # NaN: null
                                for key, value in asdict(result).items()} for result in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


def summary_line(r: Result) -> str:
    return (f"{r.server} batch {r.batch} x {r.concurrency}: {r.images_per_s:,.0f} images/s, p50 {r.p50_ms:.2f} ms, "
            f"p99 {r.p99_ms:.2f} ms, {r.errors} errors, CPU: client {r.client_cpu:.2f} server {r.server_cpu:.2f} "
            f"other {r.other_cpu:.2f}")


if __name__ == "__main__":
    main()
