"""Resolved run configurations; saved as config.json beside every run's outputs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: DataConfig = Field(default_factory=DataConfig)
    model: str = "cnn"
    epochs: int = Field(40, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    save_epochs: list[int] = Field(default_factory=list, description="Epochs whose checkpoint is kept.")


class FGEConfig(BaseModel):
    """Fast Geometric Ensembling from a base run's checkpoint."""

    model_config = ConfigDict(extra="forbid")

    base_run: Path
    start_epoch: int
    cycles: int = Field(ge=1)
    cycle_epochs: int = Field(ge=1)
    lr1: float = Field(gt=0)
    lr2: float = Field(gt=0)
    seed: int = 0
    device: str = "auto"
