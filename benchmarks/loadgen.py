"""Load for the serving benchmark: inputs and their reference answers, a closed-loop load generator, the baseline.

The load generator drives an Open Inference Protocol v2 server with tritonclient from spawned
processes (sync clients in threads, one request in flight each) over gRPC, or over HTTP with
binary tensors (Triton's binary-data extension) or JSON ones, checks every response against the
in-process fused graph, and measures throughput, latency and who used the CPU.
`run_inprocess` calls the fused graph in a loop in this process: the limit a server can approach.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from processes import group_cpu_seconds, machine_busy_seconds
from tqdm import tqdm

from artefact.manifest import Manifest, load_manifest
from service.core.ensemble import create_session

FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_MNIST_SHAPE = (1, 28, 28)
OUTPUT = "probabilities"
PROTOCOLS = ("grpc", "http", "http-json")
"""How requests travel: gRPC (raw tensors), HTTP with binary data, HTTP with JSON tensors."""


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
    protocol: str = "grpc"
    request_ids: bool = False  # a unique id on every request, as callers that report labels send


# ---------------------------------------------------------------- inputs and the reference


def load_images(count: int, seed: int, shape: Sequence[int]) -> tuple[np.ndarray, str]:
    """`count` uint8 images of `shape` (the manifest's input without the batch), and where they come from.

    Fashion-MNIST's test split when the ensemble takes its 1x28x28 images and it is installed, else random pixels.
    """
    if any(size < 1 for size in shape):
        raise ValueError(f"the ensemble's input {[-1, *shape]} varies beyond the batch; the benchmark needs one shape")
    if tuple(shape) == FASHION_MNIST_SHAPE and FASHION_MNIST_TEST.exists():
        with gzip.open(FASHION_MNIST_TEST, "rb") as handle:
            data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16)
        images = data.reshape(-1, *FASHION_MNIST_SHAPE)[:count]
        return np.ascontiguousarray(images), f"Fashion-MNIST test ({len(images)} images)"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *shape), dtype=np.uint8), f"random pixels ({count} images)"


def fused_session(version_dir: Path, manifest: Manifest, threads: int = 0) -> onnxruntime.InferenceSession:
    """The fused graph on the CPU; `threads` 0 keeps onnxruntime's default, one spinning pool over the cores."""
    return create_session(version_dir / manifest.fused.file, "cpu", threads, spinning=True)


def reference_probabilities(session: onnxruntime.InferenceSession, input_name: str, images: np.ndarray) -> np.ndarray:
    """The fused graph's probabilities for `images`, which every response is checked against."""
    parts = [session.run([OUTPUT], {input_name: images[start:start + 256]})[0]
             for start in range(0, len(images), 256)]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class Workload:
    """What a serving benchmark sends and checks: the ensemble, its fused graph in this process, the images and
    their reference probabilities."""

    version_dir: Path
    manifest: Manifest
    session: onnxruntime.InferenceSession
    images: np.ndarray
    source: str
    reference: np.ndarray


def workload(args: argparse.Namespace, threads: int = 0) -> Workload:
    """The workload of a benchmark's command line (`--version-dir`, `--images`, `--seed`), announced on stdout with
    the machine and the timing (`--duration`, `--warmup`)."""
    version_dir = args.version_dir.resolve()
    manifest = load_manifest(version_dir)
    session = fused_session(version_dir, manifest, threads)
    images, source = load_images(args.images, args.seed, manifest.input.shape[1:])
    reference = reference_probabilities(session, manifest.input.name, images)
    print(f"{manifest.name} v{manifest.version}: {len(manifest.members)} members; inputs: {source}; "
          f"{os.cpu_count()} CPUs; {args.duration:g} s per scenario after {args.warmup:g} s warm-up", flush=True)
    return Workload(version_dir, manifest, session, images, source, reference)


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
            requests.append((_request(spec, images[offset:offset + spec.batch]), reference[offset:offset + spec.batch]))
        plans.append(requests)
    results.put({"ready": True})
    start, stop = control.get()

    latencies: list[list[float]] = [[] for _ in range(spec.threads)]
    errors = [0] * spec.threads
    prefix = uuid.uuid4().hex[:12]  # ids unique across processes, scenarios and runs
    samples: list[str] = []

    def loop(index: int) -> None:
        infer, close = _client(spec)
        mine, out = plans[index], latencies[index]
        position = sent = 0
        while (began := time.monotonic()) < stop:
            request, expected = mine[position]
            position = (position + 1) % len(mine)
            sent += 1
            problem = ""
            try:
                answer = infer(request, f"{prefix}-{index}-{sent}" if spec.request_ids else "")
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
        close()

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


def _request(spec: LoadSpec, pixels: np.ndarray) -> Any:
    """One request's input, serialised once (raw for gRPC and HTTP binary data, a JSON list for HTTP JSON)."""
    if spec.protocol == "grpc":
        tensor = grpcclient.InferInput(spec.input_name, list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        return tensor
    tensor = httpclient.InferInput(spec.input_name, list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=spec.protocol == "http")
    return tensor


def _client(spec: LoadSpec) -> tuple[Any, Any]:
    """(infer(request, request_id) -> the probabilities, close()) of a new client of `spec.protocol`."""
    if spec.protocol == "grpc":
        grpc_client = grpcclient.InferenceServerClient(spec.url)
        grpc_outputs = [grpcclient.InferRequestedOutput(OUTPUT)]
        return (lambda request, request_id: grpc_client.infer(
            spec.model, [request], spec.version, outputs=grpc_outputs, request_id=request_id,
            client_timeout=spec.timeout).as_numpy(OUTPUT)), grpc_client.close
    http_client = httpclient.InferenceServerClient(spec.url, network_timeout=spec.timeout)
    http_outputs = [httpclient.InferRequestedOutput(OUTPUT, binary_data=spec.protocol == "http")]
    return (lambda request, request_id: http_client.infer(spec.model, [request], spec.version, outputs=http_outputs,
                                                          request_id=request_id).as_numpy(OUTPUT)), http_client.close


def split(total: int, parts: int) -> list[int]:
    """`total` threads over at most `parts` processes, as evenly as possible, none empty."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(server: str, url: str, manifest: Manifest, scenario: Scenario, images: np.ndarray,
             reference: np.ndarray, args: argparse.Namespace, server_pgid: int, protocol: str = "grpc") -> Result:
    """Closed-loop load at `scenario` against the server at `url` (gRPC's, or HTTP's for the HTTP protocols),
    whose process group is `server_pgid`; one Result.

    `args`: serving_throughput.py's command line (client processes, warm-up, duration, tolerance, timeout, seed).
    """
    context = multiprocessing.get_context("spawn")
    results: Queue[dict[str, Any]] = context.Queue()
    controls: list[Queue[tuple[float, float]]] = []
    processes = []
    try:
        for index, threads in enumerate(split(scenario.concurrency, args.client_processes)):
            spec = LoadSpec(url, manifest.name, str(manifest.version), manifest.input.name, scenario.batch, threads,
                            args.tolerance, args.request_timeout, args.seed + index, protocol,
                            getattr(args, "request_ids", False))
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
    """Sleep until the monotonic time `until`, with a progress bar in seconds on a terminal."""
    total = max(0.0, until - time.monotonic())
    with tqdm(total=round(total, 1), desc=label, unit="s", disable=None, leave=False) as bar:
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            bar.n = round(total - max(0.0, until - time.monotonic()), 1)
            bar.refresh()


def summarise(server: str, scenario: Scenario, latencies: np.ndarray, errors: int, seconds: float) -> Result:
    """A Result from the latencies (s) of the good responses within `seconds`; the CPU columns are left at 0."""
    count = len(latencies)
    p50, p99 = (float(v) * 1e3 for v in np.percentile(latencies, [50, 99])) if count else (float("nan"),) * 2
    return Result(server, scenario.batch, scenario.concurrency, seconds, count, errors,
                  count * scenario.batch / seconds, count / seconds, p50, p99)


# ---------------------------------------------------------------- in-process


class Runner(Protocol):
    """What `run_inprocess` calls: an onnxruntime session, or anything that answers like one."""

    def run(self, output_names: list[str], input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def run_inprocess(session: Runner, manifest: Manifest, scenario: Scenario, images: np.ndarray,
                  reference: np.ndarray, args: argparse.Namespace, label: str = "inprocess") -> Result:
    """The fused graph (or another `Runner`) in a loop in this process, one call per batch: the limit."""
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
    with tqdm(total=args.duration, desc=f"{label} batch {scenario.batch}", unit="s", disable=None,
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
    result = summarise(label, Scenario(scenario.batch, 1), np.asarray(latencies), errors, elapsed)
    cpu, machine = time.process_time() - cpu, machine_busy_seconds() - machine
    result.client_cpu = cpu / elapsed
    result.other_cpu = max(0.0, machine - cpu) / elapsed
    return result
