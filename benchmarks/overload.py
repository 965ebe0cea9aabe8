"""Overload: open-loop load at a multiple of valley's capacity, and what the server does with it.

Starts `valley-serve` on a repository (its own settings, or `--valley-arg` flags), measures its
capacity with a closed loop (`--concurrency` requests always in flight, `--capacity-seconds`),
then sends requests at `--multiple` times that rate for `--seconds`, on a fixed schedule that
does not wait for answers (open loop: what clients of a busy service do). Every answer is
counted by status code and timed; refused requests must be UNAVAILABLE and quick, accepted ones
correct and within the queue's wait bound; the server's resident memory and a health check are
sampled twice a second. A closed loop again afterwards shows service is back to normal.

    .venv/bin/python benchmarks/overload.py --repository runs/ensembles --model fashion-mnist-fge \\
        [--batch 32] [--multiple 8 | --rate R] [--seconds 30] [--json runs/overload.json]

Prints one summary (and writes it as JSON): capacity, offered and accepted rates, refusal and
answer latencies (p50/p99/max), codes seen, answers degraded to fewer members, RSS at
start/peak/end, the slowest health check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service._proto.inference import grpc_service_pb2 as pb  # noqa: E402
from service.launch import start_server  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Phase:
    """What one phase of load saw."""

    seconds: float
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    ok_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    details: Counter[str] = field(default_factory=Counter)
    """Why requests were refused: each detail's first words, counted."""
    degraded: int = 0
    """Answers the server cut to fewer members (their `degraded` parameter)."""

    def record(self, code: grpc.StatusCode, milliseconds: float, detail: str = "") -> None:
        self.codes[code.name] += 1
        if detail:
            self.details[" ".join(detail.split()[:8])] += 1
        (self.ok_ms if code == grpc.StatusCode.OK else self.refused_ms).append(milliseconds)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    array = np.asarray(values)
    return {"p50": round(float(np.percentile(array, 50)), 2), "p99": round(float(np.percentile(array, 99)), 2),
            "max": round(float(array.max()), 2)}


def _body(model: str, shape: list[int], batch: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (batch, *shape), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="probabilities")
    return request.SerializeToString()


async def _one(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, phase: Phase) -> None:
    started = time.perf_counter()
    detail = ""
    try:
        answer = pb.ModelInferResponse.FromString(await call(body, timeout=30))
        code = grpc.StatusCode.OK
        if "degraded" in answer.parameters and answer.parameters["degraded"].bool_param:
            phase.degraded += 1
    except grpc.aio.AioRpcError as error:
        code, detail = error.code(), str(error.details())
    phase.record(code, (time.perf_counter() - started) * 1e3, detail)


async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> Phase:
    """`concurrency` requests always in flight for `seconds`."""
    phase = Phase(seconds)
    ends = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER)

        async def worker() -> None:
            while time.monotonic() < ends:
                phase.sent += 1
                await _one(call, body, phase)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return phase


async def open_loop(url: str, body: bytes, rate: float, seconds: float, pid: int) -> tuple[Phase, dict[str, float]]:
    """Requests sent every 1/`rate` s for `seconds`, whatever happens to them; the server's RSS and health sampled."""
    phase = Phase(seconds)
    watch = {"rss_start_mb": _rss_mb(pid), "rss_peak_mb": 0.0, "health_max_ms": 0.0}
    async with grpc.aio.insecure_channel(url) as channel, grpc.aio.insecure_channel(url) as probes:
        call = channel.unary_unary(INFER)
        health = health_pb2_grpc.HealthStub(probes)
        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        next_sample = started
        with tqdm(total=int(seconds), desc=f"open loop at {rate:.0f}/s", unit="s") as progress:
            while (now := time.monotonic()) < started + seconds:
                due = int((now - started) * rate) + 1
                while phase.sent < due:
                    phase.sent += 1
                    task = asyncio.create_task(_one(call, body, phase))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if now >= next_sample:
                    next_sample += 0.5
                    watch["rss_peak_mb"] = max(watch["rss_peak_mb"], _rss_mb(pid))
                    checked = time.perf_counter()
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    watch["health_max_ms"] = max(watch["health_max_ms"], (time.perf_counter() - checked) * 1e3)
                    progress.n = int(now - started)
                    progress.refresh()
                await asyncio.sleep(max(0.0, started + phase.sent / rate - time.monotonic()))
            await asyncio.gather(*pending)
    watch["rss_end_mb"] = _rss_mb(pid)
    return phase, watch


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=32, help="images per request")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight while capacity is measured")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--multiple", type=float, default=8.0, help="offered rate as a multiple of capacity")
    parser.add_argument("--rate", type=float, help="offered requests/s instead (to compare settings at one load)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the open-loop phase")
    parser.add_argument("--after-seconds", type=float, default=3.0, help="closed loop after the overload")
    parser.add_argument("--valley-arg", action="append", default=[], help="a flag for valley-serve (repeatable)")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    args = parser.parse_args()

    manifest = json.loads(next((args.repository / args.model).glob("*/manifest.json")).read_text())
    body = _body(args.model, manifest["input"]["shape"][1:], args.batch, seed=0)
    with start_server(args.repository, *args.valley_arg, cwd=ROOT, timeout=120) as server:
        pid = server.process.pid
        asyncio.run(closed_loop(server.url, body, args.concurrency, 1.0))  # warm-up
        capacity_phase = asyncio.run(closed_loop(server.url, body, args.concurrency, args.capacity_seconds))
        capacity = capacity_phase.codes["OK"] / args.capacity_seconds
        rate = args.rate or capacity * args.multiple
        overload, watch = asyncio.run(open_loop(server.url, body, rate, args.seconds, pid))
        after = asyncio.run(closed_loop(server.url, body, args.concurrency, args.after_seconds))
    summary = {
        "batch": args.batch, "capacity_requests_per_s": round(capacity, 1),
        "capacity_ms": _percentiles(capacity_phase.ok_ms),
        "offered_requests_per_s": round(overload.sent / args.seconds, 1),
        "multiple": round(overload.sent / args.seconds / capacity, 2),
        "accepted_requests_per_s": round(overload.codes["OK"] / args.seconds, 1),
        "degraded_answers": overload.degraded,
        "codes": dict(overload.codes), "refusals": dict(overload.details.most_common(4)),
        "accepted_ms": _percentiles(overload.ok_ms),
        "refused_ms": _percentiles(overload.refused_ms), **watch,
        "after_requests_per_s": round(after.codes["OK"] / args.after_seconds, 1),
        "after_codes": dict(after.codes), "after_degraded_answers": after.degraded,
        "after_refusals": dict(after.details.most_common(4)),
        "after_ms": _percentiles(after.ok_ms),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
