"""Prediction sets and accuracy estimated without labels, on Fashion-MNIST: clean and under every corruption.

For each exported ensemble version (`--version-dir NAME=PATH`, repeatable: a single network, FGE,
a curve ensemble), its fused graph answers the validation split, the test split, and the test split
under every corruption of `training.corruptions` at severities 1..5, as the server would. Then, as
export fits them now (`training.export.fits.fit_conformal_spec`, `fit_drift_baseline`), on the
validation answers alone:

- the conformal scores (LAC, APS, RAPS): on the test split, marginal coverage and mean set size
  at 80, 90, 95 and 99 %, the worst class's coverage, and the finite-sample band the coverage
  should fall in; under every corruption, coverage and mean set size at `--coverage`;
- the accuracy map (each confidence bin's validation accuracy): the estimated accuracy of each
  corrupted test split against its labelled accuracy (mean absolute error over the conditions),
  and, on a stream of `--clean` clean test images followed by corrupted ones, how many answers
  before (or after) the labelled accuracy over the last `--window` labels falls `--margin` below
  the validation accuracy the estimate over the last `--window` answers does (labels arriving at
  once; any delay in their coming back adds to the lead).

    .venv/bin/python benchmarks/prediction_sets.py \\
        --version-dir single=runs/demo/ensembles/fashion-mnist-single/1 \\
        --version-dir fge=runs/demo/ensembles/fashion-mnist-fge/1 \\
        --version-dir curve=runs/demo/ensembles/fashion-mnist-curve/1 \\
        --plot docs/images/prediction-sets.png --json runs/prediction-sets.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from artefact.conformal import SCORES, Conformal, expected_coverage
from artefact.estimation import AccuracyMap
from artefact.manifest import ConformalSpec
from service.core.ensemble import Ensemble, load_ensemble
from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from training.data import ImageTensors, load_splits
from training.export.fits import SET_COVERAGES, fit_conformal_spec, fit_drift_baseline
from training.plots import save

BATCH = 1000
OUTPUTS = ["probabilities", "confidence", "member_probabilities"]


def answers(ensemble: Ensemble, images: np.ndarray) -> dict[str, np.ndarray]:
    """The ensemble's answers for every image, a batch at a time."""
    batches = [ensemble.infer(images[start:start + BATCH], OUTPUTS) for start in range(0, len(images), BATCH)]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in OUTPUTS}


def _logits(member_probabilities: np.ndarray) -> np.ndarray:
    """Members' tempered probabilities as logits at temperature 1 (their softmax gives them back)."""
    return np.log(np.maximum(member_probabilities.astype(np.float64), 1e-30))


def _crossing(values: np.ndarray, threshold: float, start: int) -> int | None:
    below = np.flatnonzero(values[start:] < threshold)
    return int(below[0]) + start if len(below) else None


def lead(estimated: np.ndarray, correct: np.ndarray, window: int, clean: int, threshold: float
         ) -> dict[str, int | None]:
    """On a stream whose first `clean` answers are clean: the first answer (counted from the change) at which each
    sliding window of `window` falls below `threshold`: the estimate's and the labelled accuracy's."""
    def sliding(values: np.ndarray) -> np.ndarray:
        sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
        means: np.ndarray = (sums[window:] - sums[:-window]) / window  # the window ending at answer i + window - 1
        return means

    start = clean - window + 1  # the first window holding a corrupted answer
    fired, dropped = _crossing(sliding(estimated), threshold, start), _crossing(sliding(correct), threshold, start)
    return {"estimate": None if fired is None else fired - start,
            "labels": None if dropped is None else dropped - start}


def study(name: str, version_dir: Path, splits: Any, args: argparse.Namespace) -> dict[str, Any]:
    ensemble = load_ensemble(version_dir, device="cpu")
    val, test = splits.val, splits.test
    assert isinstance(val, ImageTensors) and isinstance(test, ImageTensors)
    val_labels, test_labels = val.labels.numpy(), test.labels.numpy()
    test_images = test.images.numpy()
    conditions = [(corruption, severity) for corruption in CORRUPTIONS for severity in SEVERITIES]
    with tqdm(total=2 + len(conditions), desc=name, unit="split", disable=None) as progress:
        val_answers = answers(ensemble, val.images.numpy())
        progress.update()
        clean = answers(ensemble, test_images)
        progress.update()
        spec: ConformalSpec = fit_conformal_spec(_logits(val_answers["member_probabilities"]), val_labels,
                                                 _logits(clean["member_probabilities"]), test_labels, 1.0)
        drift = fit_drift_baseline(_logits(val_answers["member_probabilities"]), val_labels, 1.0)
        assert drift.bin_accuracy is not None and drift.validation_accuracy is not None
        accuracy_map = AccuracyMap(tuple(drift.bin_accuracy), ())
        fitted = {entry.score: Conformal.of(entry) for entry in spec.scores}
        threshold = drift.validation_accuracy - args.margin
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(test_images))
        shifted: dict[str, dict[int, dict[str, Any]]] = {corruption: {} for corruption in CORRUPTIONS}
        for corruption, severity in conditions:
            corrupted = corrupt(test_images, corruption, severity, seed=args.seed)
            result = answers(ensemble, corrupted)
            correct = result["probabilities"].argmax(axis=1) == test_labels
            cell: dict[str, Any] = {"accuracy": float(correct.mean()),
                                    "estimated": accuracy_map.estimate(result["confidence"])}
            for score, conformal in fitted.items():
                sets = conformal.sets(result["probabilities"], args.coverage)
                cell[score] = {"coverage": float(sets[np.arange(len(test_labels)), test_labels].mean()),
                               "size": float(sets.sum(axis=1).mean())}
            # The stream: clean answers, then corrupted ones (different images), in a random order.
            first, rest = order[:args.clean], order[args.clean:]
            stream_confidence = np.concatenate([clean["confidence"][first], result["confidence"][rest]])
            stream_correct = np.concatenate([clean["probabilities"][first].argmax(axis=1) == test_labels[first],
                                             correct[rest]])
            cell["lead"] = lead(accuracy_map.probability_correct(stream_confidence), stream_correct.astype(float),
                                args.window, args.clean, threshold)
            shifted[corruption][severity] = cell
            progress.update()
    clean_correct = clean["probabilities"].argmax(axis=1) == test_labels
    return {"version_dir": str(version_dir), "members": len(ensemble.manifest.members),
            "temperature": ensemble.manifest.temperature, "validation_images": len(val_labels),
            "validation_accuracy": drift.validation_accuracy, "test_images": len(test_labels),
            "clean": {"accuracy": float(clean_correct.mean()),
                      "estimated": accuracy_map.estimate(clean["confidence"]),
                      "sets": {entry.score: [quality.model_dump() for quality in entry.test]
                               for entry in spec.scores}},
            "shifted": shifted}


def _cells(results: dict[str, Any], show: Any) -> list[str]:
    header = "| corruption | " + " | ".join(f"severity {s}" for s in SEVERITIES) + " |"
    lines = [header, "|" + "---|" * (len(SEVERITIES) + 1)]
    for corruption in CORRUPTIONS:
        lines.append(f"| {corruption} | " + " | ".join(show(results["shifted"][corruption][s]) for s in SEVERITIES)
                     + " |")
    return lines


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = []
    count = next(iter(results.values()))["validation_images"]
    tested = next(iter(results.values()))["test_images"]
    # One calibration draw and one test split: the coverage is its expectation (target + at most 1/(n+1)) give or
    # take the spread of both (Angelopoulos and Bates 2021, section 3: Beta over calibration draws, binomial over
    # test images); the band is two standard deviations.
    band = {c: 2 * np.sqrt(c * (1 - c) * (1 / count + 1 / tested)) for c in SET_COVERAGES}
    lines.append(f"Prediction sets on the clean test split (fitted on {count} validation images, measured on "
                 f"{tested} test images; coverage / mean set size, and the worst class's coverage):\n")
    lines.append("| predictor | score | " + " | ".join(f"{c:.0%}" for c in SET_COVERAGES) + " | worst class at 90 % |")
    lines.append("|" + "---|" * (len(SET_COVERAGES) + 3))
    for name, result in results.items():
        for score in SCORES:
            qualities = {q["coverage"]: q for q in result["clean"]["sets"][score]}
            cells = [f"{qualities[c]['marginal']:.1%} / {qualities[c]['mean_size']:.2f}" for c in SET_COVERAGES]
            worst = qualities[0.9]
            lines.append(f"| {name} ({result['members']}) | {score} | " + " | ".join(cells)
                         + f" | {worst['worst_class']:.1%} (class {worst['worst_class_index']}) |")
    lines.append("\nexpected coverage, give or take two standard deviations of one calibration and one test draw: "
                 + ", ".join(f"{c:.0%}: {expected_coverage(count, c):.2%} +- {spread:.2%}"
                             for c, spread in band.items()))
    for name, result in results.items():
        at = next(q for q in result["clean"]["sets"]["lac"] if q["coverage"] == args.coverage)
        lines.append(f"\n{name}: coverage / mean set size of LAC sets at {args.coverage:.0%} under corruption "
                     f"(clean: {at['marginal']:.1%} / {at['mean_size']:.2f})\n")
        lines.extend(_cells(result, lambda cell: f"{cell['lac']['coverage']:.1%} / {cell['lac']['size']:.2f}"))
    for name, result in results.items():
        errors = [abs(cell["estimated"] - cell["accuracy"]) for by_severity in result["shifted"].values()
                  for cell in by_severity.values()]
        lines.append(f"\n{name}: estimated / labelled accuracy (validation {result['validation_accuracy']:.2%}; "
                     f"clean test {result['clean']['estimated']:.2%} / {result['clean']['accuracy']:.2%}); mean "
                     f"absolute error over the {len(errors)} conditions {np.mean(errors):.2%}, largest "
                     f"{np.max(errors):.2%}\n")
        lines.extend(_cells(result, lambda cell: f"{cell['estimated']:.1%} / {cell['accuracy']:.1%}"))

        def shown(cell: dict[str, Any]) -> str:
            fired, dropped = cell["lead"]["estimate"], cell["lead"]["labels"]
            if dropped is None:
                return "no drop" + ("" if fired is None else f" (fired at {fired})")
            if fired is None:
                return f"missed (labels at {dropped})"
            return f"{dropped - fired:+d} ({fired} vs {dropped})"

        lines.append(f"\n{name}: answers by which the estimate's alert (accuracy over the last {args.window} answers "
                     f"{args.margin:.0%} below validation) comes before the labelled accuracy's drop, after "
                     f"{args.clean} clean answers (estimate vs labels: answers after the change)\n")
        lines.extend(_cells(result, shown))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], coverage: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, result in results.items():
        cells = [cell for by_severity in result["shifted"].values() for cell in by_severity.values()]
        left.scatter([c["accuracy"] for c in cells], [c["estimated"] for c in cells], label=name, s=18)
        sizes = [c["lac"]["size"] for c in cells]
        right.scatter(sizes, [c["lac"]["coverage"] for c in cells], label=name, s=18)
    left.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    left.set(xlabel="labelled accuracy", ylabel="estimated accuracy (no labels)",
             title="Every corruption and severity: estimated vs labelled")
    right.axhline(coverage, color="grey", linewidth=0.8, linestyle="--")
    right.set(xlabel="mean set size (classes)", ylabel=f"coverage of LAC sets at {coverage:.0%}",
              title="Prediction sets under corruption")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    save(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", action="append", default=[], metavar="NAME=PATH",
                        help="an exported Fashion-MNIST ensemble version, named (repeatable)")
    parser.add_argument("--coverage", type=float, default=0.9, help="the coverage shown under corruption")
    parser.add_argument("--window", type=int, default=1000, help="answers and labels per sliding window")
    parser.add_argument("--clean", type=int, default=3000, help="clean answers before the change in the stream")
    parser.add_argument("--margin", type=float, default=0.05, help="the alert's margin below validation accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="folder holding the Fashion-MNIST IDX files")
    parser.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--from-json", type=Path, help="print the report (and plot) of an earlier run's --json")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        for result in results.values():  # JSON keys are strings: severities back to numbers
            result["shifted"] = {corruption: {int(severity): cell for severity, cell in cells.items()}
                                 for corruption, cells in result["shifted"].items()}
        print(report(results, args))
        if args.plot:
            plot(results, args.coverage, args.plot)
        return
    if args.coverage not in SET_COVERAGES:
        parser.error(f"--coverage must be one of {SET_COVERAGES}")
    if not args.version_dir:
        parser.error("give at least one --version-dir NAME=PATH")
    named = {}
    for entry in args.version_dir:
        name, _, path = entry.partition("=")
        if not path:
            parser.error(f"--version-dir takes NAME=PATH, got {entry!r}")
        named[name] = Path(path)
    started = time.perf_counter()
    splits = load_splits("fashion-mnist", args.data_dir)
    results = {name: study(name, path, splits, args) for name, path in named.items()}
    print(report(results, args))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.coverage, args.plot)


if __name__ == "__main__":
    main()
