"""The run directory of `valley-train train`, `fge`, `sse` and `curve`: where every file lives, and the typed reports.

This module is the only one that knows the layout (docs/training.md, "What a run directory holds");
`training.checkpoint` does the atomic writing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from artefact.manifest import Metrics
from training import checkpoint
from training.config import CurveRunConfig, DistillRunConfig, FGERunConfig, SSERunConfig, SWARunConfig, TrainConfig
from training.errors import UsageError

REPORT_FORMAT: Final = "valley.report/1"

_CONFIG = "config.json"
_LOG = "log.jsonl"
_CHECKPOINTS = "checkpoints"
_LAST = "last.pt"
_SNAPSHOTS = "snapshots"
_REPORT = "report.json"
_NETWORK = "network.pt"
_PLOT = "plots/ensemble_size.png"
_CURVE_PLOT = "plots/curve.png"


# --------------------------------------------------------------------------- reports (report.json)


class _Report(BaseModel):
    # Readers ignore keys they do not know: new keys may be added while `format` stays the same.
    model_config = ConfigDict(extra="ignore")


class DatasetSummary(_Report):
    name: str
    classes: list[str]
    train: int
    val: int
    test: int
    preprocessing: dict[str, Any] = Field(description="the evaluation preprocessing, `DatasetInfo.preprocessing()`")


class ModelSummary(_Report):
    name: str
    parameters: int


class TrainReport(_Report):
    """report.json of a base run: its configuration, data, and the final network's metrics."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["train"] = "train"
    config: TrainConfig
    dataset: DatasetSummary
    model: ModelSummary
    device: str
    epochs: int
    train_seconds_this_process: float
    train_seconds_total: float
    val: Metrics | None = Field(description="null when the run holds out no validation images")
    test: Metrics


class _OmitsMissingVal(_Report):
    @model_serializer(mode="wrap")
    def _omit_missing_val(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Members and ensembles have always left `val` out, rather than writing null, without a validation split.
        data: dict[str, Any] = handler(self)
        if data.get("val") is None:
            data.pop("val", None)
        return data


class FGEMember(_OmitsMissingVal):
    """One snapshot: where it is and when in training it was taken, then its metrics alone."""

    index: int
    file: str = Field(description="relative to the FGE run directory, e.g. snapshots/member-00.pt")
    epoch: float = Field(description="fractional epoch, counted from the base run's start, after the snapshot step")
    cycle: int
    lr: float | None
    test: Metrics
    val: Metrics | None = None


class FGEEnsemble(_OmitsMissingVal):
    """The ensemble of members 0..size-1 (probabilities averaged)."""

    size: int
    test: Metrics
    val: Metrics | None = None


class SingleNetwork(_Report):
    """The base run's own network at its full budget: FGE's equal-budget competitor; from weights trained elsewhere,
    the starting network (`run` is the weight file)."""

    run: Path
    epochs: int
    test: Metrics
    val: Metrics | None
    trained_elsewhere: bool = False


class StartPoint(_Report):
    epoch: int
    weights: Path | None = Field(None, description="the weight file FGE started from, when no base run")


class FGEReport(_Report):
    """report.json of an FGE run: every member and every ensemble prefix, next to the single network."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["fge"] = "fge"
    config: FGERunConfig
    single: SingleNetwork | None = Field(description="null when the base run has no report (unfinished)")
    start: StartPoint
    members: list[FGEMember]
    ensembles: list[FGEEnsemble]
    device: str
    train_seconds_this_process: float
    train_seconds_total: float
    evaluation_seconds: float


class SSEReport(_Report):
    """report.json of a snapshot ensemble: every snapshot (one per cosine cycle) and every ensemble prefix."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["sse"] = "sse"
    config: SSERunConfig
    dataset: DatasetSummary
    model: ModelSummary
    members: list[FGEMember]
    ensembles: list[FGEEnsemble]
    device: str
    train_seconds_this_process: float
    train_seconds_total: float
    evaluation_seconds: float


class SWAReport(_Report):
    """report.json of an SWA run: the averaged network's metrics beside the snapshots' ensemble it stands for."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["swa"] = "swa"
    config: SWARunConfig
    file: str = Field(description="the averaged network, relative to the run directory")
    batch_norm_images: int = Field(description="training images its batch-norm statistics average over (0: none)")
    ensemble: FGEEnsemble = Field(description="the ensemble of the same snapshots, from the source run's report")
    test: Metrics
    val: Metrics | None
    device: str
    seconds: float


class DistillReport(_Report):
    """report.json of a distilled student: its metrics beside its teacher's, the ensemble it learned from."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["distilled"] = "distilled"
    config: DistillRunConfig
    file: str = Field(description="the student network, relative to the run directory")
    teacher: FGEEnsemble = Field(description="the teacher ensemble, from its run's report")
    test: Metrics
    val: Metrics | None
    device: str
    train_seconds_this_process: float
    train_seconds_total: float


class Endpoint(_Report):
    """One end of a curve: the base run and its trained network's own metrics (its batch-norm statistics)."""

    run: Path
    epochs: int
    test: Metrics
    val: Metrics | None


class CurveSide(_Report):
    """A network at one t (batch norm recomputed): training-split loss and error, and its test and val metrics."""

    train_loss: float
    train_error: float
    test: Metrics
    val: Metrics | None


class CurvePoint(_Report):
    """One t, on the trained curve and on the straight line between the same endpoints."""

    t: float
    curve: CurveSide
    line: CurveSide


class CurveEvaluation(_Report):
    """`valley-train curve-eval`: the curve and the line at evenly spaced t, and their worst test error."""

    points: list[CurvePoint]
    endpoint_test_error: list[float] = Field(description="test error at t = 0 and t = 1, batch norm recomputed")
    curve_max_test_error: float
    line_max_test_error: float
    batch_norm_images: int = Field(description="training images each point's batch-norm statistics average over")
    evaluation_seconds: float


class CurveReport(_Report):
    """report.json of a curve run: training, the endpoints, and (after curve-eval) the evaluation along t."""

    format: Literal["valley.report/1"] = REPORT_FORMAT
    kind: Literal["curve"] = "curve"
    config: CurveRunConfig
    start: Endpoint | None = Field(description="null when the start run has no report")
    end: Endpoint | None
    parameters: int = Field(description="of the network; the curve trains bends x parameters")
    device: str
    train_seconds_this_process: float
    train_seconds_total: float
    evaluation: CurveEvaluation | None = None


ReportT = TypeVar("ReportT", TrainReport, FGEReport, SSEReport, SWAReport, DistillReport, CurveReport)


# --------------------------------------------------------------------------- the directory


def snapshot_name(index: int) -> str:
    """The file of FGE member `index`, relative to its run directory, as reports and provenance record it."""
    return f"{_SNAPSHOTS}/member-{index:02d}.pt"


@dataclass(frozen=True)
class RunDir:
    """A base, FGE or curve run directory: its files, and its configuration and report read and written typed."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / _CONFIG

    @property
    def log_file(self) -> Path:
        """One JSON line per epoch."""
        return self.path / _LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / _CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """Rewritten after every epoch; what `--resume` continues from."""
        return self.checkpoints / _LAST

    def epoch_checkpoint(self, epoch: int) -> Path:
        """The kept checkpoint of `epoch` (absolute, counted from the base run's start)."""
        return self.checkpoints / f"epoch-{epoch:03d}.pt"

    def final_checkpoint(self, config: TrainConfig) -> Path:
        """A base run's checkpoint at the end of its budget; a `UsageError` saying how to finish the run if absent."""
        final = self.epoch_checkpoint(config.epochs)
        if not final.is_file():
            raise UsageError(f"{self.path} has no final checkpoint ({final.name}): finish the run with "
                             "`valley-train train ... --resume` first")
        return final

    def remove_temporaries(self) -> None:
        """Delete the half-written temporaries that killed processes left here (nothing reads them)."""
        for folder in (self.path, self.checkpoints, self.snapshots):
            checkpoint.remove_temporaries(folder)

    def available_epochs(self) -> list[int]:
        """The epochs that have a kept checkpoint, in order."""
        return sorted(int(path.stem.split("-")[1]) for path in self.checkpoints.glob("epoch-*.pt"))

    @property
    def snapshots(self) -> Path:
        return self.path / _SNAPSHOTS

    def snapshot(self, index: int) -> Path:
        return self.path / snapshot_name(index)

    @property
    def has_snapshots(self) -> bool:
        """FGE and SSE runs hold snapshots, the ensemble's members."""
        return self.snapshots.is_dir()

    def _method(self) -> object:
        """The `method` of runs that record one in their configuration (SSE, SWA, distilled), else None."""
        return self._config_payload().get("method") if self.config_file.is_file() else None

    @property
    def is_sse(self) -> bool:
        """Snapshot ensembles are told by their configuration's method."""
        return self._method() == "sse"

    @property
    def is_fge(self) -> bool:
        return self.has_snapshots and not self.is_sse

    @property
    def is_swa(self) -> bool:
        return self._method() == "swa"

    @property
    def is_distilled(self) -> bool:
        return self._method() == "distilled"

    @property
    def network_file(self) -> Path:
        """SWA (and distilled) runs: the one network they made."""
        return self.path / _NETWORK

    def require_run(self) -> None:
        """A `UsageError` naming the path unless it is a valley run directory (it has a configuration)."""
        if not self.config_file.is_file():
            what = "does not exist" if not self.path.exists() else f"holds no {_CONFIG}"
            raise UsageError(f"{self.path} {what}: it is not a valley run directory")

    @property
    def is_base(self) -> bool:
        """A run of `valley-train train`: the start of FGE, of curves and of SSE's comparison."""
        return self.config_file.is_file() and not self.has_snapshots and not self.is_curve and self._method() is None

    @property
    def kind_in_words(self) -> str:
        """"a base", "an FGE", "a snapshot-ensemble (SSE)", "an SWA", "a distilled" or "a curve": for messages
        that refuse a run."""
        if self.is_curve:
            return "a curve"
        if self.is_swa:
            return "an SWA"
        if self.is_distilled:
            return "a distilled"
        if self.is_sse:
            return "a snapshot-ensemble (SSE)"
        return "an FGE" if self.has_snapshots else "a base"

    @property
    def is_curve(self) -> bool:
        """Curve runs are told by their configuration, which names two endpoints."""
        return self.config_file.is_file() and "end_run" in self._config_payload()

    @property
    def report_file(self) -> Path:
        """Written when the run is finished."""
        return self.path / _REPORT

    @property
    def plot_file(self) -> Path:
        """FGE: test error and NLL against ensemble size."""
        return self.path / _PLOT

    @property
    def curve_plot_file(self) -> Path:
        """Curves: training loss and test error along t, on the curve and on the line."""
        return self.path / _CURVE_PLOT

    def read_config(self) -> TrainConfig:
        """The training configuration of a base run, or of the base run an FGE or curve run started from."""
        if not self.config_file.is_file():
            raise UsageError(f"{self.path} is not a run directory (no {_CONFIG}): "
                             "pass the --out of `valley-train train`")
        payload = self._config_payload()
        try:
            return TrainConfig.model_validate(payload.get("base", payload))
        except ValidationError as error:
            raise UsageError(f"{self.config_file} is not a run configuration valley can read: "
                             f"{error.errors()[0]['msg']}") from error

    def _config_payload(self) -> dict[str, Any]:
        """config.json as a JSON object; anything else is a `UsageError` naming the file."""
        try:
            payload = json.loads(self.config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{self.config_file} cannot be read as JSON ({error}): is it a valley run?") from error
        if not isinstance(payload, dict):
            raise UsageError(f"{self.config_file} holds no JSON object: is it a valley run?")
        return payload

    def read_curve_config(self) -> CurveRunConfig:
        """The resolved configuration of a curve run."""
        if not self.is_curve:
            raise UsageError(f"{self.path} is not a curve run: pass the --out of `valley-train curve`")
        try:
            return CurveRunConfig.model_validate(self._config_payload())
        except ValidationError as error:
            raise UsageError(f"{self.config_file} is not a curve configuration valley can read: "
                             f"{error.errors()[0]['msg']}") from error

    def write_config(self, config: TrainConfig | FGERunConfig | SSERunConfig | SWARunConfig | DistillRunConfig
                     | CurveRunConfig) -> None:
        """Save the resolved configuration beside the run's outputs (creating the directory)."""
        self.path.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(self.config_file, config.model_dump(mode="json"))

    def read_report(self, model: type[ReportT]) -> ReportT:
        """The run's report.json as a `TrainReport`, `FGEReport`, `SSEReport` or `CurveReport` (check `report_file`
        exists first)."""
        return model.model_validate_json(self.report_file.read_text())

    def read_snapshot_report(self) -> FGEReport | SSEReport:
        """The report of an FGE or SSE run (`has_snapshots`; check `report_file` exists first)."""
        return self.read_report(SSEReport) if self.is_sse else self.read_report(FGEReport)

    def write_report(self, report: TrainReport | FGEReport | SSEReport | SWAReport | DistillReport | CurveReport
                     ) -> None:
        # Through `json`, as ever, so report.json stays byte-compatible (float spelling, ASCII escapes).
        checkpoint.write_json(self.report_file, report.model_dump(mode="json"))
