"""What an export reads: the members of FGE, SSE, curve, SWA, distilled or base runs, as networks with their
provenance, and the split images as the uint8 pixels the graphs take."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training import checkpoint
from training.config import ExportConfig, TrainConfig
from training.curve_train import TrainedCurve, open_curve
from training.curves import evenly_spaced
from training.data import DataSplits, SizedDataset, make_batches
from training.engine import build_model, predict_logits
from training.errors import UsageError
from training.runs import DistillReport, RunDir, SWAReport


@dataclass
class MemberSource:
    """One member: where it comes from, and how to build its network (eval mode, on the CPU) for the data."""

    provenance: dict[str, Any]
    build: Callable[[DataSplits], nn.Module]


@dataclass
class Sources:
    method: Literal["fge", "sse", "curve", "independent", "swa", "distilled"]
    config: TrainConfig
    members: list[MemberSource]
    # Curves: the two base runs' own networks, the baselines the export report compares the curve ensemble with.
    endpoints: list[MemberSource] = field(default_factory=list)


def _from_checkpoint(path: Path, model_name: str, provenance: dict[str, Any]) -> MemberSource:
    def build(splits: DataSplits) -> nn.Module:
        model = build_model(model_name, splits.info, torch.device("cpu"))
        checkpoint.load_model_weights(model, checkpoint.load(path), model_name, path)
        return model.eval()

    return MemberSource(provenance, build)


def _final_network(run: RunDir, config: TrainConfig) -> MemberSource:
    provenance = {"run": str(run.path), "epoch": config.epochs, "seed": config.seed}
    return _from_checkpoint(run.final_checkpoint(config), config.model, provenance)


def curve_points(points: list[float] | None, num_points: int | None) -> list[float]:
    """The members' t: as listed, or K evenly spaced from 0 to 1 (both endpoints included; K = 1 is t = 0.5)."""
    if points is None and num_points is None:
        raise UsageError("a curve export needs the members' t: --points t1,t2,... or --num-points K")
    if points is None:
        assert num_points is not None
        return [0.5] if num_points == 1 else evenly_spaced(num_points)
    outside = [t for t in points if not 0.0 <= t <= 1.0]
    if outside:
        raise UsageError(f"--points must lie in [0, 1] (0 is --start, 1 is --end), got {outside[0]}")
    if len(set(points)) != len(points):
        raise UsageError(f"--points lists a t twice ({','.join(map(str, points))}): each member needs its own t")
    return points


def _curve_sources(run: RunDir, export: ExportConfig) -> Sources:
    config = run.read_curve_config()
    ts = curve_points(export.points, export.num_points)
    opened: list[TrainedCurve] = []

    def network(t: float) -> Callable[[DataSplits], nn.Module]:
        def build(splits: DataSplits) -> nn.Module:
            if not opened:  # read the curve once, for all its members and endpoints
                opened.append(open_curve(run.path, "cpu", splits))
            return opened[0].network_at(t)

        return build

    def endpoint(which: Literal["start", "end"]) -> Callable[[DataSplits], nn.Module]:
        def build(splits: DataSplits) -> nn.Module:
            if not opened:
                opened.append(open_curve(run.path, "cpu", splits))
            return opened[0].curve.endpoint_network(which)

        return build

    members = [MemberSource({"run": str(run.path), "t": t, "curve": config.curve, "bends": config.bends},
                            network(t)) for t in ts]
    # The endpoints as trained, from the curve's own checkpoint: their runs need not be around any more.
    endpoints = [MemberSource({"run": str(config.start_run)}, endpoint("start")),
                 MemberSource({"run": str(config.end_run)}, endpoint("end"))]
    return Sources("curve", config.base, members, endpoints)


def one_network(run: RunDir) -> Sources:
    """An SWA run's averaged network or a distilled student, as a one-member model."""
    if not run.report_file.is_file() or not run.network_file.is_file():
        command = "swa" if run.is_swa else "distill ... --resume"
        raise UsageError(f"{run.path} has no finished network: run `valley-train {command}` first")
    if run.is_swa:
        swa = run.read_report(SWAReport)
        provenance: dict[str, Any] = {"run": str(run.path), "source_run": str(swa.config.source_run),
                                      "averaged": swa.config.members}
        return Sources("swa", swa.config.base, [_from_checkpoint(run.network_file, swa.config.base.model, provenance)])
    student = run.read_report(DistillReport)
    provenance = {"run": str(run.path), "teacher_run": str(student.config.teacher_run),
                  "teacher_members": student.config.members, "temperature": student.config.temperature,
                  "seed": student.config.base.seed}
    return Sources("distilled", student.config.base,
                   [_from_checkpoint(run.network_file, student.config.base.model, provenance)])


def collect_sources(export: ExportConfig) -> Sources:
    """One FGE run (its snapshots), one curve run (points on it) or one or more base runs (their final networks)."""
    dirs = [RunDir(path) for path in export.runs]
    is_curve = [run.is_curve for run in dirs]
    if any(is_curve):
        if len(dirs) > 1:
            raise UsageError("export one curve run at a time: --from CURVE_DIR with --points or --num-points")
        return _curve_sources(dirs[0], export)
    if export.points is not None or export.num_points is not None:
        raise UsageError("--points and --num-points choose points on a curve: --from must be a curve run "
                         "(`valley-train curve --out`)")
    if len(dirs) == 1 and (dirs[0].is_swa or dirs[0].is_distilled):
        return one_network(dirs[0])
    if any(run.is_swa or run.is_distilled for run in dirs):
        raise UsageError("an SWA or distilled run is one network: export it alone (--from RUN_DIR)")
    if len(dirs) == 1 and dirs[0].has_snapshots:
        run = dirs[0]
        command = "sse" if run.is_sse else "fge"
        if not run.report_file.is_file():
            raise UsageError(f"{command.upper()} run {run.path} has no {run.report_file.name}: finish it first "
                             f"(valley-train {command} ... --resume)")
        config = run.read_config()
        report = run.read_snapshot_report()
        members = [_from_checkpoint(run.path / m.file, config.model,
                                    {"run": str(run.path), "index": m.index, "epoch": m.epoch, "lr": m.lr})
                   for m in report.members]
        return Sources("sse" if run.is_sse else "fge", config, members)

    configs = [run.read_config() for run in dirs]
    members = [_final_network(run, config) for run, config in zip(dirs, configs, strict=True)]
    first = configs[0]
    for run, config in zip(dirs[1:], configs[1:], strict=True):
        if config.model != first.model:
            raise UsageError(f"members must share one architecture: {dirs[0].path} is {first.model!r}, "
                             f"{run.path} is {config.model!r}")
        if config.data.dataset != first.data.dataset:
            raise UsageError(f"members must share one dataset: {dirs[0].path} is {first.data.dataset!r}, "
                             f"{run.path} is {config.data.dataset!r}")
    return Sources("independent", first, members)


def uint8_batches(data: SizedDataset, splits: DataSplits) -> Iterator[np.ndarray]:
    """A split in order, in batches of uint8 pixels (what a client sends)."""
    for batch, _ in make_batches(data, splits.info, 256, train=False):
        yield (batch * 255.0).round().to(torch.uint8).numpy()


def split_labels(data: SizedDataset, splits: DataSplits) -> np.ndarray:
    """A split's labels in the order `uint8_batches` gives its images."""
    return np.concatenate([labels.numpy() for _, labels in make_batches(data, splits.info, 256, train=False)])


def uint8_images(data: SizedDataset, splits: DataSplits, count: int) -> np.ndarray:
    """The first `count` images of a split as uint8 pixels."""
    images = []
    seen = 0
    for batch in uint8_batches(data, splits):
        images.append(batch)
        seen += batch.shape[0]
        if seen >= count:
            break
    return np.concatenate(images)[:count]


def endpoint_logits(sources: Sources, splits: DataSplits) -> tuple[np.ndarray, np.ndarray] | None:
    """Curves: the two endpoints' logits [N, 2, C] on the validation and test splits, each network with its own
    trained batch-norm statistics; None for other exports."""
    if not sources.endpoints:
        return None
    device = torch.device("cpu")
    networks = [endpoint.build(splits) for endpoint in sources.endpoints]
    return (np.stack([predict_logits(network, splits.val, splits, device)[0] for network in networks], axis=1),
            np.stack([predict_logits(network, splits.test, splits, device)[0] for network in networks], axis=1))
