"""Recalibration from feedback: a temperature fitted on the live labels, and a version that applies it.

`suggest` refits the temperature on a version's last labelled live predictions (the fleet's,
from a database feedback store, or one server's calibration window), with the fit export runs
on the validation split (`artefact.calibration`). The members' served probabilities stand in for
their logits: log p is the logits over the serving temperature less a constant per member, and
the fit does not see such constants. It reports the window's NLL, ECE and accuracy as served and
at the suggested temperature.

`publish` applies a temperature the way every version change happens: a new version folder in
the repository, so the change is audited (the manifest's `recalibration` says where it came from
and why), reversible (the parent stays on disk; a version policy can pin it again) and survives
restarts. The new version holds the parent's member graphs (hard links where the file system
allows), its fused graphs with the new temperature written in, and sample outputs recomputed from
the FP32 member graphs at the new temperature, so the load's sample check verifies the rewritten
graphs against an independent computation. It is written under a hidden name and renamed into
place: the repository never sees half a version. Loading, verifying and swapping are the
repository's, as for any version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from artefact.calibration import fit_temperature
from artefact.manifest import (
    FileEntry,
    FrontSpec,
    Manifest,
    ManifestError,
    Recalibration,
    load_manifest,
    sha256_of,
    write_manifest,
)
from artefact.metrics import accuracy, ece, nll
from artefact.repository import RECALIBRATING, next_version, staging_folder
from artefact.repository import publish as publish_version
from artefact.uncertainty import LOG_FLOOR, outputs_at, softmax, with_front
from service.core.ensemble import create_session
from service.errors import LoadFailed
from service.feedback import LabelledWindow

_ATTEMPTS = 3
TEMPERATURE_INITIALIZER = "temperature"
"""The fused graphs' scalar the member logits are divided by (training's FusedEnsemble buffer)."""


@dataclass(frozen=True)
class Suggestion:
    """A temperature fitted on a window of labelled live predictions, and what it does to them."""

    labels: int
    temperature: float
    """The temperature the predictions were served at."""
    suggested: float
    current_metrics: dict[str, float]
    """nll, ece and accuracy of the window as served."""
    suggested_metrics: dict[str, float]
    """The same at the suggested temperature."""


def quality(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """nll, ece and accuracy of probabilities [N, C] against labels [N], as the calibration window scores them
    (`artefact.calibration`'s bins, the same log floor)."""
    probabilities = probabilities.astype(np.float64)
    return {"nll": nll(probabilities, labels), "ece": ece(probabilities, labels),
            "accuracy": accuracy(probabilities, labels)}


def _at(window: LabelledWindow, served: float, temperature: float) -> np.ndarray:
    """The ensemble's probabilities at `temperature` of the window's predictions, served at `served`."""
    probabilities: np.ndarray = outputs_at(window.members, window.used, served / temperature,
                                           window.probabilities)["probabilities"]
    return probabilities


def lock_name(model: str) -> str:
    """The feedback store's lock every publisher of a recalibrated version of `model` holds: the Recalibrate RPC of
    any replica and valley-recalibrate."""
    return f"valley:recalibrate:{model}"


def suggest(window: LabelledWindow, temperature: float) -> Suggestion | None:
    """The temperature that minimises the NLL of the window (served at `temperature`); None while it is empty. An
    image the front network answered counts as one network's answer: the one temperature scales it and the members
    alike, as the new version's front temperature is scaled with the members' (`publish`)."""
    if not len(window.labels):
        return None
    members, used = with_front(window.members, window.used, window.probabilities)
    member_logits = np.log(np.maximum(members.astype(np.float64), LOG_FLOOR)) * temperature
    suggested = fit_temperature(member_logits, window.labels, used)
    return Suggestion(len(window.labels), temperature, suggested,
                      quality(_at(window, temperature, temperature), window.labels),
                      quality(_at(window, temperature, suggested), window.labels))


def live_metrics(window: LabelledWindow, served: float, temperature: float) -> dict[str, float]:
    """nll, ece and accuracy of the window (served at `served`) at `temperature`."""
    return quality(_at(window, served, temperature), window.labels) if len(window) else {}


def applied(suggestion: Suggestion, window: LabelledWindow, served: float, temperature: float | None
            ) -> tuple[float, dict[str, float]]:
    """The temperature a recalibration applies (`temperature`, or the suggested one for None or 0) and the window's
    metrics at it (served at `served`): what the new version's manifest records as `live_after`."""
    chosen = temperature or suggestion.suggested
    if chosen == suggestion.suggested:
        return chosen, suggestion.suggested_metrics
    return chosen, live_metrics(window, served, chosen)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _with_temperature(source: Path, target: Path, temperature: float) -> str:
    """Copy a fused graph with its temperature replaced (in the graph's own precision); its new sha256."""
    try:
        model = onnx.load(str(source))
    except Exception as error:  # onnx's own errors: the file changed under the serving version
        raise LoadFailed(f"{source.name} is not a readable ONNX graph any more: {error}") from error
    found = [tensor for tensor in model.graph.initializer if tensor.name == TEMPERATURE_INITIALIZER]
    if len(found) != 1:
        raise LoadFailed(f"{source.name} has no scalar initializer {TEMPERATURE_INITIALIZER!r} to rewrite (a graph "
                         "not exported by valley-train export): recalibrate it by exporting again")
    old = numpy_helper.to_array(found[0])
    found[0].CopyFrom(numpy_helper.from_array(np.asarray(temperature, dtype=old.dtype).reshape(old.shape),
                                              TEMPERATURE_INITIALIZER))
    onnx.save(model, str(target))
    return sha256_of(target)


def _samples(manifest: Manifest, directory: Path, temperature: float) -> list[list[float]]:
    """The samples' probabilities at `temperature`, from the FP32 member graphs run here on the CPU."""
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    try:
        logits = np.stack([create_session(directory / member.file, "cpu").run(None, {manifest.input.name: pixels})[0]
                           for member in manifest.members], axis=1)  # [N, K, C]
    except Exception as error:  # onnxruntime's own errors: the files changed under the serving version
        raise LoadFailed(f"the member graphs of {manifest.name} version {manifest.version} did not run: {error}") \
            from error
    probabilities: np.ndarray = softmax(logits.astype(np.float64) / temperature).mean(axis=1)
    return [[float(p) for p in row] for row in probabilities]


def _front_at(manifest: Manifest, directory: Path, temperature: float) -> FrontSpec | None:
    """The front network of a version recalibrated to `temperature`: its own temperature scaled by the same ratio as
    the members' (what `suggest` fitted), its samples' probabilities recomputed from its graph."""
    front = manifest.front
    if front is None:
        return None
    scaled = front.temperature * temperature / manifest.temperature
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    try:
        logits = create_session(directory / front.file, "cpu").run(None, {manifest.input.name: pixels})[0]
    except Exception as error:  # onnxruntime's own errors: the file changed under the serving version
        raise LoadFailed(f"the front graph of {manifest.name} version {manifest.version} did not run: {error}") \
            from error
    probabilities = softmax(logits.astype(np.float64) / scaled)
    return front.model_copy(update={"temperature": scaled,
                                    "sample_probabilities": [[float(p) for p in row] for row in probabilities]})


def publish(parent_dir: Path, temperature: float, suggestion: Suggestion, after: dict[str, float],
            caller: str = "") -> Path:
    """Write a new version of the ensemble in `parent_dir` with `temperature` (`after`: what it does to the live
    labels); returns its folder."""
    try:
        parent = load_manifest(parent_dir)
    except ManifestError as error:
        raise LoadFailed(f"the serving version's manifest can no longer be read, so it cannot be recalibrated: "
                         f"{error}") from error
    folder = parent_dir.parent
    staging = staging_folder(folder, RECALIBRATING)
    try:
        fused_files = {parent.fused.file, *(variant.fused.file for variant in parent.variants)}
        for entry in parent.files():
            if entry.file not in fused_files:
                _link_or_copy(parent_dir / entry.file, staging / entry.file)
        rewritten = {name: FileEntry(file=name, sha256=_with_temperature(parent_dir / name, staging / name,
                                                                         temperature))
                     for name in sorted(fused_files)}
        selective, drift, conformal = parent.selective, parent.drift, parent.conformal
        record = Recalibration(parent_version=parent.version, parent_temperature=parent.temperature,
                               labels=suggestion.labels, live_before=suggestion.current_metrics,
                               live_after=after, created_by=caller)
        version = next_version(folder)
        manifest = parent.model_copy(update={
            "version": version, "created": datetime.now(UTC), "temperature": temperature,
            "fused": rewritten[parent.fused.file],
            "variants": [variant.model_copy(update={"fused": rewritten[variant.fused.file]})
                         for variant in parent.variants],
            "samples": parent.samples.model_copy(update={"probabilities": _samples(parent, parent_dir,
                                                                                   temperature)}),
            # Thresholds, baselines and conformal scores keep the temperature they were fitted at; the server
            # scores them there.
            "selective": selective.model_copy(update={"temperature": selective.temperature or parent.temperature})
            if selective is not None else None,
            "drift": drift.model_copy(update={"temperature": drift.temperature or parent.temperature})
            if drift is not None else None,
            "conformal": conformal.model_copy(update={"temperature": conformal.temperature or parent.temperature})
            if conformal is not None else None,
            "front": _front_at(parent, parent_dir, temperature),
            "recalibration": record})
        for _ in range(_ATTEMPTS):
            manifest = manifest.model_copy(update={"version": version})
            write_manifest(manifest, staging)
            target = folder / str(version)
            try:
                publish_version(staging, target)  # fails if the version appeared meanwhile: nothing is overwritten
                return target
            except FileExistsError:
                version = next_version(folder)  # another publisher (a replica on a shared volume) took it
        raise LoadFailed(f"version numbers kept being taken while publishing into {folder.name}: try again")
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
