"""Serving throughput: one ensemble served by valley, by Triton through PyTriton, and in-process.

Each server runs as a subprocess, alone on the machine while it is measured; a closed-loop load
generator (tritonclient gRPC, `--client-processes` processes with sync clients in threads,
`concurrency` requests always in flight) drives it for `--duration` seconds per scenario after
`--warmup` seconds. Every response is checked: `probabilities` must match the in-process fused
graph's for the same images within `--tolerance`, or it counts as an error. The in-process row is
the fused graph (`manifest.fused`) called in a loop at the scenario's batch size in this process:
the limit a server can approach. Inputs are Fashion-MNIST test images when the ensemble takes
1x28x28 images and the dataset is installed, else random pixels of the manifest's input shape.
The load generator is `loadgen.py`, the server processes and their CPU accounting `processes.py`.

    .venv/bin/python benchmarks/serving_throughput.py [--version-dir runs/ensembles/fashion-mnist/1] \\
        [--scenarios 1x16 32x4 | --batch-size 1 32 --concurrency 4 16] [--duration 10] \\
        [--servers valley,pytriton,inprocess] [--json results.json]

PyTriton runs `benchmarks/pytriton_ensemble.py` with `--pytriton-python` (default
`.venv-pytriton/bin/python`), a venv made from Debian's own python3.11:

    /usr/bin/python3.11 -m venv .venv-pytriton && .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime numpy

valley runs `python -m service.cli --repository REPO --grpc-port 0 --metrics-port 0 --ready-file F
[--valley-arg ...]` (`service.launch.start_server`): the kernel picks free ports when the server
binds them, and the server writes them to F once its ensembles are loaded, so no port is guessed.
REPO is a temporary repository holding only `<name>/<version>`, a link to the measured version
(`--valley-repository` to serve another). Requests name the version. PyTriton cannot report its
ports, so it gets ports that were free a moment before; a failed start of either server is tried
again (`--start-attempts`). Servers get SIGINT, then SIGKILL after `--stop-timeout` seconds; their
whole process group goes, also when this script fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from loadgen import Result, Scenario, run_inprocess, run_load, workload
from processes import ROOT, serving

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
    parser.add_argument("--request-ids", action="store_true",
                        help="a unique id on every request (what a caller that reports labels sends; valley keeps "
                        "the served predictions of such requests in its feedback store)")
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
    if args.start_attempts < 1:
        parser.error("--start-attempts must be at least 1")
    # Every member answers every image, as in Triton and in process: the like-for-like comparison (valley's default
    # is the cheaper cascade, which benchmarks/ensemble_cost.py measures).
    if not any(arg.startswith("--members") for arg in args.valley_arg):
        args.valley_arg = ["--members=full", *args.valley_arg]
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
    work = workload(args, args.inprocess_threads)
    version_dir, manifest, session, images, source, reference = (work.version_dir, work.manifest, work.session,
                                                                  work.images, work.source, work.reference)

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
            with serving(server, version_dir, manifest, args, log_dir) as started:
                for scenario in args.scenarios:
                    results.append(run_load(server, started.url, manifest, scenario, images, reference, args,
                                            started.pgid))
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
