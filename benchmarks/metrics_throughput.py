"""Throughput of valley with metrics on against metrics off, in alternating runs.

Runs `benchmarks/serving_throughput.py --servers valley` with `--metrics true` and `--metrics
false` in blocks of two each, in an order shuffled within every block (seeded), so neither a
drift of the machine nor a periodic neighbour weighs on one side more than on the other, and
prints per scenario: the images/s of every run, the means, on / off, and the server's CPU
milliseconds per image. Runs where other work used more than `--max-other-cpu` cores (on a
virtual machine mostly time stolen by the host, which slows the server) are marked and left
out of the means; the medians of all runs are shown beside them.

    python benchmarks/metrics_throughput.py [--blocks 4] [--scenarios 32x4 1x16] [--duration 10] \\
        [--out runs/metrics-throughput] [-- more serving_throughput.py arguments]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from statistics import mean, median

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
BLOCK = ["true", "false", "false", "true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4, help="blocks of two runs per side")
    parser.add_argument("--seed", type=int, default=0, help="of the order within each block")
    parser.add_argument("--scenarios", nargs="+", default=["32x4", "1x16"])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-other-cpu", type=float, default=0.1, help="cores other work may use in a kept run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/metrics-throughput", help="each run's JSON and log")
    args, extra = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runs: list[tuple[str, dict[str, dict[str, float]]]] = []
    shuffle = random.Random(args.seed).sample
    order = [metrics for _ in range(args.blocks) for metrics in shuffle(BLOCK, len(BLOCK))]
    for index, metrics in enumerate(tqdm(order, desc="runs", unit="run")):
        stem = args.out / f"{index:02d}-metrics-{metrics}"
        command = [sys.executable, str(ROOT / "benchmarks/serving_throughput.py"), "--servers", "valley",
                   "--scenarios", *args.scenarios, "--duration", str(args.duration), "--json", f"{stem}.json",
                   "--valley-arg=--metrics", f"--valley-arg={metrics}", *[a for a in extra if a != "--"]]
        with open(f"{stem}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        results = json.loads(Path(f"{stem}.json").read_text())["results"]
        runs.append((metrics, {f"{r['batch']}x{r['concurrency']}": r for r in results}))

    print("| scenario | metrics | images/s per run (in order) | median, all runs | mean, kept runs | server CPU "
          "ms/image, kept runs | on / off |")
    print("|---|---|---|---:|---:|---:|---|")
    for scenario in args.scenarios:
        figures: dict[str, tuple[float, float, float]] = {}
        for metrics in ("false", "true"):
            rows = [run[scenario] for side, run in runs if side == metrics]
            kept = [row for row in rows if row["other_cpu"] <= args.max_other_cpu]
            shown = " / ".join(f"{row['images_per_s']:,.0f}" + ("" if row in kept else "*") for row in rows)
            middle = median(row["images_per_s"] for row in rows)
            throughput = mean(row["images_per_s"] for row in kept) if kept else float("nan")
            cpu = mean(row["server_cpu"] / row["images_per_s"] * 1e3 for row in kept) if kept else float("nan")
            figures[metrics] = (middle, throughput, cpu)
            ratio = ""
            if metrics == "true":
                on, off = figures["true"], figures["false"]
                ratio = (f"medians {on[0] / off[0]:.3f}x, kept means {on[1] / off[1]:.3f}x, CPU per image "
                         f"{on[2] / off[2]:.3f}x")
            side = "on" if metrics == "true" else "off"
            print(f"| {scenario} | {side} | {shown} | {middle:,.0f} | {throughput:,.0f} | {cpu:.3f} | {ratio} |")
    print(f"\n*: other work used more than {args.max_other_cpu} cores in that run; left out of the means. "
          f"Logs and JSON: {args.out}")


if __name__ == "__main__":
    main()
