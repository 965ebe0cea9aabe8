"""Training a curve between two finished base runs: `valley-train curve`; and reading a trained one back.

The curve's bends are trained with the paper's recipe: one t ~ U(0, 1) per mini-batch, one SGD
step on the loss at w(t), the base schedule, and weight decay as 0.5 wd ||w(t)||^2 in the loss
(the optimizer's own weight decay would shrink the bends, not the weights at t). The run
directory has the habits of `train` and `fge`: a log line and an atomic checkpoint per epoch,
and `--resume` continuing bit-identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from training import checkpoint, distributed
from training.config import CurveConfig, CurveRunConfig, DataConfig, TrainConfig
from training.curves import Curve, ParameterMismatch, has_batch_norm, recompute_batch_norm
from training.data import DataSplits, load_data, make_batches, subset
from training.engine import Trainer, build_model, resolve_device
from training.errors import UsageError
from training.init import load_initial_weights
from training.runs import CurveReport, Endpoint, RunDir, TrainReport
from training.schedules import BaseSchedule

log = logging.getLogger(__name__)

# What makes two runs' data the same: the same images in the same train / validation / test split.
_SPLIT_FIELDS = ("dataset", "data_dir", "val_size", "subset", "image_size")


def _base_run(path: Path, option: str) -> tuple[RunDir, TrainConfig]:
    run = RunDir(path)
    if run.config_file.is_file() and not run.is_base:
        raise UsageError(f"{option} {path} is {run.kind_in_words} run: a curve joins two base runs "
                         "(`valley-train train --out`)")
    if not run.config_file.is_file():
        raise UsageError(f"{option} {path} is not a run directory (no {run.config_file.name}): "
                         "pass the --out of `valley-train train`, or a weight file")
    return run, run.read_config()


def _split(data: DataConfig) -> dict[str, Any]:
    """What fixes a run's images and split: the dataset, its folder (resolved), validation size, subset, size."""
    fields = {field: getattr(data, field) for field in _SPLIT_FIELDS}
    fields["data_dir"] = None if data.data_dir is None else str(data.data_dir.resolve())
    return fields


def _same_data(start: DataConfig, end: DataConfig) -> str | None:
    """The first data setting in which two runs differ, described; None when they saw the same split."""
    first_split, second_split = _split(start), _split(end)
    for field in _SPLIT_FIELDS:
        first, second = first_split[field], second_split[field]
        if first != second:
            return f"{field.replace('_', '-')} {first!r} vs {second!r}"
    return None


def _endpoint_config(path: Path, option: str) -> TrainConfig | None:
    """A base run's configuration; None for a weight file (trained elsewhere)."""
    return None if path.is_file() else _base_run(path, option)[1]


def resolve_curve_config(config: CurveConfig) -> CurveRunConfig:
    """Check that the endpoints can be joined, and fill the defaults from the start run (or, for weight files, from
    the other endpoint's run or `config.base`)."""
    runs = [_endpoint_config(config.start_run, "--start"), _endpoint_config(config.end_run, "--end")]
    if config.start_run.resolve() == config.end_run.resolve():
        kind = "file" if config.start_run.is_file() else "run"
        raise UsageError(f"--start and --end are the same {kind} ({config.start_run}): pass two independently "
                         "trained networks")
    if config.base is not None and any(run is not None for run in runs):
        raise UsageError("--model and the data flags apply where both endpoints are weight files; a base run "
                         "endpoint gives them")
    if config.base is None and all(run is None for run in runs):
        raise UsageError(f"--start {config.start_run} and --end {config.end_run} are weight files: pass --model and "
                         "--dataset (and the data flags) they were trained for")
    start = runs[0] or runs[1] or config.base
    end = runs[1] or start
    assert start is not None and end is not None
    if start.model != end.model:
        raise UsageError(f"the endpoints must share one architecture: {config.start_run} is {start.model!r}, "
                         f"{config.end_run} is {end.model!r}")
    difference = _same_data(start.data, end.data)
    if difference is not None:
        raise UsageError(f"the endpoints must be trained on the same dataset and split: {config.start_run} and "
                         f"{config.end_run} differ in {difference}")
    # Absolute: the curve is read back (curve-eval, export, --resume) from wherever the user stands.
    return CurveRunConfig(
        start_run=config.start_run.resolve(), end_run=config.end_run.resolve(), curve=config.curve,
        bends=config.bends,
        epochs=start.epochs if config.epochs is None else config.epochs, lr=config.lr,
        momentum=start.momentum if config.momentum is None else config.momentum,
        weight_decay=start.weight_decay if config.weight_decay is None else config.weight_decay,
        seed=config.seed, device=config.device, base=start,
    )


def _final_weights(path: Path, model_name: str, splits: DataSplits) -> dict[str, torch.Tensor]:
    """An endpoint's network: a base run's final checkpoint, or a weight file read into a `model_name` network."""
    if path.is_file():
        network = build_model(model_name, splits.info, torch.device("cpu"))
        load_initial_weights(network, path)
        return network.state_dict()
    run = RunDir(path)
    final = run.final_checkpoint(run.read_config())
    state = checkpoint.load(final)
    if state.get("model_name") != model_name:
        raise UsageError(f"{final} holds a {state.get('model_name')!r} model, not {model_name!r}")
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise UsageError(f"{final} holds no model weights: is it a checkpoint of `valley-train train`?")
    return weights


def build_curve(config: CurveRunConfig, splits: DataSplits, device: torch.device) -> Curve:
    """A new curve between the two runs' final networks, its bends on the straight line."""
    network = build_model(config.base.model, splits.info, device)
    start = _final_weights(config.start_run, config.base.model, splits)
    end = _final_weights(config.end_run, config.base.model, splits)
    try:
        return Curve(network, start, end, config.curve, config.bends)
    except ParameterMismatch as error:
        raise UsageError(f"the endpoints do not fit one {config.base.model!r} network: {error}") from error


def batch_norm_batches(splits: DataSplits, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The training images, in order and without augmentation, on `device`: what batch norm averages over.

    In a process group, this process's contiguous run of those batches (`recompute_batch_norm` combines them).
    """
    data = splits.train_without_augmentation
    if distributed.active():
        data = subset(data, distributed.shard().whole_batches(len(data), batch_size))
    for images, _ in make_batches(data, splits.info, batch_size, train=False):
        yield images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def network_at(curve: Curve, t: float, splits: DataSplits, batch_size: int, device: torch.device) -> nn.Module:
    """The plain network at `t` with its batch-norm statistics recomputed over the training data (eval mode)."""
    network = curve.network_at(t)
    if has_batch_norm(network):
        recompute_batch_norm(network, batch_norm_batches(splits, batch_size, device))
    return network.eval()


def _endpoint(path: Path) -> Endpoint | None:
    if path.is_file():
        return None  # weights trained elsewhere: no report of theirs to quote
    run = RunDir(path)
    if not run.report_file.is_file():
        return None
    report = run.read_report(TrainReport)
    return Endpoint(run=path, epochs=report.epochs, test=report.test, val=report.val)


def _recipe(config: CurveRunConfig) -> dict[str, Any]:
    """What a resumed curve must share with its checkpoint: endpoints, curve, schedule, model, data split.

    Not the device, and not settings of the start run that change no number (workers, kept epochs).
    """
    return {"start": str(Path(config.start_run).resolve()), "end": str(Path(config.end_run).resolve()),
            "curve": config.curve, "bends": config.bends, "epochs": config.epochs, "lr": config.lr,
            "momentum": config.momentum, "weight decay": config.weight_decay, "seed": config.seed,
            "model": config.base.model, "batch size": config.base.data.batch_size, **_split(config.base.data)}


def _check_resumable(run: RunDir, resolved: CurveRunConfig) -> None:
    """A resumed curve must be the one the checkpoint holds: same endpoints, curve and recipe."""
    try:
        stored = _recipe(CurveRunConfig.model_validate(checkpoint.load(run.last_checkpoint).get("config")))
    except ValidationError as error:
        raise UsageError(f"cannot resume {run.path}: its last checkpoint is not a curve's") from error
    wanted = _recipe(resolved)
    changed = [key for key in wanted if stored[key] != wanted[key]]
    if changed:
        details = ", ".join(f"{key} {stored[key]!r} vs now {wanted[key]!r}" for key in changed[:3])
        raise UsageError(f"cannot resume {run.path}: it was started with other options ({details}); "
                         "use the original options or a new --out")


def run_curve(config: CurveConfig, out: Path, resume: bool = False) -> CurveReport:
    """Train the bends of a curve between `config.start_run` and `config.end_run` into `out`."""
    run = RunDir(out)
    resolved = resolve_curve_config(config)
    if run.last_checkpoint.exists():
        if not resume:
            raise UsageError(f"{out} already holds a curve run: pass --resume to continue it, or choose another --out")
        _check_resumable(run, resolved)
    base = resolved.base
    device = distributed.setup(resolve_device(resolved.device), base.data.batch_size)
    splits = load_data(base.data)
    torch.manual_seed(resolved.seed)
    curve = build_curve(resolved, splits, device)
    # No weight decay in the optimizer: it is 0.5 wd ||w(t)||^2 in the loss (ALGORITHMS.md).
    optimizer = torch.optim.SGD(curve.bend_parameters(), lr=resolved.lr, momentum=resolved.momentum, weight_decay=0.0)
    iterations = len(make_batches(splits.train, splits.info, base.data.batch_size, train=True))
    schedule = BaseSchedule(iterations_per_epoch=iterations, lr0=resolved.lr, budget_epochs=resolved.epochs)

    def weight_decay() -> torch.Tensor:
        assert curve.last_l2 is not None, "the penalty is read after a forward pass"
        return 0.5 * resolved.weight_decay * curve.last_l2

    trainer = Trainer(
        run=run, model=curve, model_name=base.model, optimizer=optimizer, schedule=schedule, splits=splits,
        batch_size=base.data.batch_size, seed=resolved.seed, device=device, config=resolved.model_dump(mode="json"),
        workers=base.data.workers, penalty=weight_decay, find_unused_parameters=True,
    )
    if resume and not trainer.resume():
        log.info("nothing to resume in %s: starting afresh", out)
    if distributed.is_main():
        run.write_config(resolved)
    started = time.perf_counter()
    # No per-epoch validation: a point's batch-norm statistics mean nothing until recomputed (curve-eval does).
    trainer.fit(resolved.epochs, validate=False)
    seconds = time.perf_counter() - started
    previous = run.read_report(CurveReport) if run.report_file.is_file() else None
    report = CurveReport(
        config=resolved, start=_endpoint(resolved.start_run), end=_endpoint(resolved.end_run),
        parameters=sum(p.numel() for p in curve.network.parameters()), device=str(device),
        train_seconds_this_process=round(seconds, 2),
        train_seconds_total=round(sum(record["seconds"] for record in trainer.history), 2),
        # A finished run asked to --resume again keeps its evaluation.
        evaluation=previous.evaluation if previous is not None else None,
    )
    if distributed.is_main():
        run.write_report(report)
    return report


@dataclass
class TrainedCurve:
    """A finished curve run read back: the curve (final bends), its configuration and its data."""

    run: RunDir
    config: CurveRunConfig
    curve: Curve
    splits: DataSplits
    device: torch.device

    @property
    def batch_size(self) -> int:
        return self.config.base.data.batch_size

    def network_at(self, t: float) -> nn.Module:
        """The plain network at `t`, batch norm recomputed."""
        return network_at(self.curve, t, self.splits, self.batch_size, self.device)


def open_curve(path: Path, device: str = "auto", splits: DataSplits | None = None) -> TrainedCurve:
    """Read a finished curve run (its final checkpoint alone: the endpoints are in it) for evaluation or export."""
    run = RunDir(path)
    config = run.read_curve_config()
    final = run.epoch_checkpoint(config.epochs)
    if not final.is_file():
        raise UsageError(f"curve run {path} is not finished (no {final.name}): continue it with "
                         "`valley-train curve ... --resume`")
    torch_device = resolve_device(device)
    state: dict[str, Any] = checkpoint.load(final)
    if state.get("model_name") != config.base.model or not isinstance(state.get("model"), dict):
        raise UsageError(f"{final} is not the checkpoint of this {config.base.model!r} curve")
    splits = load_data(config.base.data) if splits is None else splits
    network = build_model(config.base.model, splits.info, torch_device)
    try:
        curve = Curve.from_state_dict(network, state["model"], config.curve, config.bends)
    except ParameterMismatch as error:
        raise UsageError(f"{final} does not hold a {config.bends}-bend curve of this {config.base.model!r} "
                         f"network: {error}") from error
    return TrainedCurve(run, config, curve.eval(), splits, torch_device)
