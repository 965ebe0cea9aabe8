"""Member-stacked execution: K same-architecture members as one network, against the fused graph.

The fused graph (`ensemble.onnx`, `training.export.FusedEnsemble`) runs its K members one after
another. The stacked network computes the same K member logits with K times wider layers:
the first convolution has K*out channels on the shared input, later convolutions have
`groups=K`, batch norm is folded into the convolution or linear layer before it (eval mode),
and the linear layers are batched matrix products over [K, B, F]. Both graphs are exported with
uint8 pixels in and the fused graph's outputs, checked against each other and PyTorch, and timed
in onnxruntime sessions configured as the server configures them (default intra-op threads,
no spinning), alternating the two in one process; the table shows medians of the repeats and
the median of the paired stacked/fused ratios.

Members have random weights (speed does not depend on them), or come from an FGE run:

    python benchmarks/stacked_members.py [--members 2 4 8] [--batches 1 8 32 64] [--repeats 8]
        [--seconds 0.3] [--from RUN] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnx_throughput import measure
from torch import nn

from artefact.manifest import OUTPUTS
from training.config import ExportConfig
from training.data import FASHION_MNIST, DatasetInfo, load_data
from training.engine import build_model
from training.export.graphs import FusedEnsemble, ensemble_outputs_of, export_graph
from training.export.sources import collect_sources
from training.runs import RunDir
from training.stacking import StackedMembers, stack_members

LOGIT_TOLERANCE = 1e-4
# Not 1, so that the parity check also sees the division by the temperature.
TEMPERATURE = 1.3
PARITY_IMAGES = 64


class StackedFusedEnsemble(nn.Module):
    """`FusedEnsemble`'s inputs and outputs (same names, order and formulas), with the members stacked."""

    temperature: torch.Tensor

    def __init__(self, stacked: StackedMembers, temperature: float) -> None:
        super().__init__()
        self.stacked = stacked
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The members stacked, then FusedEnsemble's own outputs; the parity check compares every output with it.
        return ensemble_outputs_of(self.stacked(pixels.float() / 255.0), self.temperature)


def random_members(count: int) -> list[nn.Module]:
    """`count` default cnn members for Fashion-MNIST with random weights and non-trivial batch-norm statistics."""
    members: list[nn.Module] = []
    for _ in range(count):
        member = build_model("cnn", FASHION_MNIST, torch.device("cpu"))
        with torch.no_grad():
            for module in member.modules():
                if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                    # Freshly built norms are the identity; these make a wrong fold show up in the logits.
                    module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                    module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
        members.append(member.eval())
    return members


def run_members(run: Path, count: int) -> tuple[list[nn.Module], DatasetInfo]:
    """The first `count` snapshots of an FGE run, built as `valley-train export` builds them, and their images."""
    if not RunDir(run).is_fge:
        raise SystemExit(f"{run} is not an FGE run directory (valley-train fge --out): --from takes one")
    sources = collect_sources(ExportConfig(runs=[run], name="stacked-benchmark", repository=Path(".")))
    if len(sources.members) < count:
        raise SystemExit(f"{run} has {len(sources.members)} snapshots, fewer than --members {count}")
    splits = load_data(sources.config.data)
    return [source.build(splits).eval() for source in sources.members[:count]], splits.info


def check_agreement(name: str, expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """The largest difference between two sets of outputs; raises past `LOGIT_TOLERANCE`."""
    difference = max(float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64))))
                     for e, a in zip(expected, actual, strict=True))
    if not difference < LOGIT_TOLERANCE:
        raise AssertionError(f"{name}: outputs differ by {difference:.3g} (>= {LOGIT_TOLERANCE})")
    return difference


@dataclass
class Cell:
    """One K and batch size: images/s of each graph per repeat, and the paired ratios."""

    members: int
    batch: int
    fused: list[float]
    stacked: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(s / f for s, f in zip(self.stacked, self.fused, strict=True))


def run_probabilities(session: onnxruntime.InferenceSession, pixels: np.ndarray) -> object:
    return session.run(["probabilities"], {"pixels": pixels})


def open_session(path: Path, device: str) -> onnxruntime.InferenceSession:
    """A session as the server opens one (`service.core.ensemble.create_session`): default intra-op threads that sleep
    between runs; on CUDA only when asked, and then it must load."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise SystemExit(f"--device {device}: onnxruntime's {providers[0]} did not load (no GPU, or CUDA libraries "
                         "missing)")
    return session


def export_pair(members: list[nn.Module], directory: Path, example: torch.Tensor,
                pixels: np.ndarray, device: str) -> tuple[onnxruntime.InferenceSession, onnxruntime.InferenceSession]:
    """Both graphs for `members`, exported, checked against PyTorch and each other, and opened as the server does."""
    count = len(members)
    fused = FusedEnsemble(members, TEMPERATURE).eval()
    stacked = StackedFusedEnsemble(stack_members(members), TEMPERATURE).eval()
    images = torch.from_numpy(pixels).float() / 255.0
    with torch.no_grad():
        member_logits = torch.stack([member(images) for member in members], dim=1)
        logit_gap = check_agreement(f"K={count} stacked logits in torch", [member_logits.numpy()],
                                    [stacked.stacked(images).numpy()])
        expected = [output.numpy() for output in fused(torch.from_numpy(pixels))]
    fused_path, stacked_path = directory / f"fused-{count}.onnx", directory / f"stacked-{count}.onnx"
    export_graph(fused, example, fused_path, list(OUTPUTS))
    export_graph(stacked, example, stacked_path, list(OUTPUTS))
    fused_session = open_session(fused_path, device)
    stacked_session = open_session(stacked_path, device)
    fused_outputs = fused_session.run(None, {"pixels": pixels})
    stacked_outputs = stacked_session.run(None, {"pixels": pixels})
    onnx_gap = max(check_agreement(f"K={count} fused.onnx vs torch", expected, fused_outputs),
                   check_agreement(f"K={count} stacked.onnx vs torch", expected, stacked_outputs),
                   check_agreement(f"K={count} stacked.onnx vs fused.onnx", fused_outputs, stacked_outputs))
    print(f"K={count}: stacked logits match the members' within {logit_gap:.1e} in torch; every ONNX output "
          f"within {onnx_gap:.1e} ({fused_session.get_providers()[0]})", flush=True)
    return fused_session, stacked_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=8, help="alternating measurements of each graph per cell")
    parser.add_argument("--seconds", type=float, default=0.3, help="measuring time per graph and repeat")
    parser.add_argument("--from", dest="run", type=Path, help="an FGE run directory: its first K snapshots")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="onnxruntime provider; cuda fails loudly where it does not load")
    args = parser.parse_args()

    torch.manual_seed(0)
    largest = max(args.members)
    members, info = run_members(args.run, largest) if args.run is not None else (random_members(largest),
                                                                                  FASHION_MNIST)
    image = (info.in_channels, info.image_size, info.image_size)
    rng = np.random.default_rng(0)
    parity_pixels = rng.integers(0, 256, (PARITY_IMAGES, *image), dtype=np.uint8)
    example = torch.from_numpy(parity_pixels[:2])
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.members:
            fused, stacked = export_pair(members[:count], Path(folder), example, parity_pixels, args.device)
            for batch in args.batches:
                pixels = rng.integers(0, 256, (batch, *image), dtype=np.uint8)
                cell = Cell(count, batch, [], [])
                timed = [(fused, cell.fused), (stacked, cell.stacked)]
                for repeat in range(args.repeats):
                    # Each graph goes first every other repeat, so a drifting background load favours neither.
                    for session, rates in timed if repeat % 2 == 0 else timed[::-1]:
                        rates.append(measure(partial(run_probabilities, session, pixels), batch, args.seconds))
                cells.append(cell)
                print(f"K={count} batch={batch}: fused {statistics.median(cell.fused):,.0f} img/s, stacked "
                      f"{statistics.median(cell.stacked):,.0f} img/s, stacked/fused {cell.ratio:.2f}", flush=True)

    source = f"FGE run {args.run}" if args.run is not None else "random-weight cnn members"
    print(f"\n{date.today()}, {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__} ({args.device}, no spinning), {source}, "
          f"{'x'.join(map(str, image))} uint8 pixels, medians of {args.repeats} alternating {args.seconds} s "
          "measurements\n")
    print("| K | batch | fused img/s | stacked img/s | stacked / fused |")
    print("|---|---|---|---|---|")
    for cell in cells:
        print(f"| {cell.members} | {cell.batch} | {statistics.median(cell.fused):,.0f} | "
              f"{statistics.median(cell.stacked):,.0f} | {cell.ratio:.2f}x |")


if __name__ == "__main__":
    main()
