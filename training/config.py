"""Run configurations: what a user asks for, and the resolved form saved as config.json beside a run's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The lower precisions an ensemble can also be exported at (`training.quantize`).
Precision = Literal["int8", "fp16"]


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str = "fashion-mnist"
    data_dir: Path | None = Field(None, description="Folder holding the dataset; each dataset has a default.")
    download: bool = Field(False, description="Allow torchvision to download CIFAR (never implicit).")
    val_size: int | None = Field(None, description="Training images held out for validation.")
    subset: int | None = Field(None, description="Use at most this many images of each split (smoke runs).")
    image_size: int = Field(224, description="Side of the square crop, for imagefolder only.")
    batch_size: int = 128
    workers: int = Field(0, description="DataLoader worker processes (imagefolder only).")


class TrainConfig(BaseModel):
    """Training of one network with the paper's base schedule."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    data: DataConfig = Field(default_factory=DataConfig)
    model: str = "cnn"
    epochs: int = Field(40, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    save_epochs: list[int] = Field(default_factory=list, description="Epochs whose checkpoint is kept.")
    init: Path | None = Field(None, description="Start from these weights (a state_dict file) instead of random "
                              "ones (`training.init`).")
    reset_head: bool = Field(False, description="With `init`: leave the classifier head as initialised.")


def fge_start_epoch(epochs: int) -> int:
    """The epoch FGE starts from by default: 80% of the base budget (a base run always keeps its checkpoint)."""
    return max(1, round(0.8 * epochs))


class FGEConfig(BaseModel):
    """Fast Geometric Ensembling from a base run, as asked for; None means "derive it from the base run".

    No bounds are checked here: `training.fge` checks them once the base run is read, so that a wrong
    `--from` is reported before anything else, and in the words the CLI has always used.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_run: Path | None = Field(None, description="The base run to start from; None: `init` is.")
    init: TrainConfig | None = Field(None, description="Start from weights trained elsewhere instead of a base run: "
                                     "the data, model, weight file (`init`) and optimiser the cycles use.")
    start_epoch: int | None = Field(None, description="Base checkpoint to start from; default 80% of its budget.")
    cycles: int | None = Field(None, description="Number of cycles K; default: the rest of the base budget (4 from "
                               "weights).")
    cycle_epochs: int = Field(2, description="Cycle length c in epochs.")
    lr1: float = Field(0.01, description="High learning rate, at the cycle's ends.")
    lr2: float = Field(0.0005, description="Low learning rate, at the snapshot.")
    seed: int | None = Field(None, description="Batch-order seed; default: the base run's.")
    device: str = "auto"


class FGERunConfig(BaseModel):
    """An FGE run's resolved configuration, every default filled in, with the base run's own configuration (from
    weights: the configuration the cycles train with, its `init` the weight file)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_run: Path | None
    start_epoch: int = Field(ge=0, description="0 from weights trained elsewhere")
    cycles: int = Field(ge=1)
    cycle_epochs: int = Field(ge=1)
    lr1: float = Field(gt=0)
    lr2: float = Field(gt=0)
    seed: int
    device: str
    base: TrainConfig


class SSERunConfig(BaseModel):
    """A snapshot ensemble (Huang et al. 2017) trained from scratch: `base` is the training (data, model, budget,
    lr0 of the cosine cycles, seed), split into `cycles` cosine cycles of `cycle_epochs`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["sse"] = "sse"
    cycles: int = Field(ge=1)
    cycle_epochs: int = Field(ge=1)
    base: TrainConfig

    @model_validator(mode="after")
    def _whole_cycles(self) -> SSERunConfig:
        if self.cycles * self.cycle_epochs != self.base.epochs:
            raise ValueError(f"{self.cycles} cycles of {self.cycle_epochs} epochs are not the budget of "
                             f"{self.base.epochs} epochs")
        return self


class SWARunConfig(BaseModel):
    """Stochastic weight averaging of an FGE or SSE run's snapshots: which run, which members, and that run's
    training (data, model) under `base`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["swa"] = "swa"
    source_run: Path
    members: list[int] = Field(min_length=1, description="the snapshots averaged, by index")
    device: str = "auto"
    base: TrainConfig


class DistillRunConfig(BaseModel):
    """A student trained on an FGE or SSE ensemble's probabilities: the teacher run and its members, the
    distillation temperature, and the student's own training under `base` (the teacher's data and architecture)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["distilled"] = "distilled"
    teacher_run: Path
    members: list[int] = Field(min_length=1, description="the teacher's snapshots, by index")
    temperature: float = Field(gt=0, le=100, description="of the teacher's and the student's softmax in the loss")
    hard_label_weight: float = Field(0.0, ge=0, le=1, description="share of the loss that is the cross-entropy "
                                     "with the true labels (0: the ensemble's probabilities alone)")
    base: TrainConfig


CurveKind = Literal["bezier", "polychain"]


class CurveConfig(BaseModel):
    """A curve between two finished base runs (or weight files), as asked for; None means "take it from the start
    run"."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start_run: Path = Field(description="A base run directory, or a weight file (`training.init`).")
    end_run: Path
    base: TrainConfig | None = Field(None, description="Where both endpoints are weight files: the model and data "
                                     "they are for (its `epochs` the budget, unless `epochs` is given).")
    curve: CurveKind = "bezier"
    # Each bend is a full copy of the network's parameters, trained: a handful is what the paper uses.
    bends: int = Field(1, ge=1, le=32, description="Control points between the endpoints.")
    epochs: int | None = Field(None, ge=1, description="Budget; default: the start run's.")
    lr: float = Field(0.03, gt=0, description="Initial learning rate of the base schedule.")
    momentum: float | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0, description="L2 on w(t) in the loss; default: the start run's.")
    seed: int = 0
    device: str = "auto"


class CurveRunConfig(BaseModel):
    """A curve run's resolved configuration, with the start run's own configuration (data, model) as `base`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    start_run: Path
    end_run: Path
    curve: CurveKind
    bends: int = Field(ge=1, le=32)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    seed: int
    device: str
    base: TrainConfig


class ExternalSource(BaseModel):
    """ONNX classifiers trained elsewhere, packaged as an ensemble (`training.export.external`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    graphs: list[Path] = Field(min_length=1, max_length=64)
    data: DataConfig = Field(description="The dataset whose validation split the export fits on.")
    outputs: Literal["logits", "probabilities"] = Field("logits", description="What the graphs' output holds.")
    input_mean: list[float] | None = Field(None, description="Where the graphs take normalised float images: the "
                                           "per-channel mean of [0, 1] pixels they subtract...")
    input_std: list[float] | None = Field(None, description="...and the std they divide by.")

    @model_validator(mode="after")
    def _normalisation(self) -> ExternalSource:
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("--input-mean and --input-std come together")
        if self.input_mean is not None and self.input_std is not None:
            if len(self.input_mean) != len(self.input_std):
                raise ValueError(f"--input-mean has {len(self.input_mean)} values and --input-std "
                                 f"{len(self.input_std)}: one per channel each")
            if any(value <= 0 for value in self.input_std):
                raise ValueError(f"--input-std values must be positive, got {self.input_std}")
        return self


class ExportConfig(BaseModel):
    """Export of an ensemble: one FGE run's snapshots, points of one curve run, the final networks of base runs, or
    ONNX classifiers trained elsewhere (`onnx`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    runs: list[Path] = Field(default_factory=list)
    onnx: ExternalSource | None = Field(None, description="ONNX graphs in place of runs.")
    name: str = Field(description="Ensemble name in the model repository.")
    repository: Path = Field(description="Model repository directory.")
    version: int | None = Field(None, description="Version number; default: the next free one.")
    overwrite: bool = Field(False, description="Replace an existing version directory.")
    points: list[float] | None = Field(None, min_length=1, max_length=256, description="Curve runs: each member's t.")
    num_points: int | None = Field(None, ge=1, le=256, description="Curve runs: K members at evenly spaced t.")
    front: Path | None = Field(None, description="An SWA or distilled run whose network answers before the members "
                               "where the cascade fit finds that it pays.")
    member_order: Literal["best-first", "as-trained"] = Field("best-first", description="The members' order: by "
                                                              "validation NLL, best first, or as trained.")
    cascade_nll_tolerance: float = Field(0.01, ge=0, le=1, description="The anytime ensemble's validation NLL may "
                                         "exceed the full ensemble's by this fraction.")
    cascade_accuracy_tolerance: float = Field(0.001, ge=0, le=1, description="...and its validation accuracy may "
                                              "fall below it by this much (a fraction: 0.001 is 0.1 point).")
    cascade_min_gain_kept: float = Field(0.9, ge=0, le=1, description="...and it keeps at least this share of the "
                                         "full ensemble's validation NLL and ECE lead over its best single member "
                                         "(otherwise every member serves).")
    precisions: list[Precision] = Field(default_factory=list, description="Also export every graph at "
                                                      "these lower precisions (the manifest's variants).")
    variant_nll_tolerance: float = Field(0.02, ge=0, description="A variant's validation NLL may exceed the FP32 "
                                         "ensemble's by this fraction (or by 0.001, whichever is more); otherwise the "
                                         "export fails.")
    variant_accuracy_tolerance: float = Field(0.005, ge=0, le=1, description="...and its validation accuracy may "
                                              "fall below FP32's by this much (a fraction: 0.005 is 0.5 point).")

    target_accuracies: list[float] = Field([0.95, 0.97, 0.99], min_length=1, max_length=32, description="Selective "
                                           "prediction: fit an abstention threshold for each target accuracy.")
    default_target_accuracy: float = Field(0.99, gt=0, le=1, description="The target accuracy of a request that "
                                           "names none (one of the target accuracies).")
    conformal_score: Literal["lac", "aps", "raps"] = Field("lac", description="Prediction sets: the conformity "
                                                          "score a request that names none gets (every score is "
                                                          "fitted).")
    coverage: float = Field(0.9, gt=0, le=1, description="Prediction sets: the coverage a request that names none "
                            "gets.")

    @field_validator("target_accuracies")
    @classmethod
    def _targets(cls, value: list[float]) -> list[float]:
        if any(not 0 < target <= 1 for target in value):
            raise ValueError(f"target accuracies are in (0, 1], got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _default_target(self) -> ExportConfig:
        if bool(self.runs) == (self.onnx is not None):
            raise ValueError("export takes runs (--from) or ONNX graphs (--onnx), one of them")
        if self.onnx is not None and (self.front is not None or self.points or self.num_points):
            raise ValueError("--front, --points and --num-points apply to exports of runs, not of --onnx graphs")
        if self.default_target_accuracy not in self.target_accuracies:
            raise ValueError(f"the default target accuracy {self.default_target_accuracy} must be one of the target "
                             f"accuracies {self.target_accuracies}")
        return self

    @field_validator("precisions")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each precision once, got {value}")
        return value
