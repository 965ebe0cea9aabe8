"""One ensemble version ready to run: verified files, an onnxruntime session, checked samples.

No gRPC and no Prometheus here: the data plane checks a request once (`check_input`) and the
batcher runs it (`run`); this module only knows arrays. The CUDA execution provider is used
when it really loads, the CPU one otherwise; which one runs is read back from the session,
never assumed.

Two execution modes give the same outputs: `fused` runs the one graph that holds every
member (the default, fastest), `members` runs one session per member and combines their
probabilities in numpy (`artefact.uncertainty`), timing each member.
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

from artefact.manifest import Manifest, ManifestError, load_manifest, verify_files
from artefact.uncertainty import ensemble_outputs, softmax
from service.batching import RunOutput
from service.errors import InvalidInput
from service.settings import Device, Execution

log = logging.getLogger(__name__)

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


@dataclass
class Ensemble:
    """A loaded, verified ensemble version; `infer` runs the fused graph, or the members one by one."""

    manifest: Manifest
    directory: Path
    session: onnxruntime.InferenceSession
    member_sessions: list[onnxruntime.InferenceSession] = field(default_factory=list)
    device: Device = "auto"
    threads: int = 0

    @property
    def execution(self) -> Execution:
        return "members" if self.member_sessions else "fused"

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime really uses, in priority order."""
        return list(self.session.get_providers())

    def another_instance(self) -> Ensemble:
        """The same verified graphs in sessions of their own, for a second compute thread."""
        return _open(self.manifest, self.directory, self.device, self.threads, self.execution)

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

    def run(self, pixels: np.ndarray, outputs: Sequence[str]) -> RunOutput:
        """The named outputs for uint8 pixels [B, C, H, W] (checked already), with member times in `members` mode."""
        if self.member_sessions:
            member_probabilities, seconds = self._member_probabilities(pixels)
            everything = ensemble_outputs(member_probabilities)
            return RunOutput({name: everything[name] for name in outputs}, seconds)
        values: list[Any] = self.session.run(list(outputs), {self.manifest.input.name: pixels})
        return RunOutput(dict(zip(outputs, values, strict=True)))

    def infer(self, pixels: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Check and run one batch of pixels; returns the named outputs (for a caller outside the server)."""
        datatype = self.manifest.input.datatype if pixels.dtype == np.uint8 else str(pixels.dtype)
        self.check_input(self.manifest.input.name, datatype, pixels.shape)
        known = [o.name for o in self.manifest.outputs]
        unknown = [name for name in outputs if name not in known]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}: this ensemble has {known}")
        return self.run(pixels, outputs).outputs

    def _member_probabilities(self, pixels: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """Tempered softmax of every member, [B, K, C], and each member's compute seconds."""
        feeds = {self.manifest.input.name: pixels}
        probabilities, seconds = [], []
        for session in self.member_sessions:
            started = time.perf_counter()
            logits = session.run(None, feeds)[0]
            seconds.append(time.perf_counter() - started)
            probabilities.append(softmax(logits / np.float32(self.manifest.temperature)))
        return np.stack(probabilities, axis=1), seconds

    def check_samples(self) -> float:
        """Run the manifest's sample inputs; raise `ManifestError` unless they reproduce its outputs."""
        samples = self.manifest.samples
        pixels = np.asarray(samples.inputs, dtype=np.uint8)
        probabilities = self.infer(pixels, ["probabilities"])["probabilities"]
        difference = float(np.max(np.abs(probabilities - np.asarray(samples.probabilities))))
        if not difference <= samples.tolerance:
            raise ManifestError(f"{self.directory}: the sample inputs give probabilities {difference:.3g} away from "
                                f"the manifest's (tolerance {samples.tolerance}); refusing to serve this version")
        return difference


def _open(manifest: Manifest, directory: Path, device: Device, threads: int, execution: Execution) -> Ensemble:
    """Sessions for the fused graph and, in `members` execution, for every member."""
    session = create_session(directory / manifest.fused.file, device, threads)
    members = [create_session(directory / member.file, device, threads)
               for member in manifest.members] if execution == "members" else []
    return Ensemble(manifest, directory, session, members, device, threads)


def load_ensemble(version_dir: Path, device: Device = "auto", threads: int = 0,
                  execution: Execution = "fused") -> Ensemble:
    """Read the manifest, verify every file's sha256, open the graphs and check the samples."""
    manifest = load_manifest(version_dir)
    verify_files(manifest, version_dir)
    ensemble = _open(manifest, version_dir, device, threads, execution)
    difference = ensemble.check_samples()
    log.info("loaded %s version %d from %s on %s, %s execution (samples within %.1e)", manifest.name,
             manifest.version, version_dir, ensemble.providers[0], execution, difference)
    return ensemble
