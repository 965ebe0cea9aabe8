"""One ensemble version ready to run: verified files, an onnxruntime session, checked samples.

No gRPC and no Prometheus here: the data plane checks a request once (`check_input`) and the
batcher runs it (`run`); this module only knows arrays. The CUDA execution provider is used
when it really loads, the CPU one otherwise; which one runs is read back from the session,
never assumed.

Two execution modes give the same outputs: `fused` runs the one graph that holds every
member (the default, fastest) for batches that every member answers, and one session per
member for the rest; `members` holds only the member sessions (half the memory) and runs
every batch through them. Member sessions run a batch in stages (`service.core.members`): each
member runs only on the images still open, so an image that left a cascade early, or asked
for fewer members, costs only the members it went through. Their probabilities are combined
in numpy (`artefact.uncertainty`), with each member timed.

A version with a front network (`artefact.manifest.FrontSpec`) runs it first for the rows
whose plan has a front: images it is confident enough about are answered by it alone
(`members_used` 0, member probabilities zero), and the others go on to the members as if
there were no front.

A manifest's lower-precision variant (`--precision int8` or `fp16`) replaces the FP32 graphs;
FP16 graphs are for the CUDA provider only. A variant whose samples do not reproduce on this
machine (INT8 kernels add products differently on CPUs with and without VNNI: `artefact.cpu`)
is refused with both CPUs named, and the FP32 graphs serve instead (`Ensemble.fallback`), so
that nobody is served answers the manifest's figures do not vouch for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from artefact.cascade import Cascade
from artefact.config import Device, Execution, Precision
from artefact.cpu import describe, this_machine
from artefact.manifest import FileEntry, Manifest, ManifestError, Variant, load_manifest, verify_files
from artefact.uncertainty import FRONT, ensemble_outputs, outputs_by_members, softmax
from service.core.batching import RunOutput, Segment
from service.errors import InvalidInput

log = logging.getLogger(__name__)

MEMBERS_USED = "members_used"
"""The output, beside the graphs', that says how many members answered each image."""
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# onnxruntime's own log level while a session is created: a CUDA provider that cannot load
# would otherwise print a page of errors for every model; we report the outcome once instead.
_QUIET = 4
_DEFAULT_SEVERITY = 2


def create_session(path: Path, device: Device = "auto", threads: int = 0,
                   spinning: bool = False) -> onnxruntime.InferenceSession:
    """An onnxruntime session on CUDA when asked or available and working, else on the CPU.

    Intra-op threads sleep between runs unless `spinning`: in a server the event loop and the
    gRPC threads need the cores that spinning threads would burn, and several sessions that
    each spin on their own pool run several times slower.
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = _QUIET
    wants_cuda = device == "cuda" or (device == "auto" and CUDA in onnxruntime.get_available_providers())
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    onnxruntime.set_default_logger_severity(_QUIET)
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    finally:
        onnxruntime.set_default_logger_severity(_DEFAULT_SEVERITY)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise RuntimeError(f"device 'cuda' was asked for but onnxruntime's CUDA provider did not load for {path} "
                           "(no GPU, or CUDA/cuDNN libraries missing): use device 'auto' or 'cpu'")
    return session


class SamplesMismatch(ManifestError):
    """The graphs answer the manifest's sample inputs further from its probabilities than the tolerance."""

    def __init__(self, message: str, difference: float, tolerance: float) -> None:
        super().__init__(message)
        self.difference, self.tolerance = difference, tolerance


@dataclass(frozen=True)
class Fallback:
    """The variant asked for, refused at load because its samples did not reproduce here, and why in words."""

    precision: Precision
    reason: str


@dataclass
class Ensemble:
    """A loaded, verified ensemble version; `infer` runs the fused graph, or the members one by one."""

    manifest: Manifest
    directory: Path
    session: onnxruntime.InferenceSession | None
    """The fused graph; None in `members` execution."""
    member_sessions: list[onnxruntime.InferenceSession] = field(default_factory=list)
    device: Device = "auto"
    threads: int = 0
    precision: Precision = "fp32"
    """The graphs that run."""
    fallback: Fallback | None = None
    """Set when another precision was asked for and refused: the FP32 graphs run instead."""
    front_session: onnxruntime.InferenceSession | None = None
    """The front network's graph, where the manifest has one."""

    @property
    def requested_precision(self) -> Precision:
        """The precision the server was asked to serve (`precision` unless a variant was refused)."""
        return self.fallback.precision if self.fallback is not None else self.precision

    @property
    def execution(self) -> Execution:
        return "fused" if self.session is not None else "members"

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime really uses, in priority order."""
        session = self.session if self.session is not None else self.member_sessions[0]
        return list(session.get_providers())

    def another_instance(self) -> Ensemble:
        """The same verified graphs in sessions of their own, for a second compute thread."""
        instance = _open(self.manifest, self.directory, self.device, self.threads, self.execution, self.precision)
        instance.fallback = self.fallback
        return instance

    def check_input(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        """Raise `InvalidInput` unless a tensor declared so is the ensemble's input (a `codec.Expect`).

        The data plane calls this for every declared input before its data is read (it checks the output
        names itself): `run` trusts its arguments.
        """
        spec = self.manifest.input
        if name != spec.name:
            raise InvalidInput(f"model {self.manifest.name!r} takes exactly one input '{spec.name}' ({spec.datatype} "
                               f"{spec.shape}), not {name!r}")
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{spec.name}' must be {spec.datatype} pixels (0..255), got {datatype}")
        expected = tuple(spec.shape[1:])
        if len(shape) != len(spec.shape) or tuple(shape[1:]) != expected or shape[0] < 1:
            dims = ", ".join(str(d) for d in spec.shape)
            raise InvalidInput(f"input '{spec.name}' must have shape [{dims}] (-1: batch of 1 or more), "
                               f"got {list(shape)}")

    def run(self, pixels: np.ndarray, outputs: Sequence[str], segments: Sequence[Segment] = ()) -> RunOutput:
        """The named outputs (and `members_used`) for uint8 pixels [B, C, H, W], checked already.

        `segments` splits the batch into consecutive rows, each with the cascade that answers it; none: every member
        answers every row. The front network runs first on the rows whose cascade has a front; the rows it does not
        answer, and the others, go to the members. Rows that every member answers run the fused graph when there is
        one.
        """
        exits, fronts = _plans(segments or [(len(pixels), None)], len(self.manifest.members))
        asking = np.flatnonzero(np.isfinite(fronts))
        if self.front_session is None or not len(asking):
            return self._run_members(pixels, outputs, exits)
        front = self._front(pixels if len(asking) == len(pixels) else pixels[asking])
        leaving = np.zeros(len(pixels), dtype=bool)
        leaving[asking] = front.max(axis=-1) >= fronts[asking]
        staying = np.flatnonzero(~leaving)
        answered = _front_outputs(front[leaving[asking]], len(self.manifest.members))
        if not len(staying):
            return RunOutput({name: answered[name] for name in outputs}, front_images=len(asking))
        rest = self._run_members(pixels[staying], outputs, exits[staying])
        results = {}
        for name in outputs:
            value = rest.outputs[name]
            merged = np.empty((len(pixels), *value.shape[1:]), dtype=value.dtype)
            merged[staying] = value
            merged[leaving] = answered[name]
            results[name] = merged
        return RunOutput(results, rest.member_seconds, front_images=len(asking))

    def _run_members(self, pixels: np.ndarray, outputs: Sequence[str], exits: np.ndarray) -> RunOutput:
        """`run` through the members alone: the fused graph for rows that every member answers, when there is one,
        else the member sessions in stages."""
        members = len(self.manifest.members)
        if self.session is not None and bool(np.all(exits == _full_exits(members))):
            names = [name for name in outputs if name != MEMBERS_USED]
            values: list[Any] = self.session.run(names, {self.manifest.input.name: pixels})
            results = dict(zip(names, values, strict=True))
            results[MEMBERS_USED] = np.full(len(pixels), members, dtype=np.int64)
            return RunOutput({name: results[name] for name in outputs})
        return self._run_staged(pixels, outputs, exits)

    def _run_staged(self, pixels: np.ndarray, outputs: Sequence[str], exits: np.ndarray) -> RunOutput:
        """`run` through the member sessions, in stages, whatever the plans."""
        member_probabilities, used, seconds = self._staged(pixels, exits)
        results = outputs_by_members(member_probabilities, used)
        results[MEMBERS_USED] = used
        return RunOutput({name: results[name] for name in outputs}, seconds)

    def _front(self, pixels: np.ndarray) -> np.ndarray:
        """The front network's probabilities [B, C] at its temperature."""
        assert self.front_session is not None and self.manifest.front is not None
        logits = self.front_session.run(None, {self.manifest.input.name: pixels})[0]
        probabilities: np.ndarray = softmax(logits / np.float32(self.manifest.front.temperature))
        return probabilities

    def infer(self, pixels: np.ndarray, outputs: Sequence[str], cascade: Cascade | None = None
              ) -> dict[str, np.ndarray]:
        """Check and run one batch of pixels (every member, or `cascade`); returns the named outputs (for a caller
        outside the server)."""
        datatype = self.manifest.input.datatype if pixels.dtype == np.uint8 else str(pixels.dtype)
        self.check_input(self.manifest.input.name, datatype, pixels.shape)
        known = [*(o.name for o in self.manifest.outputs), MEMBERS_USED]
        unknown = [name for name in outputs if name not in known]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}: this ensemble has {known}")
        segments = [(len(pixels), cascade)] if cascade is not None else []
        return self.run(pixels, outputs, segments).outputs

    def _staged(self, pixels: np.ndarray, exits: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Members in order, each on the images still open: tempered member probabilities [B, K, C] (zero for
        members an image did not go through), the members each image used [B], each member's compute seconds.

        `exits` [B, K]: an image leaves after member m (0-based) when the mean of its members so far is at least
        `exits[b, m]` confident (-inf: it always leaves there, +inf: never).
        """
        count, members = exits.shape
        name, temperature = self.manifest.input.name, np.float32(self.manifest.temperature)
        probabilities: np.ndarray | None = None
        sums = np.zeros(0)
        used = np.zeros(count, dtype=np.int64)
        open_ = np.ones(count, dtype=bool)
        seconds = []
        for member, session in enumerate(self.member_sessions):
            rows = np.flatnonzero(open_)
            if not len(rows):
                break
            started = time.perf_counter()
            logits = session.run(None, {name: pixels if len(rows) == count else pixels[rows]})[0]
            seconds.append(time.perf_counter() - started)
            tempered = softmax(logits / temperature)
            if probabilities is None:
                probabilities = np.zeros((count, members, tempered.shape[-1]), dtype=np.float32)
                sums = np.zeros((count, tempered.shape[-1]), dtype=np.float64)
            probabilities[rows, member] = tempered
            sums[rows] += tempered
            confidence = sums[rows].max(axis=-1) / (member + 1)
            leaving = rows[confidence >= exits[rows, member]]
            used[leaving] = member + 1
            open_[leaving] = False
        assert probabilities is not None, "an ensemble has at least one member"
        return probabilities, used, seconds

    def check_samples(self) -> float:
        """Run the manifest's sample inputs; raise `SamplesMismatch` unless they reproduce its outputs."""
        samples = self.manifest.samples
        pixels = np.asarray(samples.inputs, dtype=np.uint8)
        expected = np.asarray(samples.probabilities)
        # Both paths answer: the fused graph (where there is one) and the member graphs the stages run.
        paths = [self.infer(pixels, ["probabilities"])["probabilities"]]
        if self.session is not None:
            every = np.tile(_full_exits(len(self.manifest.members)), (len(pixels), 1))
            paths.append(self._run_staged(pixels, ["probabilities"], every).outputs["probabilities"])
        difference = max(float(np.max(np.abs(probabilities - expected))) for probabilities in paths)
        front = self.manifest.front
        if self.front_session is not None and front is not None:
            difference = max(difference, float(np.max(np.abs(self._front(pixels)
                                                              - np.asarray(front.sample_probabilities)))))
        variant = self.manifest.variant(self.precision)
        tolerance = variant.samples_tolerance if variant is not None else samples.tolerance
        if not difference <= tolerance:
            raise SamplesMismatch(f"{self.directory}: the sample inputs give probabilities {difference:.3g} away "
                                  f"from the manifest's (tolerance {tolerance:.3g}) at {self.precision}; refusing "
                                  "to serve this version", difference, tolerance)
        return difference


def _full_exits(members: int) -> np.ndarray:
    """[K]: exits after every member (see `Ensemble._staged`)."""
    row = np.full(members, np.inf)
    row[-1] = -np.inf
    return row


def _plans(segments: Sequence[Segment], members: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, K]: the confidence at which each image leaves after each member (see `Ensemble._staged`); [B]: the
    confidence at which it leaves with the front network's answer (inf: the front does not run for it)."""
    rows, fronts = [], []
    for count, plan in segments:
        cascade = plan if plan is not None else Cascade.full(members)
        if cascade.members > members:
            raise ValueError(f"a plan of {cascade.members} members for an ensemble of {members}")
        row = np.full(members, np.inf)
        row[cascade.members - 1] = -np.inf
        for stage, threshold in zip(cascade.stages, cascade.thresholds, strict=False):
            row[stage - 1] = threshold
        rows.append(np.broadcast_to(row, (count, members)))
        fronts.append(np.full(count, np.inf if cascade.front is None else cascade.front))
    return np.concatenate(rows), np.concatenate(fronts)


def _front_outputs(front: np.ndarray, members: int) -> dict[str, np.ndarray]:
    """Every output of images the front network answered: its probabilities [B, C] as one network's, no member."""
    results = ensemble_outputs(front[:, None, :])
    results["member_probabilities"] = np.zeros((len(front), members, front.shape[-1]), dtype=front.dtype)
    results[MEMBERS_USED] = np.full(len(front), FRONT, dtype=np.int64)
    return results


def graphs(manifest: Manifest, precision: Precision) -> tuple[list[FileEntry], FileEntry, FileEntry | None]:
    """The member graphs, the fused graph and the front network's graph (None without one) of `precision`;
    `ManifestError` when the manifest has no such variant."""
    if precision == "fp32":
        return list(manifest.members), manifest.fused, manifest.front
    variant = manifest.variant(precision)
    if variant is None:
        exported = ", ".join(["fp32", *(v.precision for v in manifest.variants)])
        raise ManifestError(f"{manifest.name} version {manifest.version} has no {precision} variant (it has "
                            f"{exported}): export it with --precision {precision}, or serve it at another precision")
    return list(variant.members), variant.fused, variant.front


def _open(manifest: Manifest, directory: Path, device: Device, threads: int, execution: Execution,
          precision: Precision = "fp32") -> Ensemble:
    """Sessions for every member and, in `fused` execution, for the fused graph."""
    members, fused, front = graphs(manifest, precision)
    session = create_session(directory / fused.file, device, threads) if execution == "fused" else None
    member_sessions = [create_session(directory / member.file, device, threads) for member in members]
    front_session = create_session(directory / front.file, device, threads) if front is not None else None
    ensemble = Ensemble(manifest, directory, session, member_sessions, device, threads, precision,
                        front_session=front_session)
    if precision == "fp16" and ensemble.providers[0] != CUDA:
        raise ManifestError(f"{directory}: FP16 graphs are for the CUDA provider, and onnxruntime runs on "
                            f"{ensemble.providers[0]} here: serve --precision fp32 or int8 on the CPU")
    return ensemble


def load_ensemble(version_dir: Path, device: Device = "auto", threads: int = 0,
                  execution: Execution = "fused", precision: Precision = "fp32") -> Ensemble:
    """Read the manifest, verify every file's sha256, open the graphs and check the samples.

    A variant whose samples miss their tolerance here is refused and the FP32 graphs serve (`Ensemble.fallback`,
    with a warning naming this CPU and the one the variant was validated on); FP32 graphs that miss refuse the
    version."""
    manifest = load_manifest(version_dir)
    verify_files(manifest, version_dir)
    ensemble = _open(manifest, version_dir, device, threads, execution, precision)
    try:
        difference = ensemble.check_samples()
    except SamplesMismatch as mismatch:
        variant = manifest.variant(precision)
        if variant is None:
            raise
        fallback = Fallback(precision, _variant_refusal(manifest, variant, mismatch))
        log.warning("%s", fallback.reason)
        ensemble = _open(manifest, version_dir, device, threads, execution, "fp32")
        ensemble.fallback = fallback
        difference = ensemble.check_samples()
    log.info("loaded %s version %d from %s on %s, %s execution at %s (samples within %.1e)", manifest.name,
             manifest.version, version_dir, ensemble.providers[0], execution, ensemble.precision, difference)
    return ensemble


def _variant_refusal(manifest: Manifest, variant: Variant, mismatch: SamplesMismatch) -> str:
    """Why a variant does not serve on this machine, naming this CPU and the one it was validated on."""
    here = describe(this_machine(onnxruntime.__version__))
    there = describe(variant.validated_on) if variant.validated_on is not None else "a machine it does not record"
    return (f"{manifest.name} version {manifest.version}: the {variant.precision} variant is refused on this "
            "machine and the FP32 graphs serve instead: its sample inputs give probabilities "
            f"{mismatch.difference:.3g} away from the manifest's, beyond its tolerance {mismatch.tolerance:.3g}. "
            f"This CPU: {here}. Validated on: {there}. Export the variant again with this valley (its scheme "
            "computes the same on CPUs with and without VNNI) or on a CPU like this one, or serve --precision fp32")
