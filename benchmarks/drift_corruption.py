"""How the drift score answers corrupted inputs: windows of Fashion-MNIST test images, clean and corrupted.

Loads an exported ensemble as the server does, answers the 10000 test images clean and under
every corruption of `training.corruptions` at severities 1..5, and scores windows of the
baseline's window size (drawn from the test images with a seed, the same draws for every
condition) against the manifest's drift baseline, as the server scores its last answers. A
manifest without a drift field, or with one in the fixed bins of older exports, gets the
baseline export writes now: fitted on the validation answers of the member graphs at the
manifest's temperature.

It prints a markdown table (mean score, and the fraction of windows above the clean level), how
far clean windows reach in multiples of the clean level, and the fraction of windows above an
alert level of `--alert-multiple` clean levels; `--plot` draws the scores against severity.

    .venv/bin/python benchmarks/drift_corruption.py --version-dir runs/ensembles/fashion-mnist-fge/2 \\
        --plot docs/images/drift-corruption.png --json runs/drift-corruption.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from artefact.drift import Baseline, drift_score
from artefact.manifest import DriftBaseline
from service.core.ensemble import Ensemble, load_ensemble
from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from training.data import load_splits
from training.export.fits import fit_drift_baseline
from training.export.sources import split_labels
from training.export.variants import onnx_member_logits

log = logging.getLogger("drift_corruption")

SIGNALS = ["confidence", "entropy", "mutual_information", "predicted_class"]
BATCH = 1000


def baseline_of(ensemble: Ensemble, data_dir: Path | None) -> tuple[Baseline, str]:
    """The manifest's drift baseline, or the one export fits now where the manifest has none or one with the old
    fixed bins; and where it came from."""
    manifest = ensemble.manifest
    drift = manifest.drift
    source = "manifest"
    if drift is None or drift.edges is None:
        splits = load_splits("fashion-mnist", data_dir)
        member_val = onnx_member_logits([ensemble.directory / member.file for member in manifest.members],
                                        splits.val, splits)
        drift = fit_drift_baseline(member_val, split_labels(splits.val, splits), manifest.temperature)
        source = f"fitted here on {len(splits.val)} validation images, as export fits it now"
    return _baseline(drift, len(manifest.classes)), source


def _baseline(drift: DriftBaseline, classes: int) -> Baseline:
    return Baseline.of(drift, classes)


def answers(ensemble: Ensemble, images: np.ndarray) -> dict[str, np.ndarray]:
    """The ensemble's label-free answers for every image, a batch at a time."""
    batches = [ensemble.infer(images[start : start + BATCH], SIGNALS) for start in range(0, len(images), BATCH)]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in SIGNALS}


def window_scores(baseline: Baseline, outputs: dict[str, np.ndarray], windows: list[np.ndarray]) -> list[float]:
    return [drift_score(baseline, {name: value[rows] for name, value in outputs.items()}) for rows in windows]


def summary(scores: list[float], clean_level: float, alert_level: float) -> dict[str, Any]:
    values = np.asarray(scores)
    return {"mean": float(values.mean()), "above_clean_level": float(np.mean(values > clean_level)),
            "above_alert_level": float(np.mean(values > alert_level)), "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, required=True, help="an exported Fashion-MNIST ensemble version")
    parser.add_argument("--windows", type=int, default=10, help="windows scored per corruption and severity")
    parser.add_argument("--clean-windows", type=int, default=1000,
                        help="windows of clean test images scored (cheap: the clean answers are computed once)")
    parser.add_argument("--alert-multiple", type=float, default=2.0, help="the alert level, in clean levels")
    parser.add_argument("--seed", type=int, default=0, help="draws of the windows and of the corruptions")
    parser.add_argument("--data-dir", type=Path, help="folder holding the Fashion-MNIST IDX files")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--plot", type=Path, help="write the scores against severity here (PNG)")
    parser.add_argument("--json", type=Path, help="write every window's score here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.windows < 1 or args.clean_windows < 1:
        parser.error("--windows and --clean-windows must be at least 1")

    started = time.perf_counter()
    ensemble = load_ensemble(args.version_dir, device=args.device)
    manifest = ensemble.manifest
    if manifest.input.shape[1:] != [1, 28, 28]:
        parser.error(f"{args.version_dir} takes {manifest.input.shape} images, not Fashion-MNIST's [-1, 1, 28, 28]")
    baseline, source = baseline_of(ensemble, args.data_dir)
    clean_level, alert_level = baseline.clean_level, args.alert_multiple * baseline.clean_level
    log.info("drift baseline %s: windows of %d, clean level %.5f", source, baseline.window, clean_level)

    images = load_splits("fashion-mnist", args.data_dir).test.images.numpy()  # type: ignore[attr-defined]
    rng = np.random.default_rng(args.seed)
    # Each window draws distinct images; every condition is scored on the same windows, so conditions differ by
    # their corruption alone.
    windows = [rng.choice(len(images), baseline.window, replace=False)
               for _ in range(max(args.windows, args.clean_windows))]
    conditions = [(name, severity) for name in CORRUPTIONS for severity in SEVERITIES]
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in CORRUPTIONS}
    with tqdm(total=1 + len(conditions), desc="conditions", unit="condition", disable=None) as progress:
        clean = summary(window_scores(baseline, answers(ensemble, images), windows[: args.clean_windows]),
                        clean_level, alert_level)
        progress.update()
        for name, severity in conditions:
            corrupted = corrupt(images, name, severity, seed=args.seed)
            scores = window_scores(baseline, answers(ensemble, corrupted), windows[: args.windows])
            results[name][severity] = summary(scores, clean_level, alert_level)
            progress.update()
    seconds = time.perf_counter() - started

    ratios = np.asarray(clean["scores"]) / clean_level
    print(f"{manifest.name} version {manifest.version} ({len(manifest.members)} members), drift baseline {source}: "
          f"windows of {baseline.window} answers, clean level {clean_level:.4f}. {args.windows} windows per "
          f"corruption and severity, {args.clean_windows} clean windows, drawn from the {len(images)} test images "
          f"(seed {args.seed}).\n")
    print(table(clean, results, "above_clean_level", "mean drift score (fraction of windows above the clean level)"))
    print(f"\nclean windows: {clean['above_clean_level']:.1%} above the clean level; score / clean level: median "
          f"{np.median(ratios):.2f}, 99th percentile {np.percentile(ratios, 99):.2f}, largest {ratios.max():.2f}.\n")
    print(table(clean, results, "above_alert_level",
                f"fraction of windows above the alert level {args.alert_multiple:g}x the clean level "
                f"({alert_level:.4f})", means=False))
    print(f"\n{seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "version_dir": str(args.version_dir), "name": manifest.name, "version": manifest.version,
            "baseline": source, "window": baseline.window, "clean_level": clean_level,
            "alert_multiple": args.alert_multiple, "alert_level": alert_level, "seed": args.seed,
            "clean": clean, "corruptions": results, "seconds": seconds}, indent=2) + "\n")
    if args.plot:
        plot(clean, results, clean_level, args.alert_multiple, args.plot,
             f"{manifest.name} v{manifest.version}: drift score of windows of {baseline.window} test images")
        print(f"plot: {args.plot}")


def table(clean: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]], fraction: str, caption: str,
          means: bool = True) -> str:
    """A markdown table: a row per corruption, a column for clean and for each severity."""

    def cell(entry: dict[str, Any]) -> str:
        return f"{entry['mean']:.4f} ({entry[fraction]:.0%})" if means else f"{entry[fraction]:.0%}"

    lines = [f"{caption}:\n", "| corruption | clean | " + " | ".join(f"severity {s}" for s in SEVERITIES) + " |",
             "|---|" + "---|" * (1 + len(SEVERITIES))]
    lines += [f"| {name} | {cell(clean)} | " + " | ".join(cell(by_severity[s]) for s in SEVERITIES) + " |"
              for name, by_severity in results.items()]
    return "\n".join(lines)


def plot(clean: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]], clean_level: float,
         alert_multiple: float, path: Path, title: str) -> None:
    from training.plots import chart, save_chart

    figure, axes = chart()
    severities = [0, *SEVERITIES]
    for name, by_severity in results.items():
        axes.plot(severities, [clean["mean"], *(by_severity[s]["mean"] for s in SEVERITIES)], "o-", label=name)
    axes.axhline(clean_level, color="black", linestyle="--", linewidth=1, label=f"clean level ({clean_level:.4f})")
    alert_level = alert_multiple * clean_level
    axes.axhline(alert_level, color="grey", linestyle=":", linewidth=1,
                 label=f"alert level, {alert_multiple:g}x clean ({alert_level:.4f})")
    # Scores span two orders of magnitude, from mild noise to low contrast.
    axes.set_yscale("log")
    axes.set_xticks(severities, ["clean", *map(str, SEVERITIES)])
    axes.set_xlabel("severity")
    axes.set_ylabel("drift score (mean over windows)")
    save_chart(figure, axes, title, path)


if __name__ == "__main__":
    main()
