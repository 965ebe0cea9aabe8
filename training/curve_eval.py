"""The loss and error along a trained curve and along the straight line: `valley-train curve-eval`.

At each of N evenly spaced t the network is taken off the curve (and off the line between the
same endpoints), its batch-norm statistics are recomputed over the training data, and it is
evaluated on the training split (loss and error, no augmentation), the validation split and the
test split. The results go into the curve run's report.json (`evaluation`) and a plot.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from training.curve_train import TrainedCurve, network_at, open_curve
from training.curves import Curve, evenly_spaced
from training.engine import evaluate
from training.errors import UsageError
from training.plots import plot_curve
from training.runs import CurveEvaluation, CurvePoint, CurveReport, CurveSide

MAX_POINTS = 1001


def _side(trained: TrainedCurve, curve: Curve, t: float) -> tuple[CurveSide, int]:
    network = network_at(curve, t, trained.splits, trained.batch_size, trained.device)
    splits, device = trained.splits, trained.device
    train = evaluate(network, splits.train_without_augmentation, splits, device).metrics
    test = evaluate(network, splits.test, splits, device).metrics
    val = evaluate(network, splits.val, splits, device).metrics if len(splits.val) else None
    side = CurveSide(train_loss=train.nll, train_error=1.0 - train.accuracy, test=test, val=val)
    return side, train.count


def evaluate_curve(curve_dir: Path, points: int = 21, device: str = "auto") -> CurveReport:
    """Evaluate the curve run in `curve_dir` at `points` evenly spaced t; returns (and writes) its report."""
    if not 2 <= points <= MAX_POINTS:
        raise UsageError(f"--points must be between 2 and {MAX_POINTS}, got {points}")
    trained = open_curve(curve_dir, device)
    run = trained.run
    if not run.report_file.is_file():
        raise UsageError(f"curve run {curve_dir} has no {run.report_file.name}: finish it with --resume first")
    line = trained.curve.line()
    started = time.perf_counter()
    results: list[CurvePoint] = []
    images = 0
    for t in tqdm(evenly_spaced(points), desc="points along t", unit="point", disable=None):
        on_curve, images = _side(trained, trained.curve, t)
        # At the endpoints curve and line are the same network: evaluate it once.
        on_line = on_curve if t in (0.0, 1.0) else _side(trained, line, t)[0]
        results.append(CurvePoint(t=t, curve=on_curve, line=on_line))

    def error(side: CurveSide) -> float:
        return 1.0 - side.test.accuracy

    evaluation = CurveEvaluation(
        points=results,
        endpoint_test_error=[error(results[0].curve), error(results[-1].curve)],
        curve_max_test_error=max(error(point.curve) for point in results),
        line_max_test_error=max(error(point.line) for point in results),
        batch_norm_images=images,
        evaluation_seconds=round(time.perf_counter() - started, 2),
    )
    report = run.read_report(CurveReport).model_copy(update={"evaluation": evaluation})
    run.write_report(report)
    plot_curve(report, run.curve_plot_file)
    return report


def summary_table(report: CurveReport) -> str:
    """Test error (%) and training loss at each t, on the curve and on the line."""
    evaluation = report.evaluation
    if evaluation is None:
        return "not evaluated yet: run valley-train curve-eval"
    rows = ["| t | curve test error % | line test error % | curve train loss | line train loss |",
            "|---|---|---|---|---|"]
    rows.extend(f"| {p.t:.3f} | {100 * (1 - p.curve.test.accuracy):.2f} | {100 * (1 - p.line.test.accuracy):.2f} | "
                f"{p.curve.train_loss:.4f} | {p.line.train_loss:.4f} |" for p in evaluation.points)
    return "\n".join(rows)
