"""The inference half of the data plane: everything a client asks of a model, without a transport.

Inference, metadata, configuration, statistics and readiness live here; the transports only
frame and unframe. A request is checked once, here, before it can join a batch; in-flight
requests are counted once, here (the drain on shutdown and the metrics' gauge read the same
count); every answered request goes to the model's statistics and to the observer. Repository
control and feedback labels are the other half (`service.control.control`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from artefact.config import PLATFORM
from artefact.conformal import Score
from artefact.manifest import OUTPUTS, TensorSpec
from service.core.abstention import ABSTAIN
from service.core.abstention import PARAMETER as TARGET_PARAMETER
from service.core.classification import class_count, set_classes, top_classes
from service.core.drift import drift_needs
from service.core.ensemble import MEMBERS_USED
from service.core.members import CASCADE, DEGRADED, PARAMETER, Plan, plan
from service.core.modelconfig import model_config
from service.core.observer import Observer
from service.core.request import Parameter, RequestOptions, request_options
from service.core.served import Models, ServedModel
from service.core.sets import COVERAGE, PREDICTION_SET, SCORE, SET_SIZE, no_sets
from service.core.sets import OUTPUTS as SET_OUTPUTS
from service.core.statistics import ModelStatistics
from service.core.tensors import WireTensor, decode
from service.errors import (
    InvalidInput,
    Retired,
    ServingError,
    ShuttingDown,
    check_length,
    status_of,
)
from service.feedback import Feedback, Served

SERVER_NAME = "valley"
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "binary_tensor_data",
              "parameters")
# The graphs' outputs and the one the server adds: how many members answered each image.
SERVED_OUTPUTS = (*OUTPUTS, MEMBERS_USED)
# Outputs sent when a request names none: all but the large per-member tensor, as in DESIGN §5.
DEFAULT_OUTPUTS = tuple(name for name in SERVED_OUTPUTS if name != "member_probabilities")
# What feedback keeps of a request with an id: enough to score its labels and to refit the temperature on them.
KEPT = ("probabilities", "member_probabilities", MEMBERS_USED)
# Outputs the server adds after the graphs ran: a batch never computes them.
_ADDED = (ABSTAIN, PREDICTION_SET, SET_SIZE)
# Lookups of a request whose version retired before it was queued (each retry finds the version swapped in).
_RETRIES = 3
# Failures that happened after the request reached its model: their duration is worth a latency sample.
_REACHED_MODEL = ("DEADLINE_EXCEEDED", "INTERNAL")


@dataclass(frozen=True)
class InferenceRequest:
    """One inference request, whichever transport carried it: what the transport framed, nothing decoded yet."""

    model: str
    version: str
    """"" means the version being served."""
    id: str
    inputs: Sequence[WireTensor] = ()
    """The input tensors as declared, their data unread: decoded (`service.core.tensors.decode`) once the model is
    known, each declaration checked against it first."""
    outputs: tuple[str, ...] = ()
    """The outputs asked for (empty: the defaults)."""
    classification: dict[str, object] = field(default_factory=dict)
    """The `classification` (class_count) parameter of each output that has one, as sent."""
    malformed: InvalidInput | None = None
    """What the transport could not frame in the message's tensors: raised once the model is known, so a request
    for an unknown model is NOT_FOUND whatever its tensors hold."""
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    """The request-level parameters as sent, read by `service.core.request` once the model is known."""
    deadline: float | None = None
    """The transport's `time.monotonic()` deadline (gRPC's), if it has one; the `timeout` parameter may bring it
    nearer."""
    caller: str = ""
    """Who sent it (a token's fingerprint): only that caller may label what it was served."""
    heavy: bool = False
    """Decoding converts many typed values: it runs in a worker thread, so the event loop (and every health
    probe) never waits on it."""

    @classmethod
    def framed(cls, model: str, version: str, request_id: str, frame: Callable[[], Framing],
               **others: Any) -> InferenceRequest:
        """The request with what `frame` returns (inputs, outputs, class counts), or the `InvalidInput` it raised
        kept for after the model lookup."""
        try:
            inputs, outputs, classification = frame()
        except InvalidInput as error:
            return cls(model, version, request_id, malformed=error, **others)
        return cls(model, version, request_id, inputs, outputs, classification, **others)


Framing = tuple[Sequence[WireTensor], tuple[str, ...], dict[str, object]]
"""What a transport frames of a request's tensors: its inputs, the outputs it asks for and their class counts."""


@dataclass(frozen=True)
class InferenceResponse:
    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    """The outputs asked for, in the order asked."""
    parameters: dict[str, Parameter] = field(default_factory=dict)
    """How it was answered: the plan (`members`), when overload cut it `degraded`, and with an `abstain` output the
    `target_accuracy` it met."""


@dataclass(frozen=True)
class _Checked:
    """A request checked against its model: its pixels, the outputs asked for, their class counts, the plan, and
    the abstention target, coverage and conformity score it is answered at (0 and lac where the version has none)."""

    pixels: np.ndarray
    outputs: tuple[str, ...]
    classes: dict[str, int]
    plan: Plan
    target: float
    coverage: float
    score: Score


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Parameter] = field(default_factory=dict)
    """The members a request gets by default, and the ensemble's member count and fitted cascade."""


@dataclass(frozen=True)
class NamedStatistics:
    name: str
    version: str
    statistics: ModelStatistics


def _no_selective(model: ServedModel) -> str:
    return (f"model {model.name!r} version {model.version} was exported without selective prediction, so it has no "
            f"'{ABSTAIN}' output and takes no '{TARGET_PARAMETER}' (export it again to get them)")


def _outputs(model: ServedModel) -> list[TensorSpec]:
    """Every output the version serves: the graphs', how many members answered, and with selective prediction
    whether to abstain."""
    outputs = [*model.ensemble.manifest.outputs, TensorSpec(name=MEMBERS_USED, datatype="INT64", shape=[-1])]
    if model.abstention is not None:
        outputs.append(TensorSpec(name=ABSTAIN, datatype="BOOL", shape=[-1]))
    if model.sets is not None:
        classes = len(model.ensemble.manifest.classes)
        outputs.extend([TensorSpec(name=PREDICTION_SET, datatype="BOOL", shape=[-1, classes]),
                        TensorSpec(name=SET_SIZE, datatype="INT64", shape=[-1])])
    return outputs


def _extra_outputs(model: ServedModel) -> tuple[str, ...]:
    """The outputs a version adds to the graphs' by what it was exported with."""
    return (*((ABSTAIN,) if model.abstention is not None else ()), *(SET_OUTPUTS if model.sets is not None else ()))


def _parameters(model: ServedModel) -> dict[str, Parameter]:
    """How the version answers: its default members, its cascade, its precision, its abstention."""
    manifest = model.ensemble.manifest
    cascade = manifest.cascade
    parameters: dict[str, Parameter] = {
        "members_default": model.default_plan.name, "members_count": len(manifest.members),
        "cascade_stages": ",".join(str(s) for s in cascade.stages) if cascade else str(len(manifest.members)),
        "cascade_thresholds": ",".join(f"{t:g}" for t in cascade.thresholds) if cascade else "",
        "degrade_to_members": model.batcher.degraded.members if model.batcher.degraded else 0,
        "precision": model.ensemble.precision, "precision_requested": model.ensemble.requested_precision}
    if manifest.front is not None:
        front = cascade.front if cascade is not None else None
        parameters.update({"front_method": manifest.front.method,
                           "cascade_front": f"{front:g}" if front is not None else "",
                           "degrade_to": model.batcher.degraded.name if model.batcher.degraded else ""})
    if model.abstention is not None:
        spec = model.abstention.spec
        parameters.update({
            "abstain_signal": spec.signal, "target_accuracy_default": model.abstention.default_target,
            "target_accuracies_fitted": ",".join(f"{t.target_accuracy:g}" for t in spec.thresholds)})
    if model.sets is not None:
        parameters.update({"coverage_default": model.sets.default_coverage,
                           "conformal_score_default": model.sets.default_score,
                           "conformal_scores": ",".join(entry.score for entry in model.sets.spec.scores)})
    return parameters


@functools.cache
def _server_version() -> str:
    """The installed package's version, read once (importlib.metadata scans the installed distributions)."""
    try:
        return version("valley-ensembles")
    except PackageNotFoundError:
        return "unknown"


class Inference:
    """The inference half of the data plane: health, metadata, configuration, statistics and inference."""

    def __init__(self, models: Models, observer: Observer, feedback: Feedback) -> None:
        self.repository, self.observer, self.feedback = models, observer, feedback
        self.shutting_down = False
        self._in_flight: dict[tuple[str, str], int] = {}
        self._held = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- health and metadata --------------------------------------------------------------

    def live(self) -> bool:
        """The process answers: true as soon as the port is open, while ensembles still load."""
        return True

    def ready(self) -> bool:
        """Every ensemble that was asked to load serves, and the server is not shutting down."""
        return not self.shutting_down and self.repository.ready

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.check_ready(name, version)
        except ServingError:
            return False
        return True

    def check_ready(self, name: str, version: str) -> None:
        """Return if the version serves; else raise why not (unknown: `ModelNotFound`, else `ModelNotReady`)."""
        self.get(name, version)
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down: send requests to another replica")

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, _server_version(), EXTENSIONS)

    def get(self, name: str, version: str) -> ServedModel:
        """The version serving for a client's model name and version ("": the newest), names checked first."""
        for what, value in (("model_name", name), ("model_version", version)):
            check_length(what, value)
        return self.repository.get(name, version)

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self.get(name, version)
        versions = [str(v) for v in self.repository.versions(model.name)]
        return ModelMetadata(model.name, versions, PLATFORM, [model.ensemble.manifest.input], _outputs(model),
                             _parameters(model))

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """The version's configuration as Triton's ModelConfig, in the JSON form of Triton's HTTP endpoint."""
        model = self.get(name, version)
        parameters = {key: str(value) for key, value in _parameters(model).items()}
        return model_config(model, _outputs(model), self.repository.policy_of(model.name), parameters)

    # -- inference ------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        """Check the request, queue it for its model's next batch, keep what it was served for feedback."""
        started = time.monotonic()
        model: ServedModel | None = None
        try:
            if self.shutting_down:
                raise ShuttingDown("the server is shutting down: send the request to another replica")
            check_length("id", request.id)
            model = self.get(request.model, request.version)
            for attempt in range(_RETRIES):
                try:
                    with self._serving(model):
                        response = await self._infer(model, request, started)
                    break
                except Retired:  # swapped out between lookup and queueing: what serves now takes it
                    if attempt == _RETRIES - 1:
                        raise
                    model = self.repository.get(request.model, request.version)
        except Exception as error:
            self._observe_failure(request, model, status_of(error).code, started)
            raise
        self.observer.observe_request(response.model, response.version, "OK", time.monotonic() - started)
        return response

    async def _infer(self, model: ServedModel, request: InferenceRequest, started: float) -> InferenceResponse:
        try:
            options = request_options(request.parameters, request.deadline)
            checked = await self._checked(model, request, options)
            outputs = checked.outputs
            keep = self.feedback.keeps(request.id)
            abstention = model.abstention if ABSTAIN in outputs else None
            sets = model.sets if PREDICTION_SET in outputs or SET_SIZE in outputs else None
            # What the observer and the feedback need is computed for every image, whatever the client asked.
            signals = self.observer.signal_outputs
            needed = [*(name for name in outputs if name not in _ADDED), *signals,
                      *(drift_needs(model.ensemble.manifest) if signals else ()),
                      *(abstention.needs if abstention is not None else ()),
                      *(sets.needs if sets is not None else ()), *(KEPT if keep else ())]
            answer = await model.batcher.submit(checked.pixels, tuple(dict.fromkeys(needed)), options.deadline,
                                                checked.plan)
            results = answer.outputs
            labels = (model.name, str(model.version))
            if abstention is not None:
                results[ABSTAIN] = flags = abstention.flags(results, checked.target)
                self.observer.observe_abstentions(*labels, len(flags), int(flags.sum()))
            if sets is not None:
                results[PREDICTION_SET] = chosen = sets.sets(results, checked.coverage, checked.score)
                results[SET_SIZE] = size = chosen.sum(axis=1, dtype=np.int64)
                self.observer.observe_sets(*labels, checked.coverage, size)
            if keep:
                self.feedback.remember(model.name, model.version, request.id, Served(
                    results["probabilities"], results["member_probabilities"], results[MEMBERS_USED],
                    checked.coverage if sets is not None else None, results.get(PREDICTION_SET)), time.time(),
                    request.caller)
        except Retired:
            raise
        except BaseException:
            model.statistics.record_request(time.monotonic() - started, ok=False)
            raise
        model.statistics.record_request(time.monotonic() - started, ok=True)
        parameters: dict[str, Parameter] = {PARAMETER: answer.plan.name if answer.plan else CASCADE}
        if answer.degraded:
            parameters[DEGRADED] = True
        if ABSTAIN in outputs:
            parameters[TARGET_PARAMETER] = checked.target
        if sets is not None:
            parameters[COVERAGE], parameters[SCORE] = checked.coverage, checked.score
        names = model.ensemble.manifest.classes
        answered = {}
        for name in outputs:
            count = checked.classes.get(name)
            if not count:
                answered[name] = results[name]
            elif name == PREDICTION_SET:
                answered[name] = set_classes(results[name], results["probabilities"], count, names)
            else:
                answered[name] = top_classes(results[name], count, names)
        return InferenceResponse(model.name, str(model.version), request.id, answered, parameters)

    async def _checked(self, model: ServedModel, request: InferenceRequest, options: RequestOptions) -> _Checked:
        """The request's pixels, outputs, class counts (classification), plan, target accuracy, coverage and score,
        or `InvalidInput` naming what does not fit: the one place requests are checked before they can join a
        batch. Declarations are checked before any data is read."""
        ensemble = model.ensemble
        chosen = model.default_plan if options.members is None else plan(ensemble.manifest, options.members, True)
        spec = ensemble.manifest.input
        abstention, sets = model.abstention, model.sets
        if abstention is None and options.target_accuracy is not None:
            raise InvalidInput(f"parameter '{TARGET_PARAMETER}': {_no_selective(model)}")
        target = 0.0
        if abstention is not None:
            target = abstention.default_target if options.target_accuracy is None else options.target_accuracy
        if sets is None and (options.coverage is not None or options.conformal_score is not None):
            given = COVERAGE if options.coverage is not None else SCORE
            raise InvalidInput(f"parameter '{given}': {no_sets(model.name, model.version)}")
        coverage: float = 0.0
        score: Score = "lac"  # answered by no version without prediction sets
        if sets is not None:
            coverage = sets.default_coverage if options.coverage is None else options.coverage
            score = sets.score(options.conformal_score)

        def expect(name: str, datatype: str, shape: tuple[int, ...]) -> None:
            ensemble.check_input(name, datatype, shape)
            if shape[0] > model.options.max_batch_size:
                raise InvalidInput(f"input '{spec.name}' has a batch of {shape[0]} images; model {model.name!r} "
                                   f"takes at most {model.options.max_batch_size} per request (split the request)")

        if request.malformed is not None:
            raise request.malformed
        inputs = await asyncio.to_thread(decode, request.inputs, expect) if request.heavy else \
            decode(request.inputs, expect)
        extra = _extra_outputs(model)
        outputs = request.outputs or (*DEFAULT_OUTPUTS, *extra)
        known = (*SERVED_OUTPUTS, *extra)
        if len(outputs) > len(known):
            raise InvalidInput(f"{len(outputs)} outputs asked for; there are {len(known)}: {', '.join(known)}")
        for index, name in enumerate(outputs):
            check_length("an output's name", name)
            if name == ABSTAIN and abstention is None:
                raise InvalidInput(f"output '{ABSTAIN}': {_no_selective(model)}")
            if name in SET_OUTPUTS and sets is None:
                raise InvalidInput(f"output '{name}': {no_sets(model.name, model.version)}")
            if name not in known:
                raise InvalidInput(f"unknown output {name!r}; outputs are {', '.join(known)}")
            if name in outputs[:index]:
                raise InvalidInput(f"output {name!r} is asked for twice")
        if list(inputs) != [spec.name]:
            shape = ", ".join(str(d) for d in spec.shape)
            raise InvalidInput(f"model {model.name!r} takes exactly one input '{spec.name}' ({spec.datatype} "
                               f"[{shape}]), got {list(inputs) or 'none'}")
        classes = {name: class_count(name, value) for name, value in request.classification.items()}
        return _Checked(inputs[spec.name], outputs, classes, chosen, target, coverage, score)

    @contextmanager
    def _serving(self, model: ServedModel) -> Iterator[None]:
        """Count the request in flight for its model version while the block runs."""
        key = (model.name, str(model.version))
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self.hold()
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            self.release()

    def hold(self) -> None:
        """Count a piece of work the shutdown must wait for (a request in flight, a stream answer not yet written)."""
        self._held += 1
        self._idle.clear()

    def release(self) -> None:
        """The work `hold` counted is done."""
        self._held -= 1
        if not self._held:
            self._idle.set()

    def _observe_failure(self, request: InferenceRequest, model: ServedModel | None, code: str,
                         started: float) -> None:
        """Count one failed request under its model (looked up if it was not yet); requests for unknown models
        share empty labels (bounded cardinality)."""
        try:
            if model is None:
                model = self.repository.get(request.model, request.version)
            name, model_version = model.name, str(model.version)
        except ServingError:
            name, model_version = "", ""
        seconds = time.monotonic() - started if code in _REACHED_MODEL else None
        self.observer.observe_request(name, model_version, code, seconds)

    def in_flight(self) -> list[tuple[str, str, int]]:
        """(model, version, requests being served) for every version that served or serves requests."""
        # Read from the metrics server's thread: list() copies the items in one step under the GIL.
        return [(name, model_version, count) for (name, model_version), count in list(self._in_flight.items())]

    def queue_depths(self) -> list[tuple[str, str, int]]:
        """(model, version, requests waiting) for every version being served."""
        return [(m.name, str(m.version), m.batcher.depth) for m in self.repository.served()]

    async def drained(self) -> None:
        """Return once no inference request is being served and every stream answer is written."""
        await self._idle.wait()

    def statistics(self, name: str, version: str) -> list[NamedStatistics]:
        """A consistent copy of the statistics of one model (`name`), or of every model served."""
        models = [self.get(name, version)] if name else self.repository.served()
        return [NamedStatistics(m.name, str(m.version), m.statistics.snapshot()) for m in models]
