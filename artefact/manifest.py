"""The ensemble artefact's manifest: the one contract between training and serving.

`ensembles/<name>/<version>/manifest.json` describes the ONNX files beside it. Training
writes it through this module and the server reads it through this module; neither side
has its own idea of the format. No torch here: the server never imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# Output names of every ensemble graph, in the order the fused graph returns them.
OUTPUTS = ("probabilities", "predicted_class", "confidence", "entropy", "mutual_information",
           "member_disagreement", "member_probabilities")


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


class ManifestError(Exception):
    """A manifest that cannot be used: missing, unreadable, of another schema version, or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A named tensor; datatypes use the Open Inference Protocol names (UINT8, FP32, INT64, BOOL)."""

    name: str
    datatype: Literal["UINT8", "FP32", "INT64", "BOOL"]
    shape: list[int] = Field(description="-1 for a variable dimension (the batch)")


class InputSpec(TensorSpec):
    """The graphs' one input: pixels; scaling and normalisation happen inside the graphs."""

    description: str
    mean: list[float]
    std: list[float]


class FileEntry(_Strict):
    file: str = Field(description="a file name in the version's folder: no path, nothing outside the folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        if not _FILE_NAME.fullmatch(value):
            raise ValueError(f"{value[:100]!r} is not a file name in the version's folder (a path, or a name "
                             "outside it)")
        return value


class Metrics(_Strict):
    """Quality of a network or an ensemble on one split; accuracy and ECE are fractions in [0, 1].

    The training library computes these (`artefact.metrics`) and the manifest records them: one model for both.
    """

    accuracy: float
    nll: float
    ece: float
    brier: float
    count: int


class Member(FileEntry):
    provenance: dict[str, Any] = Field(description="where the member comes from: run, epoch or t, lr")
    metrics: Metrics | None = Field(None, description="the member alone on the test split")


class EnsembleMetrics(_Strict):
    """Offline test-split quality of the whole ensemble, before and after temperature scaling."""

    uncalibrated: Metrics
    calibrated: Metrics


class Samples(_Strict):
    """A few inputs with the fused graph's expected probabilities, to check a load end to end."""

    inputs: list[Any] = Field(description="nested lists shaped like the input, batch first")
    probabilities: list[list[float]]
    tolerance: float = 1e-4


class CascadeQuality(_Strict):
    """One way of answering measured on one split: accuracy and ECE as fractions, NLL, members run per image."""

    accuracy: float
    nll: float
    ece: float
    members_per_image: float


class GainKept(_Strict):
    """The share of the full ensemble's lead over its best single member that the cascade keeps, per metric (1: all
    of it, 0: none, below 0: worse than that member); None where the full ensemble does not lead."""

    nll: float | None
    ece: float | None


class CascadeSpec(_Strict):
    """The anytime ensemble (`artefact.cascade`): exits after `stages[i]` members for images whose running ensemble's
    confidence is at least `thresholds[i]`. Fitted on the validation split within the tolerances; the test split
    only measures it."""

    stages: list[int] = Field(min_length=1)
    thresholds: list[float]
    rule: Literal["confidence"] = "confidence"
    max_nll_increase: float = Field(ge=0, description="relative to the full ensemble's NLL, on validation")
    max_accuracy_drop: float = Field(ge=0, description="absolute (a fraction), on validation")
    min_gain_kept: float | None = Field(None, ge=0, le=1, description="the share of the full ensemble's NLL and ECE "
                                       "lead over its best single member the cascade had to keep on validation "
                                       "(None: fitted before this bound existed)")
    validation: CascadeQuality
    validation_full: CascadeQuality
    test: CascadeQuality
    test_full: CascadeQuality
    gain_kept_validation: GainKept | None = None
    gain_kept_test: GainKept | None = None
    front: float | None = Field(None, gt=0, le=1, description="the confidence at which an image leaves with the "
                                "front network's answer (the manifest's `front`); None: no front answers")


class FrontSpec(FileEntry):
    """The cascade's front: one network of the members' architecture that answers before them (the weight average
    of the members, SWA, or a student distilled from them). Its graph takes the pixels and gives logits, as a
    member's does; it answers at its own temperature, fitted on the validation split."""

    method: Literal["swa", "distilled"]
    provenance: dict[str, Any] = Field(description="where the network comes from: its run and that run's source")
    temperature: float = Field(gt=0)
    validation: Metrics = Field(description="the network alone at its temperature on the validation split")
    test: Metrics = Field(description="the network alone at its temperature on the test split")
    sample_probabilities: list[list[float]] = Field(description="its probabilities for the samples' inputs, to "
                                                    "check its graph at load")


class QuantizationScheme(_Strict):
    """How an INT8 variant was quantized (onnxruntime's static quantization)."""

    format: Literal["qdq", "qoperator"] = "qdq"
    activations: Literal["uint8"] = "uint8"
    weights: Literal["int8", "uint8"] = "int8"
    weight_bits: Literal[7, 8] = Field(7, description="7: onnxruntime's reduce_range, so that no sum of two u8 x "
                                       "s8 products leaves 16 bits and the graph computes the same on CPUs with "
                                       "and without VNNI")
    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"


class ValidatedOn(_Strict):
    """The machine a variant's figures and samples were measured on (`artefact.cpu`)."""

    cpu: str = Field(description="the CPU's model name")
    cpu_features: list[str] = Field(description="its features that decide how 8-bit products are added "
                                    "(artefact.cpu.INT8_FEATURES); empty where the system does not list them")
    machine: str = Field(description="x86_64, aarch64, ...")
    onnxruntime: str = Field(description="the onnxruntime version whose kernels ran the graphs")


class Variant(_Strict):
    """The same ensemble at a lower precision: every member graph and the fused graph again, measured beside FP32.

    The server runs a variant when told to (`--precision`); the FP32 graphs stay the reference: the samples'
    probabilities are FP32's, and a variant reproduces them within its own `samples_tolerance`.
    """

    precision: Literal["int8", "fp16"]
    members: list[FileEntry] = Field(min_length=1, description="in the order of the manifest's members")
    fused: FileEntry
    method: str = Field(description="how the graphs were made, e.g. the quantization scheme and its calibration")
    validation: Metrics = Field(description="the whole ensemble (temperature applied) on the validation split")
    test: Metrics = Field(description="the whole ensemble (temperature applied) on the test split")
    samples_tolerance: float = Field(gt=0, description="largest difference from the samples' FP32 probabilities "
                                     "a load accepts")
    scheme: QuantizationScheme | None = Field(None, description="INT8: how it was quantized (None: FP16, or "
                                              "exported before the scheme was recorded)")
    validated_on: ValidatedOn | None = Field(None, description="where its figures and samples were measured (None: "
                                             "exported before this was recorded)")
    front: FileEntry | None = Field(None, description="the front network at this precision (where the manifest "
                                    "has one)")


class RiskCoverageCurve(_Strict):
    """One signal's risk-coverage curve on the validation split (`artefact.selective`): its points nearest above 101
    even coverages, each with the score threshold that keeps it, so a target accuracy that was not fitted at export
    can be read off it (at 1 % coverage resolution)."""

    signal: str
    area: float = Field(description="area under risk against coverage: lower ranks better")
    coverage: list[float]
    accuracy: list[float]
    thresholds: list[float] = Field(default_factory=list, description="empty in versions exported before they "
                                    "were stored: only the fitted targets can then be asked for")
    count: int = Field(0, ge=0, description="validation images the curve was measured on")

    @model_validator(mode="after")
    def _points(self) -> RiskCoverageCurve:
        if not len(self.coverage) == len(self.accuracy) >= 1 or len(self.thresholds) not in (0, len(self.coverage)):
            raise ValueError(f"curve {self.signal!r}: as many coverages and accuracies (and thresholds, if any) are "
                             "needed, at least one")
        return self


class AbstentionThreshold(_Strict):
    """The threshold on the chosen signal that meets a target accuracy, fitted on validation, measured on test."""

    target_accuracy: float
    threshold: float | None = Field(description="answer images scoring at least this; None: not reachable")
    validation_coverage: float
    validation_accuracy: float | None
    test_coverage: float
    test_accuracy: float | None = Field(description="None when the threshold answers no test image")


class SelectiveSpec(_Strict):
    """Selective prediction: the signal that ranks the ensemble's answers best on validation, its risk-coverage
    curves, and thresholds for target accuracies (fitted on validation with `margin` standard errors to spare)."""

    signal: str
    margin: float
    curves: list[RiskCoverageCurve]
    thresholds: list[AbstentionThreshold]
    default_target: float = Field(0.99, gt=0, le=1, description="the target accuracy of a request that names none")
    temperature: float | None = Field(None, gt=0, description="the temperature the signal and thresholds were "
                                      "fitted at, when it is not the manifest's (a recalibrated version)")

    @model_validator(mode="after")
    def _chosen(self) -> SelectiveSpec:
        if self.signal not in {curve.signal for curve in self.curves}:
            raise ValueError(f"selective: the chosen signal {self.signal!r} has no curve")
        return self

    def curve(self) -> RiskCoverageCurve:
        """The chosen signal's curve."""
        return next(curve for curve in self.curves if curve.signal == self.signal)


class DriftBaseline(_Strict):
    """The validation split's answers as `artefact.drift` compares live windows with them: each label-free signal's
    fraction of images per bin, the predicted-class fractions, and what clean windows of `window` answers score."""

    histograms: dict[str, list[float]]
    predicted: list[float]
    clean_level: float = Field(ge=0, description="99th percentile of the scores of bootstrap windows of validation")
    window: int = Field(ge=1)
    temperature: float | None = Field(None, gt=0, description="the temperature the histograms were taken at, when "
                                      "it is not the manifest's (a recalibrated version)")
    edges: dict[str, list[float]] | None = Field(None, description="each signal's bin edges, from validation "
                                                 "quantiles; None: the fixed bins of versions exported before")
    bin_accuracy: list[float] | None = Field(None, description="validation accuracy per confidence bin (the ECE "
                                             "bins): estimates accuracy without labels (`artefact.estimation`)")
    validation_accuracy: float | None = Field(None, ge=0, le=1, description="the validation split's accuracy at "
                                              "this temperature")


class SetQuality(_Strict):
    """Prediction sets at one coverage measured on the test split (fitted on validation only)."""

    coverage: float = Field(gt=0, le=1, description="the coverage asked for")
    marginal: float = Field(description="the share of test images whose set holds the true class")
    mean_size: float = Field(description="classes per set, on average")
    empty: float = Field(description="the share of empty sets")
    worst_class: float = Field(description="the lowest coverage of any one true class")
    worst_class_index: int = Field(ge=0)


class ConformalScore(_Strict):
    """One conformity score fitted on the validation split (`artefact.conformal`): its calibration scores, sorted,
    answer any coverage."""

    score: Literal["lac", "aps", "raps"]
    calibration: list[float] = Field(min_length=1, description="the validation images' scores of their true "
                                     "class, ascending")
    k_reg: int = Field(0, ge=0, description="RAPS: ranks up to this one carry no penalty")
    penalty: float = Field(0.0, ge=0, description="RAPS: the score added per rank past k_reg")
    test: list[SetQuality] = Field(default_factory=list)

    @field_validator("calibration")
    @classmethod
    def _sorted(cls, value: list[float]) -> list[float]:
        if any(b < a for a, b in pairwise(value)):
            raise ValueError("calibration scores must be sorted ascending")
        return value


class ConformalSpec(_Strict):
    """Split-conformal prediction sets: a set of classes holding the true class with the chosen probability."""

    scores: list[ConformalScore] = Field(min_length=1)
    default_score: Literal["lac", "aps", "raps"]
    default_coverage: float = Field(0.9, gt=0, le=1, description="the coverage of a request that names none")
    temperature: float | None = Field(None, gt=0, description="the temperature the scores were fitted at, when it "
                                      "is not the manifest's (a recalibrated version)")

    @model_validator(mode="after")
    def _default(self) -> ConformalSpec:
        names = [entry.score for entry in self.scores]
        if len(set(names)) != len(names) or self.default_score not in names:
            raise ValueError(f"conformal: one entry per score, the default {self.default_score!r} among them; got "
                             f"{names}")
        return self

    def entry(self, score: str) -> ConformalScore | None:
        return next((entry for entry in self.scores if entry.score == score), None)


class Recalibration(_Strict):
    """How a version came from another by a new temperature fitted on live labels (`service.control.recalibrate`).

    Its graphs are the parent's with the new temperature. Its offline figures (metrics, cascade, variants' metrics)
    are the parent's, measured at `parent_temperature`; its selective thresholds and drift baseline keep their
    fitted temperature, and the server scores them at it."""

    parent_version: int = Field(ge=1)
    parent_temperature: float = Field(gt=0)
    labels: int = Field(ge=1, description="labelled live predictions the temperature was fitted on")
    live_before: dict[str, float] = Field(description="nll, ece, accuracy of those predictions as served")
    live_after: dict[str, float] = Field(description="the same at the new temperature")
    created_by: str = Field("", description="the admin caller who applied it (a token's fingerprint)")


class Manifest(_Strict):
    schema_version: int
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(ge=1)
    created: datetime
    method: Literal["fge", "sse", "curve", "independent", "swa", "distilled", "external"]
    model: str = Field(description="the members' architecture, as named in the training registry")
    input: InputSpec
    outputs: list[TensorSpec]
    classes: list[str]
    members: list[Member] = Field(min_length=1)
    fused: FileEntry = Field(description="one graph running all members and the ensemble outputs")
    temperature: float = Field(gt=0)
    metrics: EnsembleMetrics
    samples: Samples
    cascade: CascadeSpec | None = Field(None, description="the fitted anytime ensemble; None: versions exported "
                                        "before cascades existed")
    variants: list[Variant] = Field(default_factory=list, description="the ensemble at lower precisions, if exported")
    selective: SelectiveSpec | None = Field(None, description="thresholds to abstain at a target accuracy; None: "
                                           "versions exported before selective prediction existed")
    drift: DriftBaseline | None = Field(None, description="the baseline of the label-free drift score; None: "
                                       "versions exported before it existed")
    recalibration: Recalibration | None = Field(None, description="set on a version made from another by a "
                                                "temperature fitted on live labels")
    front: FrontSpec | None = Field(None, description="a network that answers before the members where the "
                                    "cascade says so; None: the members answer every image")
    conformal: ConformalSpec | None = Field(None, description="prediction sets at any coverage; None: versions "
                                            "exported before they existed")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema_version {value} is not supported (this valley reads {SCHEMA_VERSION})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [output.name for output in self.outputs]
        if names != list(OUTPUTS):
            raise ValueError(f"outputs must be {list(OUTPUTS)}, got {names}")
        if len(self.samples.probabilities) != len(self.samples.inputs):
            raise ValueError("samples: as many expected probability rows as inputs are needed")
        if any(len(row) != len(self.classes) for row in self.samples.probabilities):
            raise ValueError(f"samples: every probability row must have {len(self.classes)} classes")
        if self.cascade is not None:
            stages = self.cascade.stages
            if stages[-1] != len(self.members) or any(b <= a for a, b in pairwise(stages)) \
                    or stages[0] < 1 or len(self.cascade.thresholds) != len(stages) - 1:
                raise ValueError(f"cascade: stages must rise from 1 to the {len(self.members)} members, with one "
                                 f"threshold per stage but the last; got {stages} and {self.cascade.thresholds}")
            if self.cascade.front is not None and self.front is None:
                raise ValueError("cascade: a front threshold needs the manifest's front network")
        if self.front is not None and len(self.front.sample_probabilities) != len(self.samples.inputs):
            raise ValueError("front: one sample probability row per sample input is needed")
        precisions = [variant.precision for variant in self.variants]
        if len(set(precisions)) != len(precisions):
            raise ValueError(f"variants: one per precision, got {precisions}")
        if any(len(variant.members) != len(self.members) for variant in self.variants):
            raise ValueError(f"variants: every variant holds all {len(self.members)} members")
        if any((variant.front is None) != (self.front is None) for variant in self.variants):
            raise ValueError("variants: every variant holds the front network where the manifest has one, and only "
                             "then")
        return self

    def temperature_ratio(self, fitted: float | None) -> float:
        """This version's temperature over `fitted`, the one something was fitted at (None: at this one)."""
        return 1.0 if fitted is None else self.temperature / fitted

    def variant(self, precision: str) -> Variant | None:
        """The variant of this precision; None when it was not exported."""
        return next((variant for variant in self.variants if variant.precision == precision), None)

    def files(self) -> list[FileEntry]:
        variants = [entry for variant in self.variants
                    for entry in (*variant.members, variant.fused, *([variant.front] if variant.front else []))]
        return [*self.members, self.fused, *([self.front] if self.front else []), *variants]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(version_dir: Path) -> Manifest:
    """Read and validate `version_dir/manifest.json`; any problem is a `ManifestError`."""
    path = version_dir / MANIFEST_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ManifestError(f"{path} does not exist") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path} is not readable JSON: {error}") from error
    if isinstance(payload, dict) and payload.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {payload.get('schema_version')!r} is not supported "
                            f"(this valley reads {SCHEMA_VERSION}); export the ensemble again")
    try:
        return Manifest.model_validate(payload)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise ManifestError(f"{path} is not a valid manifest: {problems}") from error


def verify_files(manifest: Manifest, version_dir: Path) -> None:
    """Check every file the manifest names exists and has its recorded sha256."""
    folder = version_dir.resolve()
    for entry in manifest.files():
        path = version_dir / entry.file
        if not path.is_file():
            raise ManifestError(f"{path} is named in the manifest but missing")
        if path.resolve().parent != folder:
            raise ManifestError(f"{path} is a link to a file outside the version's folder; a version holds its files")
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise ManifestError(f"{path} has sha256 {actual}, the manifest says {entry.sha256}: the file changed")


def write_manifest(manifest: Manifest, version_dir: Path) -> None:
    (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
