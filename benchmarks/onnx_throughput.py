"""In-process onnxruntime throughput: the fused ensemble graph vs K member sessions.

For K = 2, 4, 8 small-CNN members on 28x28 inputs it exports the member graphs and the fused
graph exactly as `valley-train export` does (random weights: speed does not depend on them),
then prints images/s at batch 1, 8 and 64 for
- fused: one session running `ensemble.onnx` (all members, softmax, mean, uncertainty);
- K sessions: one session per member with onnxruntime's default threading, probabilities
  averaged in numpy (what a server without a fused graph does);
- K sessions, 1 thread: the same with single-threaded sessions, which avoids K spinning pools.
Ratios are against the fused graph, measured in the same process.

    python benchmarks/onnx_throughput.py [--members 2 4 8] [--batches 1 8 64] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from artefact.manifest import OUTPUTS
from artefact.uncertainty import softmax
from training.data import FASHION_MNIST
from training.engine import build_model
from training.export.graphs import FusedEnsemble, PixelClassifier, export_graph


def measure(run: Callable[[], object], batch: int, seconds: float) -> float:
    """Images per second of `run` (one batch per call), after a warm-up."""
    for _ in range(3):
        run()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        run()
        calls += 1
    return calls * batch / elapsed


def run_fused(session: onnxruntime.InferenceSession, pixels: np.ndarray) -> object:
    return session.run(["probabilities"], {"pixels": pixels})


def run_members(sessions: list[onnxruntime.InferenceSession], pixels: np.ndarray) -> np.ndarray:
    """What a server without a fused graph does: each member, then the mean of the softmaxes."""
    return np.mean([softmax(s.run(None, {"pixels": pixels})[0]) for s in sessions], axis=0)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    args = parser.parse_args()

    torch.manual_seed(0)
    info = FASHION_MNIST
    members = [build_model("cnn", info, torch.device("cpu")).eval() for _ in range(max(args.members))]
    example = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        for index, member in enumerate(members):
            export_graph(PixelClassifier(member), example, directory / f"member-{index}.onnx", ["logits"])
        for count in args.members:
            export_graph(FusedEnsemble(members[:count], 1.0), example, directory / f"fused-{count}.onnx",
                          list(OUTPUTS))
            fused = onnxruntime.InferenceSession(str(directory / f"fused-{count}.onnx"),
                                                 providers=["CPUExecutionProvider"])
            default = [onnxruntime.InferenceSession(str(directory / f"member-{i}.onnx"),
                                                    providers=["CPUExecutionProvider"]) for i in range(count)]
            single_options = onnxruntime.SessionOptions()
            single_options.intra_op_num_threads = 1
            single = [onnxruntime.InferenceSession(str(directory / f"member-{i}.onnx"), single_options,
                                                   providers=["CPUExecutionProvider"]) for i in range(count)]
            for batch in args.batches:
                pixels = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
                fused_rate = measure(partial(run_fused, fused, pixels), batch, args.seconds)
                default_rate = measure(partial(run_members, default, pixels), batch, args.seconds)
                single_rate = measure(partial(run_members, single, pixels), batch, args.seconds)
                rows.append((count, batch, fused_rate, default_rate, single_rate))
                print(f"K={count} batch={batch}: fused {fused_rate:,.0f} img/s, K sessions {default_rate:,.0f}, "
                      f"K sessions 1 thread {single_rate:,.0f}", flush=True)

    print(f"\n{date.today()}, {platform.machine()}, {os.cpu_count()} logical CPUs, onnxruntime "
          f"{onnxruntime.__version__} (CPUExecutionProvider), cnn members on 28x28 uint8 pixels\n")
    print("| K | batch | fused img/s | K sessions img/s | K sessions, 1 thread img/s | fused / K sessions |")
    print("|---|---|---|---|---|---|")
    for count, batch, fused_rate, default_rate, single_rate in rows:
        print(f"| {count} | {batch} | {fused_rate:,.0f} | {default_rate:,.0f} | {single_rate:,.0f} | "
              f"{fused_rate / default_rate:.2f}x |")


if __name__ == "__main__":
    main()
