"""The cost-quality frontier of anytime ensembles: members per image against test NLL and accuracy.

For one FGE (or curve, or independent) run, every member's tempered probabilities on the
validation and test splits (the temperature fitted on validation, as the exporter does), then:

- the prefix ensembles: the first N members for every image, N = 1..K, the members in the order export writes
  them (`--member-order`, best first on validation by default);
- cascades fitted on validation (`artefact.cascade.fit_cascade`) at a range of NLL tolerances with
  no bound on the lead they keep, each measured on test (the test split takes no part in any choice);
- the exporter's default: 1 % NLL, 0.1 point accuracy, and at least 90 % of the full ensemble's
  NLL and ECE lead over its best member kept;
- with `--front RUN_DIR` (an SWA or distilled run of the same data; repeatable): that network alone, and the
  same fits with it as the cascade's front (its own temperature fitted on validation), so the frontier shows
  what a better first stage buys.

It prints a table and plots test NLL against members per image (PNG).

    .venv/bin/python benchmarks/cascade_frontier.py --from runs/fm-b24-fge [--front runs/fm-b24-swa] \
        [--plot docs/images/cascade-frontier.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artefact.cascade import Cascade, fit_cascade, run_cascade
from artefact.metrics import classification_metrics
from training.calibrate import fit_temperature
from training.config import ExportConfig
from training.data import DataSplits, load_data
from training.engine import predict_logits
from training.export.fits import member_order, tempered_members
from training.export.sources import MemberSource, collect_sources
from training.front import load_front

TOLERANCES = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
DEFAULT = ExportConfig(runs=[Path(".")], name="default", repository=Path("."))


def row(label: str, members: np.ndarray, labels: np.ndarray, cascade: Cascade, front: np.ndarray | None = None
        ) -> dict[str, float | str]:
    answers, used = run_cascade(members, cascade, front)
    metrics = classification_metrics(answers, labels)
    return {"label": label, "members_per_image": float(used.mean()), "accuracy": metrics.accuracy,
            "nll": metrics.nll, "ece": metrics.ece}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="run", type=Path, required=True, help="an FGE, curve or base run directory")
    parser.add_argument("--front", dest="fronts", type=Path, action="append", default=[],
                        help="an SWA or distilled run to try as the cascade's front (repeatable)")
    parser.add_argument("--accuracy-tolerance", type=float, default=0.001)
    parser.add_argument("--member-order", choices=["best-first", "as-trained"], default="best-first",
                        help="the members' order, as `valley-train export --member-order`")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    sources = collect_sources(ExportConfig(runs=[args.run], name="frontier", repository=Path("/nonexistent")))
    splits = load_data(sources.config.data)
    val_logits, test_logits, val_labels, test_labels = _logits(sources.members, splits)
    order = member_order(val_logits, val_labels, args.member_order)  # as export writes them
    val_logits, test_logits = val_logits[:, order], test_logits[:, order]
    temperature = fit_temperature(val_logits, val_labels)
    val = tempered_members(val_logits, temperature)
    test = tempered_members(test_logits, temperature)
    count = val.shape[1]

    prefixes = [row(f"first {n}", test[:, :n], test_labels, Cascade.full(n)) for n in range(1, count + 1)]
    fitted = []
    for tolerance in tqdm(TOLERANCES, desc="fits", unit="fit", disable=None):
        fit = fit_cascade(val, val_labels, tolerance, args.accuracy_tolerance, min_gain_kept=0.0)
        measured = row(f"cascade {tolerance:.2%} {fit.cascade.stages} {fit.cascade.thresholds}", test, test_labels,
                       fit.cascade)
        measured.update({"tolerance": tolerance, "val_members_per_image": fit.quality.members_per_image,
                         "val_nll": fit.quality.nll})
        fitted.append(measured)
    default = fit_cascade(val, val_labels, DEFAULT.cascade_nll_tolerance, DEFAULT.cascade_accuracy_tolerance,
                          DEFAULT.cascade_min_gain_kept)
    exporters = row(f"the exporter's default {default.cascade.stages} {default.cascade.thresholds}", test,
                    test_labels, default.cascade)
    fronted: dict[str, list[dict[str, float | str]]] = {}
    for front_run in args.fronts:
        front = load_front(front_run, sources.config, splits)  # as export reads and measures it
        front_val, front_test = front.val, front.test
        name = f"{front.method} front"
        entries = [row(f"{name} alone (T {front.temperature:.3f})", front_test[:, None], test_labels,
                       Cascade.full(1))]
        for tolerance in tqdm(TOLERANCES, desc=f"fits, {name}", unit="fit", disable=None):
            fit = fit_cascade(val, val_labels, tolerance, args.accuracy_tolerance, min_gain_kept=0.0,
                              front_probabilities=front_val)
            measured = row(f"{name}, cascade {tolerance:.2%} {fit.cascade}", test, test_labels, fit.cascade,
                           front_test)
            measured.update({"tolerance": tolerance, "val_members_per_image": fit.quality.members_per_image,
                             "val_nll": fit.quality.nll, "front": fit.cascade.front is not None})
            entries.append(measured)
        best = fit_cascade(val, val_labels, DEFAULT.cascade_nll_tolerance, DEFAULT.cascade_accuracy_tolerance,
                           DEFAULT.cascade_min_gain_kept, front_probabilities=front_val)
        entries.append(row(f"{name}, the exporter's default {best.cascade}", test, test_labels, best.cascade,
                           front_test))
        fronted[name] = entries
    print(f"{args.run}: {count} members, temperature {temperature:.4f}, {len(val_labels)} validation and "
          f"{len(test_labels)} test images; test split:\n")
    print("| ensemble | members/image | accuracy % | NLL | ECE % |\n|---|---|---|---|---|")
    for entry in [*prefixes, *fitted, exporters, *(entry for entries in fronted.values() for entry in entries)]:
        print(f"| {entry['label']} | {entry['members_per_image']:.2f} | {100 * float(entry['accuracy']):.2f} | "
              f"{float(entry['nll']):.4f} | {100 * float(entry['ece']):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"temperature": temperature, "prefixes": prefixes, "cascades": fitted,
                                         "default": exporters, "fronts": fronted}, indent=2) + "\n")
    if args.plot:
        plot(prefixes, fitted, fronted, args.plot, f"{args.run.name}: {count} members, test split")
        print(f"\nplot: {args.plot}")


def _logits(members: list[MemberSource], splits: DataSplits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every member's validation and test logits [N, K, C], and the labels of both splits."""
    device = torch.device("cpu")
    val_logits, test_logits = [], []
    for source in tqdm(members, desc="members", unit="member", disable=None):
        model = source.build(splits)
        logits, val_labels = predict_logits(model, splits.val, splits, device)
        val_logits.append(logits)
        logits, test_labels = predict_logits(model, splits.test, splits, device)
        test_logits.append(logits)
    return np.stack(val_logits, axis=1), np.stack(test_logits, axis=1), val_labels, test_labels


def plot(prefixes: list[dict[str, float | str]], fitted: list[dict[str, float | str]],
         fronted: dict[str, list[dict[str, float | str]]], path: Path, title: str) -> None:
    from training.plots import chart, save_chart

    figure, axes = chart()
    axes.plot([float(p["members_per_image"]) for p in prefixes], [float(p["nll"]) for p in prefixes], "o-",
              label="the first N members for every image")
    axes.plot([float(f["members_per_image"]) for f in fitted], [float(f["nll"]) for f in fitted], "s--",
              label="cascades fitted on validation (NLL tolerance 0.25 % .. 10 %)")
    for name, entries in fronted.items():
        alone, cascades = entries[0], entries[1:-1]
        axes.plot([float(f["members_per_image"]) for f in cascades], [float(f["nll"]) for f in cascades], "^:",
                  label=f"cascades with the {name}")
        axes.plot([float(alone["members_per_image"])], [float(alone["nll"])], "*", markersize=10,
                  label=f"the {name} alone")
    for entry in fitted:
        axes.annotate(f"{float(entry['tolerance']):.2%}", (float(entry["members_per_image"]), float(entry["nll"])),
                      textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("members run per image (mean)")
    axes.set_ylabel("test NLL")
    save_chart(figure, axes, title, path)


if __name__ == "__main__":
    main()
