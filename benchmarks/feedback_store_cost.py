"""What the feedback store costs in throughput: memory, the embedded SQLite file and PostgreSQL, in alternating runs.

Every request carries an id, so every served prediction goes to the store (ensemble and member probabilities,
members used). Runs `benchmarks/serving_throughput.py --servers valley --request-ids` with `--feedback-store
memory:`, `sqlite:` (a fresh file per run) and `postgresql://` (a fresh database per run, on a throwaway
PostgreSQL cluster started here with fsync on, as Debian's package installs it: `tests/postgres.py`, or
`--postgres URL` for one of yours), in blocks of one run each, the order shuffled within every block (seeded).
Prints per scenario and store: the images/s of every run, median and mean, the ratio to memory, the server's CPU
milliseconds per image, and PostgreSQL's own CPU per image (its processes, the whole run with the warm-up, so a
little high). After each run it counts the predictions the database holds, to show they were written.

    python benchmarks/feedback_store_cost.py [--blocks 3] [--scenarios 32x4 1x16] [--duration 10] \\
        [--version-dir runs/ensembles/fashion-mnist-fge/4] [--out runs/feedback-store-cost] [-- more arguments]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean, median
from urllib.parse import urlsplit

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.postgres import PostgresServer  # noqa: E402  (a throwaway cluster, as the tests start)

STORES = ("memory", "sqlite", "postgresql")
TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid`, its exited children (reaped) and its live children: a PostgreSQL server's whole work."""
    def fields(process: int) -> list[str]:
        with open(f"/proc/{process}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()

    own = fields(pid)
    total = sum(int(value) for value in own[11:15])  # utime, stime, cutime, cstime
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                child = fields(int(entry))
            except OSError:
                continue
            if int(child[1]) == pid:
                total += int(child[11]) + int(child[12])
    return total / TICKS


def predictions_in(store: str, url: str) -> int:
    """Served predictions the store holds."""
    if store == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:")) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM valley_predictions").fetchone()[0])
    import psycopg

    with psycopg.connect(url) as connection:
        row = connection.execute("SELECT COUNT(*) FROM valley_predictions").fetchone()
        return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3, help="blocks of one run per store")
    parser.add_argument("--seed", type=int, default=0, help="of the order within each block")
    parser.add_argument("--scenarios", nargs="+", default=["32x4", "1x16"])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--version-dir", type=Path, default=ROOT / "runs/ensembles/fashion-mnist-fge/4")
    parser.add_argument("--postgres", help="a PostgreSQL URL whose user may create databases (default: a "
                        "throwaway cluster started here)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/feedback-store-cost", help="each run's JSON and log")
    args, extra = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.version_dir / "manifest.json").is_file():
        parser.error(f"{args.version_dir} holds no manifest.json: give --version-dir of an exported ensemble version")

    server = None if args.postgres else PostgresServer(durable=True)
    scratch = Path(tempfile.mkdtemp(prefix="feedback-store-cost-"))
    runs: list[tuple[str, dict[str, dict[str, float]], float, int]] = []
    try:
        shuffle = random.Random(args.seed).sample
        order = [store for _ in range(args.blocks) for store in shuffle(STORES, len(STORES))]
        for index, store in enumerate(tqdm(order, desc="runs", unit="run")):
            stem = args.out / f"{index:02d}-{store}"
            if store == "memory":
                url = "memory:"
            elif store == "sqlite":
                url = f"sqlite:{scratch / f'{index:02d}.sqlite3'}"
            elif server is not None:
                url = server.database()
            else:
                url = _new_database(args.postgres, f"valley_cost_{os.getpid()}_{index}")
            command = [sys.executable, str(ROOT / "benchmarks/serving_throughput.py"), "--servers", "valley",
                       "--request-ids", "--version-dir", str(args.version_dir), "--scenarios", *args.scenarios,
                       "--duration", str(args.duration), "--json", f"{stem}.json",
                       f"--valley-arg=--feedback-store={url}", *[a for a in extra if a != "--"]]
            database_cpu = process_tree_cpu_seconds(server.pid()) if server is not None and store == "postgresql" else 0
            with open(f"{stem}.log", "w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            if server is not None and store == "postgresql":
                database_cpu = process_tree_cpu_seconds(server.pid()) - database_cpu
            kept = 0 if store == "memory" else predictions_in(store, url)
            results = json.loads(Path(f"{stem}.json").read_text())["results"]
            runs.append((store, {f"{r['batch']}x{r['concurrency']}": r for r in results}, database_cpu, kept))
    finally:
        if server is not None:
            server.close()

    print(f"{args.version_dir}, every request with an id; {args.blocks} runs per store, {args.duration:g} s each\n")
    print("| scenario | store | images/s per run (in order) | median | mean | / memory (medians, means) "
          "| server CPU ms/image | database CPU ms/image |")
    print("|---|---|---|---:|---:|---|---:|---:|")
    for scenario in args.scenarios:
        baseline: tuple[float, float] | None = None
        for store in STORES:
            rows = [(run[scenario], cpu, sum(r["images_per_s"] for r in run.values()))
                    for side, run, cpu, _ in runs if side == store]
            speeds = [row["images_per_s"] for row, _, _ in rows]
            middle, average = median(speeds), mean(speeds)
            baseline = baseline or (middle, average)
            ratio = f"{middle / baseline[0]:.3f}x, {average / baseline[1]:.3f}x" if store != "memory" else ""
            cpu = mean(row["server_cpu"] / row["images_per_s"] * 1e3 for row, _, _ in rows)
            # The database's CPU over a whole run, shared out over the run's images (every scenario's).
            database = (f"{mean(seconds / (all_speeds * args.duration) * 1e3 for _, seconds, all_speeds in rows):.3f}"
                        if store == "postgresql" and server is not None else "-")
            shown = " / ".join(f"{speed:,.0f}" for speed in speeds)
            print(f"| {scenario} | {store} | {shown} | {middle:,.0f} | {average:,.0f} | {ratio} | {cpu:.3f} "
                  f"| {database} |")
    errors = sum(int(result["errors"]) for _, run, _, _ in runs for result in run.values())
    held = ", ".join(f"{store} {count:,}" for store, _, _, count in runs if store != "memory")
    print(f"\nfailed requests: {errors}; predictions in the store after each run: {held}. Logs and JSON: {args.out}")


def _new_database(url: str, name: str) -> str:
    """A new database beside the one `url` names, and its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return urlsplit(url)._replace(path=f"/{name}").geturl()


if __name__ == "__main__":
    main()
