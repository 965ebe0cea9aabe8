"""What a curve costs: a curve-training epoch against a base-training epoch, and a batch-norm
recomputation at one point against a forward pass over the training data (same model, data, process).

Alternates base epochs and curve epochs (one t per batch, weights at t through
`torch.func.functional_call`, the L2 penalty on w(t)) on the same data, then times, at one t,
the batch-norm recomputation (`training.curves.recompute_batch_norm` over the training split)
next to a plain forward pass over the same images at the same batch size, in evaluation mode
and in training mode without gradients. Prints the medians and the ratios.

    python benchmarks/curve_cost.py --repeats 3 [--subset 20000] [--bends 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path
from statistics import median

import torch

from training.curve_train import batch_norm_batches
from training.curves import Curve, recompute_batch_norm
from training.data import load_splits, make_batches
from training.engine import build_model, make_optimizer, resolve_device, train_epoch
from training.schedules import BaseSchedule

BATCH = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--subset", type=int, help="training images per epoch (default: the whole split)")
    parser.add_argument("--curve", choices=["bezier", "polychain"], default="bezier")
    parser.add_argument("--bends", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each kind, and passes of each kind")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    splits = load_splits(args.dataset, args.data_dir, subset=args.subset)
    torch.manual_seed(0)
    model = build_model(args.model, splits.info, device)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
    iterations = len(make_batches(splits.train, splits.info, BATCH, train=True))
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=0.05, budget_epochs=100)
    ends = [build_model(args.model, splits.info, device).state_dict() for _ in range(2)]
    curve = Curve(build_model(args.model, splits.info, device), ends[0], ends[1], args.curve, args.bends)
    curve_optimizer = torch.optim.SGD(curve.bend_parameters(), lr=0.03, momentum=0.9, weight_decay=0.0)

    def penalty() -> torch.Tensor:
        assert curve.last_l2 is not None
        return 0.5 * 5e-4 * curve.last_l2

    # One warm-up epoch of each kind, so both are timed with warm caches and allocator.
    train_epoch(model, splits, optimizer, schedule, 0, 0, BATCH, device)
    train_epoch(curve, splits, curve_optimizer, schedule, 0, 0, BATCH, device, penalty=penalty)
    seconds: dict[str, list[float]] = {"base epoch": [], "curve epoch": [], "batch-norm recomputation": [],
                                       "forward pass, eval mode": [], "forward pass, train mode": []}
    for repeat in range(args.repeats):
        base = train_epoch(model, splits, optimizer, schedule, repeat, repeat + 1, BATCH, device)
        on_curve = train_epoch(curve, splits, curve_optimizer, schedule, repeat, repeat + 1, BATCH, device,
                               penalty=penalty)
        seconds["base epoch"].append(base.seconds)
        seconds["curve epoch"].append(on_curve.seconds)
        print(f"epochs {repeat + 1}: base {base.seconds:.2f} s, curve {on_curve.seconds:.2f} s")

    network = curve.network_at(0.5)
    for repeat in range(args.repeats):
        started = time.perf_counter()
        images = recompute_batch_norm(network, batch_norm_batches(splits, BATCH, device))
        seconds["batch-norm recomputation"].append(time.perf_counter() - started)
        for mode, training in (("eval", False), ("train", True)):
            network.train(training)
            started = time.perf_counter()
            with torch.no_grad():
                for batch in batch_norm_batches(splits, BATCH, device):
                    network(batch)
            seconds[f"forward pass, {mode} mode"].append(time.perf_counter() - started)
        print(f"passes {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in list(seconds.items())[2:]))

    medians = {name: median(values) for name, values in seconds.items()}
    print(f"\n{date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, {args.model} on {args.dataset} ({len(splits.train)} training images, {iterations} "
          f"steps of {BATCH}), {args.curve} curve with {args.bends} bend(s); batch norm over {images} images")
    for name, value in medians.items():
        print(f"median {name:<26} {value:7.2f} s")
    print(f"ratio curve epoch / base epoch                      {medians['curve epoch'] / medians['base epoch']:.3f}")
    for mode in ("eval", "train"):
        ratio = medians["batch-norm recomputation"] / medians[f"forward pass, {mode} mode"]
        print(f"ratio batch-norm recomputation / forward pass ({mode} mode) {ratio:.3f}")


if __name__ == "__main__":
    main()
