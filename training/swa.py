"""Stochastic weight averaging (Izmailov et al. 2018) of an FGE or SSE run's snapshots: `valley-train swa`.

The snapshots' weights are averaged with `torch.optim.swa_utils.AveragedModel` (an equal-weight running mean),
then the averaged network's batch-norm statistics are recomputed over the training images, since the average
of the snapshots' statistics is not the statistics of the averaged weights. One network that sits near the
centre of the snapshots' region of the loss surface: close to the ensemble's accuracy at one member's cost,
which makes it a candidate for the cascade's first stage and a one-network model of its own
(`valley-train export --from SWA_DIR`).

The statistics come from `training.curves.recompute_batch_norm`, the exact average over the training images
that curves use, rather than `torch.optim.swa_utils.update_bn`, which averages per batch (a short last batch
weighs as much as a full one) and passes the training images with their augmentation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from training import checkpoint
from training.config import SWARunConfig
from training.curve_train import batch_norm_batches
from training.curves import has_batch_norm, recompute_batch_norm
from training.data import DataSplits, load_data
from training.engine import build_model, evaluate, resolve_device
from training.errors import UsageError
from training.runs import RunDir, SWAReport
from training.snapshots import finished_snapshot_run, first_members


def average_snapshots(model_name: str, splits: DataSplits, paths: Sequence[Path], device: torch.device,
                      batch_size: int) -> tuple[nn.Module, int]:
    """The network whose weights are the mean of the snapshots' at `paths`, batch norm recomputed over the
    training images (eval mode); and the number of those images (0 for a network without batch norm)."""
    network = build_model(model_name, splits.info, device)
    averaged = AveragedModel(network)
    for path in paths:
        checkpoint.load_model_weights(network, checkpoint.load(path), model_name, path)
        averaged.update_parameters(network)
    result: nn.Module = averaged.module
    images = 0
    if has_batch_norm(result):
        images = recompute_batch_norm(result, batch_norm_batches(splits, batch_size, device))
    return result.eval(), images


def run_swa(source: Path, out: Path, members: int | None = None, device: str = "auto") -> SWAReport:
    """Average the first `members` snapshots (default all) of the FGE or SSE run `source` into the run `out`."""
    source_run, run = RunDir(source), RunDir(out)
    report = finished_snapshot_run(source_run, "SWA averages the snapshots of an FGE or SSE run", "the run")
    if run.report_file.exists():
        raise UsageError(f"{out} already holds an SWA run: choose another --out")
    averaged = first_members(report, members, "the run's")
    base = source_run.read_config()
    config = SWARunConfig(source_run=source, members=[m.index for m in averaged], device=device, base=base)
    torch_device = resolve_device(device)
    splits = load_data(base.data)
    started = time.perf_counter()
    network, images = average_snapshots(base.model, splits, [source_run.path / m.file for m in averaged],
                                        torch_device, base.data.batch_size)
    test = evaluate(network, splits.test, splits, torch_device).metrics
    val = evaluate(network, splits.val, splits, torch_device).metrics if len(splits.val) else None
    run.write_config(config)
    checkpoint.save_atomic({"model_name": base.model, "model": network.state_dict(),
                            "provenance": {"run": str(source), "averaged": config.members}}, run.network_file)
    result = SWAReport(config=config, file=run.network_file.name, batch_norm_images=images,
                       ensemble=report.ensembles[len(averaged) - 1], test=test, val=val, device=str(torch_device),
                       seconds=round(time.perf_counter() - started, 2))
    run.write_report(result)
    return result


def summary_table(report: SWAReport) -> str:
    """SWA beside the ensemble of the same snapshots (test split)."""
    rows = ["| model | members | accuracy % | NLL | ECE % | Brier |", "|---|---|---|---|---|---|"]
    size = len(report.config.members)
    for name, metrics in ((f"ensemble of the {size} snapshots", report.ensemble.test),
                          (f"SWA of the {size} snapshots", report.test)):
        rows.append(f"| {name} | {size if name.startswith('ensemble') else 1} | {100 * metrics.accuracy:.2f} | "
                    f"{metrics.nll:.4f} | {100 * metrics.ece:.2f} | {metrics.brier:.4f} |")
    return "\n".join(rows)
