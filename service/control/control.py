"""The control half of the data plane: the repository's index, loads and unloads, feedback labels and
recalibration, without a transport.

Model control follows `--model-control-mode` (none refuses loads and unloads); a load's
`config` may set the version policy, and fields that repeat what serves are dropped
(`service.core.modelconfig.unchanged`). A recalibration publishes a version and loads it, one at
a time here and under the feedback store's lock across the fleet.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path

from artefact.calibration import TEMPERATURE_RANGE
from artefact.repository import withdraw
from service.control.recalibrate import Suggestion, applied, lock_name, publish, suggest
from service.control.repository import IndexEntry, Repository, State
from service.core.inference import Inference
from service.core.modelconfig import unchanged
from service.core.served import ServedModel
from service.errors import (
    InvalidInput,
    LoadFailed,
    ModelControlOff,
    NotEnoughLabels,
    RepositoryNotWritable,
    ServingError,
    ShuttingDown,
    Superseded,
    check_length,
)
from service.feedback import CalibrationWindow, Feedback, Label, LabelledWindow

_MAX_CONFIG_CHARS = 64 << 10


class Control:
    """The control half of the data plane: the repository's index, loads and unloads, feedback labels and
    recalibration."""

    def __init__(self, repository: Repository, inference: Inference, feedback: Feedback,
                 model_control: str = "explicit", recalibration_min_labels: int = 100) -> None:
        self.repository, self.inference, self.feedback = repository, inference, feedback
        self.model_control, self.recalibration_min_labels = model_control, recalibration_min_labels
        self._recalibrating = asyncio.Lock()
        self._suggested: dict[tuple[str, int], tuple[int, Suggestion]] = {}

    # -- feedback, statistics and repository ----------------------------------------------

    async def report(self, labels: Sequence[Label], caller: str = "") -> int:
        """Join labels to the predictions served to `caller` for them (all or none); how many were accepted. With a
        database store the labels are committed first, in a worker thread."""
        if self.feedback.shared:
            return await asyncio.to_thread(self.feedback.report, labels, caller)
        return self.feedback.report(labels, caller)

    async def index(self, ready_only: bool) -> list[IndexEntry]:
        """The repository's index; the disk is read in a worker thread (a slow volume must not stall the loop)."""
        entries = await asyncio.to_thread(self.repository.index)
        return [entry for entry in entries if not ready_only or entry.state == State.READY]

    async def load(self, name: str, config: str | None = None, others: Sequence[str] = ()) -> None:
        """Load `name` by its version policy; `config` (Triton's JSON model config) may set the policy."""
        self._controllable()
        check_length("model_name", name)
        if others:
            raise InvalidInput(f"load parameters {', '.join(others)[:100]} are not supported: the 'config' parameter "
                               "may set a version_policy; publish files into the repository folder")
        if config is not None and len(config) > _MAX_CONFIG_CHARS:
            raise InvalidInput(f"the config parameter has {len(config)} characters; at most {_MAX_CONFIG_CHARS}")
        if config is not None:
            config = self._settable(name, config)
        await self.repository.load(name, config)

    def _settable(self, name: str, config: str) -> str:
        """A load's config with the fields that repeat the served configuration dropped (`modelconfig.unchanged`);
        what does not parse goes on as it is, for the version policy's parser to say why."""
        try:
            posted = json.loads(config)
        except (ValueError, RecursionError):
            return config
        if not isinstance(posted, dict) or set(posted) <= {"version_policy"}:
            return config
        try:
            current = self.inference.model_config(name, "")
        except ServingError:  # nothing of it serves: no field can repeat what it serves with
            current = {}
        return json.dumps(unchanged(posted, current, name))

    async def unload(self, name: str) -> None:
        self._controllable()
        check_length("model_name", name)
        await self.repository.unload(name)

    # -- recalibration --------------------------------------------------------------------

    def suggestion(self, name: str, version: str) -> tuple[ServedModel, Suggestion, LabelledWindow]:
        """The temperature a serving version's labels suggest (`service.control.recalibrate`), and the labels it was
        fitted on: the fleet's from a database store, else this server's window. `NotEnoughLabels` below the minimum.
        Blocking: call it from a worker thread."""
        model = self.inference.get(name, version)
        window = self.feedback.window_of(model.name, model.version)
        labelled = self.feedback.labelled(model.name, model.version)
        if len(labelled) < self.recalibration_min_labels:
            where = "in the feedback store" if self.feedback.shared else "in its calibration window"
            raise NotEnoughLabels(f"model {model.name!r} version {model.version} has {len(labelled)} labelled "
                                  f"predictions {where}; a temperature is fitted from "
                                  f"{self.recalibration_min_labels} (--recalibration-min-labels): "
                                  + ("report more labels through valley.v1.Feedback"
                                     if self.recalibration_min_labels <= model.options.calibration_window else
                                     f"the window holds at most {model.options.calibration_window} (the model's "
                                     "calibration_window, or --calibration-window), so raise it or lower the minimum"))
        if window is not None and not self.feedback.shared:
            return model, self._fitted(model, window), labelled
        suggestion = suggest(labelled, model.ensemble.manifest.temperature)
        assert suggestion is not None, "the window holds labels"
        return model, suggestion, labelled

    def _fitted(self, model: ServedModel, window: CalibrationWindow) -> Suggestion:
        """The suggestion of a version's window (holding labels), fitted again only once new labels arrived: the
        metrics and the Calibration RPCs share it."""
        key = (model.name, model.version)
        cached = self._suggested.get(key)
        if cached is not None and cached[0] == window.generation:
            return cached[1]
        generation = window.generation
        suggestion = suggest(window.labelled(), model.ensemble.manifest.temperature)
        assert suggestion is not None, "the window holds labels"
        self._suggested[key] = (generation, suggestion)
        return suggestion

    def suggestions(self) -> list[tuple[str, str, Suggestion]]:
        """(model, version, suggestion) of every serving version with enough labels, for the metrics; each is fitted
        again only once new labels arrived. Runs in the metrics server's thread, at scrape time."""
        found = []
        for name, number, window in self.feedback.windows():
            if len(window) < self.recalibration_min_labels:
                continue
            try:
                model = self.repository.get(name, str(number))
            except ServingError:
                self._suggested.pop((name, number), None)
                continue
            found.append((name, str(number), self._fitted(model, window)))
        return found

    async def recalibrate(self, name: str, version: str, temperature: float, caller: str = ""
                          ) -> tuple[int, int, Suggestion, float]:
        """Publish a version of `name` at `temperature` (0: the suggested one), load it and swap to it: (the version
        recalibrated, the new version, the suggestion, the temperature applied)."""
        self._controllable()
        if not (temperature == 0 or TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]):
            raise InvalidInput(f"temperature must be 0 (the suggested one) or in [{TEMPERATURE_RANGE[0]}, "
                               f"{TEMPERATURE_RANGE[1]}], got {temperature}")
        # One publication at a time here, and under the store's lock across the fleet (valley-recalibrate takes it
        # too): each takes the next version number, and a version is recalibrated once.
        async with self._recalibrating, _held(self.feedback.lock(lock_name(name))):
            model, suggestion, labelled = await asyncio.to_thread(self.suggestion, name, version)
            newest = max(await asyncio.to_thread(self.repository.versions_on_disk, model.name), default=0)
            if newest > model.version:
                raise Superseded(f"model {model.name!r} has a newer version {newest} in the repository than version "
                                 f"{model.version} (published meanwhile, perhaps recalibrated by another replica or "
                                 "valley-recalibrate): recalibrate the newest version once it serves")
            policy = self.repository.policy_of(model.name)
            if not policy.serves_newest:
                raise LoadFailed(f"model {model.name!r} serves by the version policy {policy}, which would not serve "
                                 "a new version: set a latest:N or all policy, then recalibrate")
            chosen, after = await asyncio.to_thread(applied, suggestion, labelled, model.ensemble.manifest.temperature,
                                                    temperature)
            # Publishing and loading run to the end even if the caller goes away: a version is never left half
            # published, or published and not loaded.
            published = await asyncio.shield(self._publish(model, chosen, suggestion, after, caller))
            new = int(published.name)
            return model.version, new, suggestion, chosen

    async def _publish(self, model: ServedModel, temperature: float, suggestion: Suggestion,
                       after: dict[str, float], caller: str) -> Path:
        """Publish the recalibrated version and load it; a version that is not served afterwards is withdrawn."""
        try:
            published = await asyncio.to_thread(publish, model.ensemble.directory, temperature, suggestion, after,
                                                caller)
        except OSError as error:
            raise RepositoryNotWritable(
                f"the new version of {model.name!r} could not be written into the repository ({error.strerror}): "
                "recalibration publishes a version there, so the server needs write access to it (the default "
                "Kubernetes deployment mounts it read-only)") from error
        new = int(published.name)
        problem: LoadFailed | None = None
        try:
            await self.repository.refresh(model.name)
        except LoadFailed as error:  # may name another version's refusal while the new one serves
            problem = error
        if new in self.repository.versions(model.name):
            return published
        hidden = await asyncio.to_thread(withdraw, published)
        reason = str(problem) if problem is not None else \
            f"the version policy {self.repository.policy_of(model.name)} does not serve it"
        raise LoadFailed(f"version {new} of {model.name!r} was published but not served, and was withdrawn to "
                         f"{hidden.name}: {reason}")

    def _controllable(self) -> None:
        if self.inference.shutting_down:
            raise ShuttingDown("the server is shutting down: load or unload models on another replica")
        if self.model_control == "none":
            raise ModelControlOff("this server takes no load or unload requests (--model-control-mode none): "
                                  "restart it, or run it with --model-control-mode explicit or poll")


@asynccontextmanager
async def _held(lock: AbstractContextManager[None]) -> AsyncIterator[None]:
    """A blocking lock (the feedback store's, across processes) taken and released in worker threads."""
    await asyncio.to_thread(lock.__enter__)
    try:
        yield
    finally:
        await asyncio.to_thread(lock.__exit__, None, None, None)
