"""What an ensemble costs to serve, and what it buys: throughput and test quality of ways of answering.

For one exported ensemble (8-member Fashion-MNIST FGE by default) and every way of answering,
`--configs` of:

    single      the first member alone (the best on validation, as export orders them)  (--members 1)
    front       the front network alone, for a version exported with --front             (--members front)
    full        every member, the fused graph               (--members full)
    cascade     the anytime ensemble fitted at export       (--members cascade, the server's default)
    int8-single, int8-full, int8-cascade, int8-front: the same on the manifest's INT8 variant (--precision int8)
    fp16-single, fp16-full, fp16-cascade: on its FP16 variant, CUDA only (--precision fp16 --device cuda)

it measures test accuracy, NLL and ECE and the members run per image over the whole test split
(in this process, with the server's own `service.core.ensemble` code), throughput in this process
(one loop calling the ensemble at batch 1 and 32), and throughput through `valley-serve`
(tritonclient closed loop, 1 x 16 and 32 x 4 by default; every answer is checked against this
configuration's in-process answer). It prints a table with the ratios against the single member
and the full ensemble, and plots quality against cost (test NLL vs served images/s).

    .venv/bin/python benchmarks/ensemble_cost.py --version-dir runs/ensembles/fashion-mnist-fge/1 \\
        [--configs single full cascade int8-full int8-cascade] [--duration 10] [--plot docs/images/ensemble-cost.png]

The test images are Fashion-MNIST's (the Debian package dataset-fashion-mnist), the split the
ensemble's manifest reports its test metrics on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from loadgen import Result, Scenario, run_inprocess, run_load
from processes import ROOT, serving
from tqdm import tqdm

from artefact.cascade import Cascade
from artefact.config import Precision
from artefact.manifest import Manifest, load_manifest
from artefact.metrics import classification_metrics
from service.core.batching import Segment
from service.core.ensemble import MEMBERS_USED, Ensemble, load_ensemble
from service.core.members import plan

TEST_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
CONFIGS = {  # name: (precision, the members flag)
    "single": ("fp32", "1"), "full": ("fp32", "full"), "cascade": ("fp32", "cascade"),
    "int8-single": ("int8", "1"), "int8-full": ("int8", "full"), "int8-cascade": ("int8", "cascade"),
    "fp16-single": ("fp16", "1"), "fp16-full": ("fp16", "full"), "fp16-cascade": ("fp16", "cascade"),
    "front": ("fp32", "front"), "int8-front": ("int8", "front"),
}


@dataclass
class Measured:
    config: str
    precision: str
    members: str
    accuracy: float
    nll: float
    ece: float
    members_per_image: float
    throughput: list[Result] = field(default_factory=list)

    def images_per_s(self, server: str, batch: int) -> float:
        found = [r.images_per_s for r in self.throughput if r.server == server and r.batch == batch]
        return found[0] if found else float("nan")


class Planned:
    """An ensemble answering with one plan, called like an onnxruntime session (for `run_inprocess`)."""

    def __init__(self, ensemble: Ensemble, cascade: Cascade | None) -> None:
        self.ensemble, self.cascade = ensemble, cascade

    def run(self, output_names: list[str], input_feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        pixels = next(iter(input_feed.values()))
        segments: list[Segment] = [(len(pixels), self.cascade)] if self.cascade is not None else []
        outputs = self.ensemble.run(pixels, output_names, segments).outputs
        return [outputs[name] for name in output_names]


def fashion_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images (uint8 [N, 1, 28, 28]) and labels."""
    with gzip.open(TEST_IMAGES, "rb") as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(TEST_LABELS, "rb") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return np.ascontiguousarray(images), labels


def answers(runner: Planned, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and members used for every image, 256 at a time."""
    probabilities, used = [], []
    for start in range(0, len(images), 256):
        p, u = runner.run(["probabilities", MEMBERS_USED], {"pixels": images[start:start + 256]})
        probabilities.append(p)
        used.append(u)
    return np.concatenate(probabilities), np.concatenate(used)


def measure(name: str, version_dir: Path, manifest: Manifest, images: np.ndarray, labels: np.ndarray,
            args: argparse.Namespace, log_dir: Path) -> Measured:
    precision, members = CONFIGS[name]
    ensemble = load_ensemble(version_dir, args.device, args.threads, precision=cast(Precision, precision))
    chosen = plan(manifest, members, chosen=True)
    cascade = None if chosen.cascade == Cascade.full(len(manifest.members)) else chosen.cascade
    runner = Planned(ensemble, cascade)
    probabilities, used = answers(runner, images)
    # The networks each image went through: its members, and the front network where the plan runs one.
    networks = used + (1 if chosen.cascade.front is not None else 0)
    metrics = classification_metrics(probabilities.astype(np.float64), labels)
    result = Measured(name, precision, members, metrics.accuracy, metrics.nll, metrics.ece, float(networks.mean()))
    print(f"{name}: accuracy {metrics.accuracy * 100:.2f} %, NLL {metrics.nll:.4f}, ECE {metrics.ece * 100:.2f} %, "
          f"{networks.mean():.2f} networks per image", flush=True)
    for batch in dict.fromkeys(s.batch for s in args.scenarios):
        result.throughput.append(run_inprocess(runner, manifest, Scenario(batch, 1), images, probabilities, args))
    if "server" in args.where:
        args.valley_arg = [f"--precision={precision}", f"--members={members}", f"--device={args.device}",
                           *args.extra_valley_arg]
        with serving("valley", version_dir, manifest, args, log_dir) as started:
            for scenario in args.scenarios:
                result.throughput.append(run_load("valley", started.url, manifest, scenario, images, probabilities,
                                                  args, started.pgid))
    for r in result.throughput:
        print(f"  {r.server} {r.batch}x{r.concurrency}: {r.images_per_s:,.0f} images/s, p50 {r.p50_ms:.2f} ms, "
              f"{r.errors} errors, other CPU {r.other_cpu:.2f}", flush=True)
    return result


def table(results: Sequence[Measured], scenarios: Sequence[Scenario]) -> str:
    columns = [("inprocess", s.batch, f"in process, batch {s.batch}") for s in dict.fromkeys(
        Scenario(s.batch, 1) for s in scenarios)] + [("valley", s.batch, f"server {s.batch}x{s.concurrency}")
                                                      for s in scenarios]
    columns = [c for c in columns if not all(np.isnan(r.images_per_s(c[0], c[1])) for r in results)]
    head = "| config | members/image | accuracy % | NLL | ECE % | " + " | ".join(c[2] + " images/s" for c in columns)
    lines = [head + " |", "|---" * (5 + len(columns)) + "|"]
    for r in results:
        cells = [f"{r.images_per_s(server, batch):,.0f}" for server, batch, _ in columns]
        lines.append(f"| {r.config} | {r.members_per_image:.2f} | {r.accuracy * 100:.2f} | {r.nll:.4f} | "
                     f"{r.ece * 100:.2f} | " + " | ".join(cells) + " |")
    by_name = {r.config: r for r in results}
    for baseline in ("single", "full"):
        if baseline not in by_name:
            continue
        base = by_name[baseline]
        lines += ["", f"Throughput / {baseline}'s:", "", "| config | " + " | ".join(c[2] for c in columns) + " |",
                  "|---" * (1 + len(columns)) + "|"]
        for r in results:
            ratios = [r.images_per_s(server, batch) / base.images_per_s(server, batch) for server, batch, _ in columns]
            lines.append(f"| {r.config} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    return "\n".join(lines)


def plot(results: Sequence[Measured], scenario: Scenario, path: Path, title: str) -> None:
    from training.plots import chart, save_chart

    figure, axes = chart()
    for server, marker, label in (("valley", "o", f"through valley-serve, {scenario.batch}x{scenario.concurrency}"),
                                  ("inprocess", "s", f"in process, batch {scenario.batch}")):
        xs = [r.images_per_s(server, scenario.batch) for r in results]
        ys = [r.nll for r in results]
        if all(np.isnan(xs)):
            continue
        if server == "inprocess":
            axes.scatter(xs, ys, marker=marker, label=label, facecolors="none", edgecolors="C1")
        else:
            axes.scatter(xs, ys, marker=marker, label=label, color="C0")
        if server == "valley" or all(np.isnan([r.images_per_s("valley", scenario.batch) for r in results])):
            for r, x, y in zip(results, xs, ys, strict=True):
                axes.annotate(f"{r.config} ({r.members_per_image:.2f})", (x, y), textcoords="offset points",
                              xytext=(5, 4), fontsize=8)
    by_name = {r.config: r for r in results}
    if "full" in by_name:
        axes.axhline(by_name["full"].nll * 1.01, color="grey", linestyle=":", linewidth=1)
        axes.text(0.01, by_name["full"].nll * 1.01, " the full ensemble's NLL + 1 %", fontsize=7, color="grey",
                  va="bottom", transform=axes.get_yaxis_transform())
    if "single" in by_name:
        half = by_name["single"].images_per_s("valley", scenario.batch) / 2
        if not np.isnan(half):
            axes.axvline(half, color="grey", linestyle="--", linewidth=1)
            axes.annotate("half a single member, served", (half, axes.get_ylim()[1]), textcoords="offset points",
                          xytext=(4, -12), fontsize=7, color="grey")
    axes.set_xscale("log")
    axes.set_xlabel("images/s (log scale)")
    axes.set_ylabel("test NLL (lower is better)")
    save_chart(figure, axes, title, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=ROOT / "runs/ensembles/fashion-mnist-fge/1")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        default=["single", "full", "cascade", "int8-single", "int8-full", "int8-cascade"],
                        help="INT8 and FP16 configurations are skipped when the manifest has no such variant")
    parser.add_argument("--scenarios", nargs="+", default=["1x16", "32x4"], help="BATCHxCONCURRENCY through the server")
    parser.add_argument("--where", nargs="+", choices=["inprocess", "server"], default=["inprocess", "server"])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per throughput cell")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads in process (0: cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="onnxruntime's provider, in process and in the server (cuda fails unless it loads)")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |p - in-process answer| a served answer may have (an image near a cascade "
                             "threshold can leave at another stage when a batch's arithmetic differs in the last bit)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valley-python", default=sys.executable)
    parser.add_argument("--valley-arg", dest="extra_valley_arg", action="append", default=[],
                        help="another flag for valley-serve (repeatable)")
    parser.add_argument("--start-attempts", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--stop-timeout", type=float, default=15.0)
    parser.add_argument("--plot", type=Path, help="write the quality-vs-cost plot (PNG) here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--from-json", type=Path, help="measure nothing: print the table and draw the plot of "
                        "results written before with --json")
    args = parser.parse_args()
    args.scenarios = [Scenario(*(int(x) for x in text.lower().split("x"))) for text in args.scenarios]
    args.valley_repository = None
    return args


def main() -> None:
    args = parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results = [Measured(**{**r, "throughput": [Result(**t) for t in r["throughput"]]}) for r in saved["results"]]
        print(table(results, args.scenarios))
        if args.plot:
            plot(results, args.scenarios[-1], args.plot, f"{saved['ensemble']} v{saved['version']}: test NLL "
                                                         "against throughput")
        return
    version_dir = args.version_dir.resolve()
    manifest = load_manifest(version_dir)
    images, labels = fashion_mnist_test()
    configs = [name for name in args.configs if CONFIGS[name][0] == "fp32" or manifest.variant(CONFIGS[name][0])]
    skipped = sorted(set(args.configs) - set(configs))
    print(f"{manifest.name} v{manifest.version}: {len(manifest.members)} members, cascade "
          f"{manifest.cascade.stages if manifest.cascade else 'none'} "
          f"{manifest.cascade.thresholds if manifest.cascade else ''}; {len(images)} test images; {os.cpu_count()} "
          f"CPUs{'; skipped (no variant): ' + ', '.join(skipped) if skipped else ''}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="ensemble-cost-") as folder:
        for name in tqdm(configs, desc="configurations", unit="config", disable=None):
            results.append(measure(name, version_dir, manifest, images, labels, args, Path(folder)))
    print()
    print(table(results, args.scenarios))
    if args.plot:
        scenario = args.scenarios[-1]
        plot(results, scenario, args.plot, f"{manifest.name} v{manifest.version} ({len(manifest.members)} members): "
                                           "test NLL against throughput")
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"ensemble": manifest.name, "version": manifest.version,
                                         "results": [asdict(r) for r in results]}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
