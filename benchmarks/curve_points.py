"""How many points to take off a curve, and where: chosen on the validation split, then read on test.

For each candidate set of t (K evenly spaced points with both endpoints, K = 2..--max-points,
and K interior points at (i + 0.5) / K, K = 1..--max-points), takes every distinct t off the
curve once (batch norm recomputed), scores the ensemble of each candidate on the validation
split, picks the one with the lowest validation NLL, and only then prints the test metrics of
every candidate next to the two endpoint networks and their ensemble.

    python benchmarks/curve_points.py runs/curve [--max-points 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artefact.manifest import Metrics
from artefact.metrics import classification_metrics
from artefact.uncertainty import softmax
from training.curve_train import open_curve
from training.curves import evenly_spaced
from training.engine import predict_logits
from training.ensembles import ensemble_probabilities


def candidates(max_points: int) -> dict[str, list[float]]:
    sets = {f"{k} evenly spaced, ends included": evenly_spaced(k) for k in range(2, max_points + 1)}
    sets.update({f"{k} interior": [(i + 0.5) / k for i in range(k)] for k in range(1, max_points + 1)})
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curve_dir", type=Path)
    parser.add_argument("--max-points", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write every candidate's metrics here")
    args = parser.parse_args()

    started = time.perf_counter()
    trained = open_curve(args.curve_dir, args.device)
    splits, device = trained.splits, trained.device
    sets = candidates(args.max_points)
    ts = sorted({round(t, 10) for points in sets.values() for t in points})
    val_p: dict[float, np.ndarray] = {}
    test_p: dict[float, np.ndarray] = {}
    for t in tqdm(ts, desc="points", unit="point"):
        network = trained.network_at(t)
        val_logits, val_labels = predict_logits(network, splits.val, splits, device)
        test_logits, test_labels = predict_logits(network, splits.test, splits, device)
        val_p[t], test_p[t] = softmax(val_logits), softmax(test_logits)

    def score(points: list[float]) -> tuple[Metrics, Metrics]:
        keys = [round(t, 10) for t in points]
        return (classification_metrics(ensemble_probabilities([val_p[k] for k in keys]), val_labels),
                classification_metrics(ensemble_probabilities([test_p[k] for k in keys]), test_labels))

    scored = {name: score(points) for name, points in sets.items()}
    chosen = min(scored, key=lambda name: scored[name][0].nll)

    # The endpoint networks as trained (their own batch-norm statistics).
    ends_val, ends_test = [], []
    for which in ("start", "end"):
        model = trained.curve.endpoint_network(which)
        ends_val.append(softmax(predict_logits(model, splits.val, splits, device)[0]))
        ends_test.append(softmax(predict_logits(model, splits.test, splits, device)[0]))
    baselines = {
        "start network alone": (classification_metrics(ends_val[0], val_labels),
                                classification_metrics(ends_test[0], test_labels)),
        "end network alone": (classification_metrics(ends_val[1], val_labels),
                              classification_metrics(ends_test[1], test_labels)),
        "endpoint ensemble (2 networks)": (classification_metrics(ensemble_probabilities(ends_val), val_labels),
                                           classification_metrics(ensemble_probabilities(ends_test), test_labels)),
    }

    print(f"\n{date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, curve {args.curve_dir} ({trained.config.curve}, {trained.config.bends} bend(s)), "
          f"{len(ts)} points in {time.perf_counter() - started:.0f} s")
    print(f"chosen on validation NLL: {chosen} (t = {', '.join(f'{t:.3f}' for t in sets[chosen])})\n")
    print("| ensemble | val NLL | test accuracy % | test NLL | test ECE % | test Brier |")
    print("|---|---|---|---|---|---|")
    for name, (val, test) in [*scored.items(), *baselines.items()]:
        mark = " (chosen)" if name == chosen else ""
        print(f"| {name}{mark} | {val.nll:.4f} | {100 * test.accuracy:.2f} | {test.nll:.4f} | {100 * test.ece:.2f} | "
              f"{test.brier:.4f} |")
    if args.json:
        payload = {"chosen": chosen, "points": sets[chosen],
                   "candidates": {name: {"t": sets.get(name), "val": val.model_dump(), "test": test.model_dump()}
                                  for name, (val, test) in [*scored.items(), *baselines.items()]}}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
