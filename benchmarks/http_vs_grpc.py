"""HTTP/REST against gRPC: throughput and latency of one valley server, the same ensemble, three ways to call it.

One valley-serve process serves the ensemble; the closed-loop load generator of the serving
benchmark (`loadgen.py`: tritonclient in spawned processes, sync clients in threads, every
response checked against the in-process fused graph) drives it, scenario by scenario, over

- `grpc`: tritonclient.grpc, raw tensors (the baseline every ratio is taken against),
- `http`: tritonclient.http with binary tensors (Triton's binary-data extension),
- `http-json`: tritonclient.http with JSON tensors (what curl and KServe's JSON clients send).

The three run against the same server process, one after another, each after a warm-up, so the
ratios compare the transports and not two servers. With `--servers valley,pytriton` the same
three run against Triton (through PyTriton, `benchmarks/pytriton_ensemble.py`, from
`--pytriton-python`'s venv as in `serving_throughput.py`) too, and valley / Triton ratios follow.

    .venv/bin/python benchmarks/http_vs_grpc.py [--version-dir runs/ensembles/fashion-mnist-fge/3] \\
        [--scenarios 1x1 1x16 32x4] [--duration 10] [--json runs/http-vs-grpc.json] \\
        [--plot docs/images/http-vs-grpc.png]
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

from loadgen import PROTOCOLS, Result, Scenario, run_load, workload
from processes import ROOT, serving
from serving_throughput import _interrupt, parse_scenario

from training.plots import chart, save_chart


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=ROOT / "runs/ensembles/fashion-mnist-fge/3")
    parser.add_argument("--scenarios", type=parse_scenario, nargs="+",
                        default=[Scenario(1, 1), Scenario(1, 16), Scenario(32, 4)],
                        help="BATCHxCONCURRENCY pairs (default 1x1 1x16 32x4)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"of {', '.join(PROTOCOLS)}")
    parser.add_argument("--servers", default="valley", help="valley, and pytriton for Triton")
    parser.add_argument("--pytriton-python", default=str(ROOT / ".venv-pytriton/bin/python"))
    parser.add_argument("--pytriton-max-batch-size", type=int, default=64)
    parser.add_argument("--pytriton-max-queue-delay-us", type=int, default=0)
    parser.add_argument("--pytriton-arg", action="append", default=[])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before each scenario")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |p - reference| a response may have")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valley-python", default=sys.executable)
    parser.add_argument("--valley-arg", action="append", default=[], help="extra flag for valley's CLI (repeatable)")
    parser.add_argument("--valley-repository", type=Path)
    parser.add_argument("--start-attempts", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--stop-timeout", type=float, default=15.0)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="draw images/s and p50 latency per scenario and protocol here")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot from a --json of an earlier run")
    args = parser.parse_args()
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        parser.error(f"--protocols takes {', '.join(PROTOCOLS)}")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - {"valley", "pytriton"}:
        parser.error("--servers takes valley and pytriton")
    if not any(arg.startswith("--members") for arg in args.valley_arg):  # every member answers: the same work
        args.valley_arg = ["--members=full", *args.valley_arg]
    return args


def ratio(result: Result, baseline: Result | None, field: str) -> str:
    if baseline is None or not getattr(baseline, field):
        return "-"
    return f"{getattr(result, field) / getattr(baseline, field):.2f}x"


def _find(results: list[Result], label: str, r: Result) -> Result | None:
    return next((b for b in results if b.server == label and (b.batch, b.concurrency) == (r.batch, r.concurrency)),
                None)


def markdown(results: list[Result]) -> str:
    """Rows labelled "SERVER PROTOCOL": each against its server's gRPC row, and valley's against Triton's."""
    lines = ["| server | protocol | batch | concurrency | images/s | p50 ms | p99 ms | errors | client CPU "
             "| server CPU | images/s vs its gRPC | images/s vs Triton's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        server, _, protocol = r.server.partition(" ")
        triton = _find(results, f"pytriton {protocol}", r) if server == "valley" else None
        lines.append(f"| {server} | {protocol} | {r.batch} | {r.concurrency} | {r.images_per_s:,.0f} "
                     f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.client_cpu:.2f} | {r.server_cpu:.2f} "
                     f"| {ratio(r, _find(results, f'{server} grpc', r), 'images_per_s')} "
                     f"| {ratio(r, triton, 'images_per_s')} |")
    busy = [r for r in results if r.other_cpu > 0.2]
    if busy:
        lines.append(f"\nWARNING: other work used up to {max(r.other_cpu for r in busy):.2f} cores: rerun on a quiet "
                     "machine.")
    return "\n".join(lines)


def plot(results: list[Result], scenarios: list[Scenario], path: Path) -> None:
    labels = list(dict.fromkeys(r.server for r in results))
    figure, axes = chart()
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        found = {(r.batch, r.concurrency): r for r in results if r.server == label}
        values = [found[(s.batch, s.concurrency)].images_per_s if (s.batch, s.concurrency) in found else 0
                  for s in scenarios]
        positions = [i + (index - (len(labels) - 1) / 2) * width for i in range(len(scenarios))]
        bars = axes.bar(positions, values, width, label=label)
        for bar, scenario in zip(bars, scenarios, strict=True):
            key = (scenario.batch, scenario.concurrency)
            if key in found:
                axes.annotate(f"{found[key].p50_ms:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=6 if len(labels) > 3 else 6.5)
    axes.set_xticks(range(len(scenarios)), [f"batch {s.batch}\n{s.concurrency} in flight" for s in scenarios],
                    fontsize=8)
    axes.set_ylabel("images/s (p50 latency in ms on the bars)")
    servers = " and Triton (PyTriton)" if any(label.startswith("pytriton") for label in labels) else ""
    save_chart(figure, axes, f"valley{servers} over gRPC and HTTP/REST: the same ensemble", path)


def main() -> None:
    args = parse_args()
    if args.replot:
        if not args.plot:
            raise SystemExit("--replot needs --plot")
        earlier = [Result(**r) for r in json.loads(args.replot.read_text())["results"]]
        scenarios = list(dict.fromkeys(Scenario(r.batch, r.concurrency) for r in earlier))
        plot(earlier, scenarios, args.plot)
        print(markdown(earlier))
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    work = workload(args)
    version_dir, manifest, images, source, reference = (work.version_dir, work.manifest, work.images, work.source,
                                                        work.reference)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        log_dir = (args.log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="http-")))).resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        for server in args.servers:
            with serving(server, version_dir, manifest, args, log_dir) as started:
                for scenario in args.scenarios:
                    for protocol in args.protocols:
                        url = started.url if protocol == "grpc" else started.http_url
                        result = run_load(f"{server} {protocol}", url, manifest, scenario, images, reference, args,
                                          started.pgid, protocol)
                        results.append(result)
                        print(f"  {result.server} batch {scenario.batch} x {scenario.concurrency}: "
                              f"{result.images_per_s:,.0f} images/s, p50 {result.p50_ms:.2f} ms, p99 "
                              f"{result.p99_ms:.2f} ms, {result.errors} errors", flush=True)
    print()
    print(markdown(results))
    for result in results:
        for sample in result.error_samples:
            print(f"{result.server} batch {result.batch} x {result.concurrency}: {sample}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ensemble": manifest.name, "version": manifest.version, "inputs": source,
                                         "cpus": os.cpu_count(), "duration": args.duration,
                                         "results": [asdict(r) for r in results]}, indent=2) + "\n")
    if args.plot:
        plot(results, args.scenarios, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
