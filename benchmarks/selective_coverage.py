"""Coverage at a target accuracy: how many test images a single network and an exported ensemble answer when each
abstains below a threshold fitted on the validation split for 95, 97 and 99 % selective accuracy.

Each predictor goes through the exporter's own procedure (`training.export.fit_selective_spec`): its best signal on
validation (`artefact.selective.best_signal`), per target the lowest threshold whose validation selective accuracy
reaches it with `SELECTIVE_MARGIN` standard errors to spare (`fit_threshold`), then the coverage and accuracy that
threshold gives on the test split, which takes no part in any choice. The ensemble's logits come from the version's
member graphs run by onnxruntime, at the manifest's temperature. The single network is `--single-run`'s final
network (or, without it, the first member graph), and each single network gets its own temperature, fitted on
validation (`training.calibrate.fit_temperature`).

It prints a markdown table; `--plot` draws the test split's risk-coverage curves with the thresholds marked,
`--reliability-plot` the ensemble's reliability diagram on the test split before and after temperature scaling.

    .venv/bin/python benchmarks/selective_coverage.py --version-dir runs/ensembles/fashion-mnist-fge/2 \\
        --single-run runs/fm-b24 --plot docs/images/risk-coverage.png \\
        --reliability-plot docs/images/reliability-fge.png --json runs/selective-coverage.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from artefact.manifest import SelectiveSpec, load_manifest
from artefact.metrics import classification_metrics
from training.calibrate import fit_temperature, tempered_ensemble_probabilities
from training.config import ExportConfig
from training.data import DataSplits, SizedDataset, load_data
from training.engine import predict_logits
from training.errors import UsageError
from training.export.fits import SELECTIVE_MARGIN, fit_selective_spec, selective_curve
from training.export.sources import collect_sources, split_labels
from training.export.variants import onnx_member_logits
from training.plots import SelectiveLine, plot_reliability, plot_risk_coverage
from training.runs import RunDir

TARGETS = (0.95, 0.97, 0.99)


@dataclass(frozen=True)
class Predictor:
    """Member logits [N, K, C] on both splits, the temperature they are answered at, and where it came from."""

    label: str
    val: np.ndarray
    test: np.ndarray
    temperature: float
    temperature_from: str


def graph_logits(paths: list[Path], data: SizedDataset, splits: DataSplits, split: str) -> np.ndarray:
    """Logits [N, K, C] of member graphs over a split, one graph at a time (for the progress bar)."""
    return np.concatenate([onnx_member_logits([path], data, splits)
                           for path in tqdm(paths, desc=f"graphs on {split}", unit="graph", disable=None)], axis=1)


def single_run_logits(run: Path, splits: DataSplits) -> tuple[str, np.ndarray, np.ndarray]:
    """A label naming a base run's final network, and its logits [N, 1, C] on validation and test."""
    sources = collect_sources(ExportConfig(runs=[run], name="single", repository=Path("/nonexistent")))
    if sources.method != "independent":
        raise UsageError(f"--single-run {run} is a {sources.method} run: pass a base run (`valley-train train`)")
    model = sources.members[0].build(splits)
    device = torch.device("cpu")
    val = predict_logits(model, splits.val, splits, device)[0]
    test = predict_logits(model, splits.test, splits, device)[0]
    return f"single network ({run}, {sources.config.epochs} epochs)", val[:, None], test[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, required=True, help="an exported version: REPO/NAME/VERSION")
    parser.add_argument("--single-run", type=Path,
                        help="a base run whose final network is the single network (default: the first member graph)")
    parser.add_argument("--target", dest="targets", type=float, action="append",
                        help="a target selective accuracy (repeatable; default 0.95, 0.97, 0.99)")
    parser.add_argument("--plot", type=Path, help="PNG: risk-coverage on the test split, thresholds marked")
    parser.add_argument("--reliability-plot", type=Path,
                        help="PNG: the ensemble's reliability diagram on the test split, before and after "
                             "temperature scaling")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    targets = sorted(args.targets or TARGETS)

    manifest = load_manifest(args.version_dir)
    run = manifest.members[0].provenance.get("run")
    if run is None or not Path(run).is_dir():
        raise SystemExit(f"{args.version_dir}: its first member's provenance names no run directory here ({run!r}); "
                         "the validation split is read from that run's data configuration")
    splits = load_data(RunDir(Path(run)).read_config().data)
    if len(splits.info.classes) != len(manifest.classes):
        raise SystemExit(f"{run}'s dataset has {len(splits.info.classes)} classes, the manifest "
                         f"{len(manifest.classes)}: the version was not exported from it")
    val_labels, test_labels = split_labels(splits.val, splits), split_labels(splits.test, splits)
    paths = [args.version_dir / member.file for member in manifest.members]
    member_val = graph_logits(paths, splits.val, splits, "validation")
    member_test = graph_logits(paths, splits.test, splits, "test")

    def alone(label: str, val: np.ndarray, test: np.ndarray) -> Predictor:
        return Predictor(label, val, test, fit_temperature(val, val_labels), "own, fitted on validation")

    count = len(manifest.members)
    predictors = []
    if args.single_run is not None:
        predictors.append(alone(*single_run_logits(args.single_run, splits)))
    predictors.append(alone(f"{manifest.method} member 1 alone", member_val[:, :1], member_test[:, :1]))
    predictors.append(Predictor(f"{manifest.method} ensemble ({count} members)", member_val, member_test,
                                manifest.temperature, "the manifest's"))

    specs: list[SelectiveSpec] = []
    accuracies: list[float] = []
    for predictor in predictors:
        specs.append(fit_selective_spec(predictor.val, val_labels, predictor.test, test_labels, predictor.temperature,
                                        targets, max(targets)))
        accuracies.append(classification_metrics(
            tempered_ensemble_probabilities(predictor.test, predictor.temperature), test_labels).accuracy)

    print(f"{args.version_dir} ({manifest.name} version {manifest.version}, {manifest.model}): {len(val_labels)} "
          f"validation and {len(test_labels)} test images. Thresholds fitted on validation with {SELECTIVE_MARGIN:g} "
          "standard errors to spare, each predictor on its own best validation signal; coverage and selective "
          "accuracy on test.\n")
    header = " | ".join(f"{100 * target:g} %: coverage / accuracy" for target in targets)
    print(f"| predictor | temperature | signal | test accuracy, all images | {header} |")
    print("|---|---|---|---|" + "---|" * len(targets))
    for predictor, spec, accuracy in zip(predictors, specs, accuracies, strict=True):
        cells = " | ".join(
            "none reaches it on validation" if t.threshold is None else
            f"{100 * t.test_coverage:.1f} % / {100 * (t.test_accuracy or 0.0):.2f} %" for t in spec.thresholds)
        print(f"| {predictor.label} | {predictor.temperature:.3f} ({predictor.temperature_from}) | {spec.signal} | "
              f"{100 * accuracy:.2f} % | {cells} |")

    if args.plot:
        lines = []
        for predictor, spec in zip(predictors, specs, strict=True):
            curve = selective_curve(predictor.test, test_labels, predictor.temperature, spec.signal)
            lines.append(SelectiveLine(f"{predictor.label}, {spec.signal}", curve.coverage, curve.accuracy,
                                       spec.thresholds))
        plot_risk_coverage(lines, targets, args.plot,
                           f"{manifest.name} version {manifest.version}: test split ({len(test_labels)} images); "
                           "thresholds fitted on validation")
        print(f"\nplot: {args.plot}")
    if args.reliability_plot:
        ensemble = predictors[-1]
        panels = {f"{when} temperature scaling (T = {t:.3f})": tempered_ensemble_probabilities(ensemble.test, t)
                  for when, t in (("before", 1.0), ("after", ensemble.temperature))}
        plot_reliability(panels, test_labels, args.reliability_plot,
                         f"{ensemble.label}, {manifest.name} version {manifest.version}: test split, "
                         f"{len(test_labels)} images")
        print(f"reliability plot: {args.reliability_plot}")
    if args.json:
        results = [{"label": predictor.label, "members": len(predictor.val), "temperature": predictor.temperature,
                    "temperature_from": predictor.temperature_from, "signal": spec.signal, "test_accuracy": accuracy,
                    "thresholds": [threshold.model_dump() for threshold in spec.thresholds]}
                   for predictor, spec, accuracy in zip(predictors, specs, accuracies, strict=True)]
        args.json.write_text(json.dumps({"version_dir": str(args.version_dir), "margin": SELECTIVE_MARGIN,
                                         "targets": targets, "predictors": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
