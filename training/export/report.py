"""What an export reports: its metrics before and after calibration, the comparisons it measured, and the
version it published (printed as one JSON line by `valley-train export`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from artefact.manifest import (
    CascadeSpec,
    Manifest,
    Metrics,
    SetQuality,
)
from training.config import Precision


class CalibrationEffect(BaseModel):
    """One test metric of the ensemble before and after temperature scaling."""

    uncalibrated: float
    calibrated: float


class Comparison(BaseModel):
    """An ensemble or a network scored on the same images as the exported ensemble (probabilities averaged)."""

    name: str
    members: int
    test: Metrics
    val: Metrics


class VariantComparison(BaseModel):
    """A lower-precision variant beside the FP32 ensemble, both with the manifest's temperature, on both splits."""

    precision: Precision
    validation: Metrics
    validation_fp32: Metrics
    test: Metrics
    test_fp32: Metrics
    samples_difference: float = Field(description="largest |variant - FP32| of the fused graphs' sample "
                                      "probabilities")


class ExportReport(BaseModel):
    """What `valley-train export` prints (one JSON line): where the version went and what calibration did."""

    exported: Path
    members: int
    temperature: float
    test_nll: CalibrationEffect
    test_ece: CalibrationEffect
    comparison: list[Comparison] | None = Field(None, description="curves: the ensemble against its endpoints")
    cascade: CascadeSpec | None = Field(None, description="the anytime ensemble fitted on validation, with its "
                                        "validation and test figures")
    variants: list[VariantComparison] | None = Field(None, description="the lower-precision variants beside FP32")
    prediction_sets: dict[str, list[SetQuality]] | None = Field(None, description="per conformity score, its sets "
                                                                "on the test split at the measured coverages")
    plots: list[Path] | None = Field(None, description="the PNGs in the version folder: the test split's reliability "
                                     "diagram and risk-coverage curves")


@dataclass(frozen=True)
class Exported:
    """The version directory written, its manifest, (curves) the comparison with the endpoints, and the
    lower-precision variants beside FP32."""

    target: Path
    manifest: Manifest
    comparison: list[Comparison] | None = None
    variants: list[VariantComparison] | None = None
    plots: list[Path] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as `target, manifest`, as the earlier two-field tuple did."""
        return iter((self.target, self.manifest))

    def report(self) -> ExportReport:
        """The summary the CLI prints."""
        metrics = self.manifest.metrics
        return ExportReport(
            exported=self.target, members=len(self.manifest.members), temperature=self.manifest.temperature,
            test_nll=CalibrationEffect(uncalibrated=metrics.uncalibrated.nll, calibrated=metrics.calibrated.nll),
            test_ece=CalibrationEffect(uncalibrated=metrics.uncalibrated.ece, calibrated=metrics.calibrated.ece),
            comparison=self.comparison, cascade=self.manifest.cascade, variants=self.variants,
            prediction_sets={entry.score: entry.test for entry in self.manifest.conformal.scores}
            if self.manifest.conformal is not None else None,
            plots=self.plots or None,
        )
