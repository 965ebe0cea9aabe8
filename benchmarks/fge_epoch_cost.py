"""Cost of an FGE epoch relative to a base-training epoch (same model, data and process).

Alternates base epochs (per-epoch base schedule) and FGE epochs (per-iteration cyclic
schedule, with the per-step snapshot check) on the same model, and prints the median
seconds of each and their ratio. Snapshots and evaluation are excluded, as they are not
part of an epoch's training cost.

    python benchmarks/fge_epoch_cost.py --repeats 3 [--subset 20000] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from datetime import date
from pathlib import Path
from statistics import median

import torch

from training.data import load_splits, make_batches
from training.engine import build_model, make_optimizer, resolve_device, train_epoch
from training.schedules import BaseSchedule, FGECycle, Schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--subset", type=int, help="training images per epoch (default: the whole split)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each kind")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    splits = load_splits(args.dataset, args.data_dir, subset=args.subset)
    torch.manual_seed(0)
    model = build_model(args.model, splits.info, device)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
    iterations = len(make_batches(splits.train, splits.info, 128, train=True))
    base = BaseSchedule(iterations_per_epoch=iterations, lr0=0.05, budget_epochs=100)
    fge = FGECycle(iterations_per_epoch=iterations, lr1=0.01, lr2=0.001, cycle_epochs=2)
    due: list[tuple[int, int]] = []

    def snapshot_check(schedule: Schedule) -> Callable[[int, int], None]:
        """What Trainer does after every step; a due snapshot is only noted, not written."""

        def check(epoch: int, iteration: int) -> None:
            if schedule.snapshot_due(epoch, iteration):
                due.append((epoch, iteration))

        return check

    # One warm-up epoch so both kinds are timed with warm caches and allocator.
    train_epoch(model, splits, optimizer, base, 0, 0, 128, device)
    seconds: dict[str, list[float]] = {"base": [], "fge": []}
    for repeat in range(args.repeats):
        for name, schedule in (("base", base), ("fge", fge)):
            result = train_epoch(model, splits, optimizer, schedule, repeat, repeat + 1, 128, device,
                                 on_step=snapshot_check(schedule))
            seconds[name].append(result.seconds)
            print(f"{name} epoch {repeat + 1}: {result.seconds:.2f} s")
    base_s, fge_s = median(seconds["base"]), median(seconds["fge"])
    print(f"\n{date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, {args.model} on {args.dataset} ({len(splits.train)} images/epoch, {iterations} steps)")
    print(f"median base epoch {base_s:.2f} s, median FGE epoch {fge_s:.2f} s, ratio FGE/base {fge_s / base_s:.3f}")


if __name__ == "__main__":
    main()
