"""The model repository: which ensembles exist on disk, which versions of each are served.

Layout: `ROOT/<name>/<version>/manifest.json` (integer versions), and optionally
`ROOT/<name>/config.json`: the ensemble's own settings (`service.core.modelsettings`: batching, queue,
instances, execution, precision, members, windows, version policy) over the server's flags, read at
every load; a version serving under other settings than the file now gives is loaded again. Which
versions serve is the version policy's choice: by default the newest one that verifies. Loading
reads and verifies a version beside the ones serving, in a worker thread (sha256s, the manifest's
sample outputs, a warm-up run of a full batch), and only then swaps the new set in, in one
assignment: requests already queued on a version that leaves finish on it, and a request that
reaches a retired version is sent on to its successor. A version that fails is refused with the
reason (and a metric) and never tried again until its manifest changes; what served before keeps
serving.

Model control follows Triton's modes: `none` loads everything at start and takes no load or
unload requests; `explicit` loads the names it is given at start (all by default) and then what
it is asked to; `poll` also looks at the repository every few seconds and loads what is new or
changed, unloading what was removed. Hidden entries (`.name`: exports in progress) are skipped;
anything else that is not `<name>/<version>/manifest.json` is reported once in the log and in
the repository index, never fatal. Loads and unloads are reported to the observer, and to the
state listener (the server's health service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from artefact.cascade import Cascade
from artefact.config import CONFIG_FILE, ConfigError, ModelSettings, config_text, parse
from artefact.manifest import MANIFEST_FILE, ManifestError
from artefact.policy import PolicyError, VersionPolicy
from artefact.repository import NAME, VERSION, published_versions, tidy
from service.core.abstention import Abstention
from service.core.batching import DynamicBatcher, ModelKey
from service.core.cpus import lower_thread_priority
from service.core.ensemble import Ensemble, load_ensemble
from service.core.members import default_plan, degraded_plan
from service.core.modelsettings import ModelOptions
from service.core.observer import Observer
from service.core.served import Fingerprint, ServedModel
from service.core.sets import PredictionSets
from service.errors import InvalidInput, LoadFailed, ModelNotFound, ModelNotReady
from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class State(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class IndexEntry:
    name: str
    version: str
    state: State
    reason: str = ""


@dataclass(frozen=True)
class Oddity:
    """Something in the repository that is not an ensemble version."""

    path: str
    """Relative to the repository."""
    reason: str


@dataclass
class _Slot:
    """Everything the repository knows about one ensemble name."""

    served: dict[int, ServedModel] = field(default_factory=dict)
    """The versions serving; replaced whole, never changed in place (readers on other threads see one set)."""
    state: State = State.UNAVAILABLE
    reason: str = "not loaded"
    wanted: bool = True
    """False once unloaded on request: then not being ready does not make the server unready, nor does polling
    load it again."""
    refused: dict[int, tuple[str, tuple[Fingerprint, ModelOptions]]] = field(default_factory=dict)
    """Versions that failed to load, with the reason, the files they had and the settings they were tried with."""
    override: VersionPolicy | None = None
    """The policy given by the last load request's `config` parameter."""
    policy: VersionPolicy | None = None
    """The policy the versions serving were chosen by."""
    seen: object = None
    """What the repository held for this name at the last load (polling loads again when it changes)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# Called with the name and whether a version of it now serves, after every load, refusal and unload.
StateListener = Callable[[str, bool], Awaitable[None]]


async def _ignore_state(name: str, serving: bool) -> None:
    pass


def _stamp(path: Path) -> tuple[str, int, int, int]:
    """(name, mtime_ns, size, inode) of a file; zeros when it is not there."""
    try:
        stat = os.stat(path)
    except OSError:
        return (path.name, 0, 0, 0)
    return (path.name, stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _fingerprint(version_dir: Path) -> Fingerprint:
    try:
        names = sorted(os.listdir(version_dir))
    except OSError:
        return ()
    return tuple(_stamp(version_dir / name) for name in names)


async def _in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a thread of its own that the process does not wait for at exit: a shutdown during a
    long load (hashing gigabytes on a slow volume) ends within its grace period."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        lower_thread_priority()  # onnxruntime's thread pools, started here, inherit the compute priority
        try:
            outcome: tuple[T | None, BaseException | None] = (function(*args), None)
        except BaseException as error:  # handed to the awaiting coroutine
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits for the result
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="valley-load", daemon=True).start()
    return await future


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


class Repository:
    def __init__(self, settings: Settings, observer: Observer, on_state: StateListener = _ignore_state) -> None:
        self.root = settings.repository
        self._settings = settings
        self.policy = VersionPolicy.parse(settings.version_policy)
        self.defaults = ModelOptions.of(settings)
        """What a model whose config.json does not say is served with."""
        self._observer, self._on_state = observer, on_state
        self._slots: dict[str, _Slot] = {}
        self._reported: set[Oddity] = set()

    # -- what is on disk ------------------------------------------------------------------

    def tidy(self) -> None:
        """Clean what killed exports, recalibrations and replacements left (`artefact.repository.tidy`), logged
        once; a repository the server cannot write (mounted read-only) is left as it is."""
        try:
            done = tidy(self.root)
        except OSError as error:  # the repository itself cannot be listed: the scan says so
            log.debug("the repository was not tidied: %s", error)
            return
        if done.failed:
            log.warning("the repository holds leftovers of interrupted exports or recalibrations: %s",
                        done.summary())
        elif done:
            log.info("the repository's leftovers of interrupted exports or recalibrations: %s", done.summary())

    def scan(self) -> tuple[dict[str, list[int]], list[Oddity]]:
        """Every ensemble folder that holds a version, by name (sorted), with its versions; and what else is there."""
        if not self.root.is_dir():
            raise ModelNotFound(f"the model repository {self.root} does not exist or is not a folder")
        found: dict[str, list[int]] = {}
        oddities: list[Oddity] = []
        for entry in sorted(self.root.iterdir()):
            if _hidden(entry):
                continue
            if not entry.is_dir():
                oddities.append(Oddity(entry.name, "not a folder: the repository holds <ensemble>/<version>/ folders"))
            elif not NAME.fullmatch(entry.name):
                oddities.append(Oddity(entry.name, "not an ensemble name (letters, digits and _ . -)"))
            else:
                versions, odd = self._versions(entry)
                oddities += odd
                if versions:
                    found[entry.name] = versions
                elif not odd:
                    oddities.append(Oddity(entry.name, "holds no version folder"))
        return found, oddities

    def versions_on_disk(self, name: str) -> list[int]:
        """Integer version folders that hold a manifest, ascending (none for a name the file system refuses)."""
        try:
            return published_versions(self.root / name) if NAME.fullmatch(name) else []
        except OSError:
            return []

    @staticmethod
    def _versions(folder: Path) -> tuple[list[int], list[Oddity]]:
        versions, oddities = [], []
        for entry in folder.iterdir():
            where = f"{folder.name}/{entry.name}"
            if _hidden(entry) or entry.name == CONFIG_FILE:
                continue
            if not entry.is_dir() or not VERSION.fullmatch(entry.name):
                oddities.append(Oddity(where, "not a version: versions are folders named by integers from 1 "
                                       "(no leading zeros)"))
            elif not (entry / MANIFEST_FILE).is_file():
                oddities.append(Oddity(where, f"no {MANIFEST_FILE}: an export in progress, or not a version"))
            else:
                versions.append(int(entry.name))
        return sorted(versions), oddities

    def _report(self, oddities: Sequence[Oddity]) -> None:
        """Log each oddity once (the index lists them for as long as they are there)."""
        for oddity in oddities:
            if oddity not in self._reported:
                log.warning("the repository holds %s: %s (ignored)", oddity.path, oddity.reason)
        self._reported = set(oddities)

    def policy_of(self, name: str) -> VersionPolicy:
        """The version policy of `name`: the one its serving versions were chosen by, else what a load would use now
        (the last load request's that took effect, its config.json's, or the server's; `LoadFailed` where its
        config.json is wrong)."""
        slot = self._slots.get(name)
        if slot is not None and slot.served and slot.policy is not None:
            return slot.policy
        override = slot.override if slot is not None else None
        return override or self._policy(self._config(name))

    def _policy(self, config: ModelSettings | None, override: VersionPolicy | None = None) -> VersionPolicy:
        """A load request's policy, else the config.json's, else the server's."""
        return override or (config.policy if config is not None else None) or self.policy

    def _config(self, name: str) -> ModelSettings | None:
        """`name`'s config.json (None where it has none); `LoadFailed` saying which key is wrong and why."""
        path = self.root / name / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            return parse(config_text(path, f"{name}/{CONFIG_FILE}"), f"{name}/{CONFIG_FILE}", name)
        except ConfigError as error:
            raise LoadFailed(str(error)) from None

    def _options(self, name: str, config: ModelSettings | None) -> ModelOptions:
        """What `name` is served with: its `config` (config.json's) over the server's flags."""
        try:
            return self.defaults.over(config, self._settings)
        except InvalidInput as error:
            raise LoadFailed(f"{name}/{CONFIG_FILE}: {error}") from None

    def _signature(self, name: str, versions: list[int] | None = None) -> object:
        """What polling compares: every version's files and the config file (`versions`: as a scan just listed
        them, else listed here)."""
        folder = self.root / name
        listed = self.versions_on_disk(name) if versions is None else versions
        return tuple((v, _fingerprint(folder / str(v))) for v in listed), _stamp(folder / CONFIG_FILE)

    # -- loading --------------------------------------------------------------------------

    async def load_all(self, names: Sequence[str] = ("*",), stopping: Callable[[], bool] = lambda: False) -> None:
        """Load every ensemble on disk (or the `names` given) by its policy; a failure is recorded, not raised.

        Every ensemble is marked LOADING first, so none counts as ready (or unknown) before its
        turn; `stopping` is asked between loads, so a shutdown does not wait for all of them.
        """
        found, oddities = await asyncio.to_thread(self.scan)
        self._report(oddities)
        chosen = list(found) if "*" in names else list(names)
        for name in chosen:
            slot = self._slots.setdefault(name, _Slot())
            slot.state, slot.reason = State.LOADING, "waiting to load"
        for name in chosen:
            if stopping():
                return
            try:
                await self.load(name)
            except (LoadFailed, ModelNotFound) as error:
                log.error("%s", error)
                slot = self._slots[name]
                if not slot.served:
                    slot.state, slot.reason = State.UNAVAILABLE, str(error)

    async def load(self, name: str, config: str | None = None) -> list[ServedModel]:
        """Load (or reload) `name` by its policy, swapping in the versions that verify; what serves after.

        `config`: a Triton-style JSON model config whose `version_policy` holds for this name from now on (None:
        the name's config.json, or the server's policy). Raises `LoadFailed` when a version the policy wants was
        refused, even if another serves. Runs to the end even when the caller is cancelled (a client's deadline),
        so a load is never left half done.
        """
        if not NAME.fullmatch(name):
            raise ModelNotFound(f"no ensemble {name!r}: names are up to 128 letters, digits and _ . - (not a path)")
        try:
            override = VersionPolicy.from_config(config, "the load's config parameter") if config is not None else None
        except PolicyError as error:
            raise InvalidInput(str(error)) from None
        if not self.versions_on_disk(name):
            raise ModelNotFound(f"no ensemble {name!r} in the repository (expected <repository>/{name}/<version>/"
                                f"{MANIFEST_FILE})")
        return await asyncio.shield(self._sync(name, override))

    async def refresh(self, name: str) -> list[ServedModel]:
        """Load `name` again under the policy it serves by now (a load request's config stays in force): what a
        version published by the server itself needs."""
        slot = self._slots.get(name)
        return await asyncio.shield(self._sync(name, slot.override if slot is not None else None))

    async def _sync(self, name: str, override: VersionPolicy | None) -> list[ServedModel]:
        """Serve what `override` (or config.json, or the server's policy) asks for; the override holds from now on
        only if something new was swapped in under it (a pin that cannot be served is refused, not kept)."""
        slot = self._slots.setdefault(name, _Slot())
        async with slot.lock:
            slot.wanted = True
            slot.seen = await asyncio.to_thread(self._signature, name)
            try:
                config = self._config(name)  # read once: the policy and the options come from one file
                policy, options = self._policy(config, override), self._options(name, config)
            except LoadFailed as error:
                await self._refuse_all(name, slot, str(error))
                raise LoadFailed(str(error) + self._still_serving(slot)) from None
            chosen, problems = await self._choose(name, slot, policy, options)
            if not chosen:
                reason = "; ".join(problems) or f"no version on disk fits the version policy {policy}"
                await self._refuse_all(name, slot, reason)
                raise LoadFailed(reason + self._still_serving(slot))
            previous, slot.served = slot.served, chosen
            slot.state, slot.reason, slot.override, slot.policy = State.READY, "", override, policy
            retired = [model for version, model in previous.items() if chosen.get(version) is not model]
            added = [model for version, model in chosen.items() if previous.get(version) is not model]
            await self._notify(name, added, retired)
        for model in retired:
            await model.batcher.stop()
        if problems:
            raise LoadFailed("; ".join(problems) + self._still_serving(slot))
        return list(chosen.values())

    async def _choose(self, name: str, slot: _Slot, policy: VersionPolicy, options: ModelOptions
                      ) -> tuple[dict[int, ServedModel], list[str]]:
        """The versions to serve under `policy` with `options` (kept or newly loaded), and what went wrong on the
        way."""
        on_disk = self.versions_on_disk(name)
        chosen: dict[int, ServedModel] = {}
        problems = [f"version {version} of {name!r} is not in the repository" for version in policy.versions
                    if policy.kind == "specific" and version not in on_disk]
        for version in policy.candidates(on_disk):
            if len(chosen) >= policy.wanted:
                break
            version_dir = self.root / name / str(version)
            fingerprint = _fingerprint(version_dir)
            current = slot.served.get(version)
            if current is not None and current.fingerprint == fingerprint and current.options == options:
                chosen[version] = current
                continue
            refused = slot.refused.get(version)
            if refused is not None and refused[1] == (fingerprint, options):  # tried, and unchanged since
                problems.append(f"version {version} of {name!r} was refused: {refused[0]}")
                if current is not None:
                    chosen[version] = current
                continue
            if not slot.served:
                slot.state, slot.reason = State.LOADING, f"loading version {version}"
            try:
                instances = await _in_daemon_thread(self._load_ensemble, name, version_dir, options)
            except Exception as error:  # whatever the files do to onnxruntime, the version is refused
                slot.refused[version] = (str(error), (fingerprint, options))
                self._observer.observe_load_failure(name, version)
                problems.append(f"version {version} of {name!r} was refused: {error}")
                log.error("version %d of %r was refused: %s", version, name, error)
                if current is not None:  # its files changed under it: the verified copy in memory keeps serving
                    chosen[version] = current
                continue
            slot.refused.pop(version, None)
            chosen[version] = self._serve(instances, fingerprint, options)
        return chosen, problems

    @staticmethod
    def _still_serving(slot: _Slot) -> str:
        if not slot.served:
            return ""
        versions = sorted(slot.served)
        if len(versions) == 1:
            return f" (version {versions[0]} keeps serving)"
        return f" (versions {', '.join(map(str, versions))} keep serving)"

    async def _refuse_all(self, name: str, slot: _Slot, reason: str) -> None:
        """Nothing new could be served: what served keeps serving; a name that served nothing is UNAVAILABLE."""
        if not slot.served:
            slot.state, slot.reason = State.UNAVAILABLE, reason
            await self._notify(name, [], [])

    def _load_ensemble(self, name: str, version_dir: Path, options: ModelOptions) -> list[Ensemble]:
        """The verified, warmed-up ensemble, and as many instances of it as `options` ask for."""
        ensemble = load_ensemble(version_dir, options.device, options.session_threads, options.execution,
                                 options.precision)
        manifest = ensemble.manifest
        if manifest.name != name or str(manifest.version) != version_dir.name:
            raise ManifestError(f"{version_dir}: the manifest names {manifest.name!r} version {manifest.version}; "
                                f"the folder must be {manifest.name}/{manifest.version}")
        # A default the version cannot meet is refused here, before the version is warmed up.
        Abstention.of(manifest, options.target_accuracy)
        PredictionSets.of(manifest, options.coverage, options.conformal_score)
        instances = [ensemble] + [ensemble.another_instance() for _ in range(options.instances - 1)]
        # A full batch through every instance: the first requests do not pay for onnxruntime's first-run set-up.
        shape = [options.max_batch_size, *manifest.input.shape[1:]]
        warm_up = np.zeros(shape, dtype=np.uint8)
        # Both paths: the fused graph, and the member graphs the cascades run on part of a batch.
        count = len(manifest.members)
        staged = [(len(warm_up), Cascade((1, count), (float("inf"),)))] if count > 1 else []
        for instance in instances:
            instance.run(warm_up, ["probabilities"])
            instance.run(warm_up, ["probabilities"], staged)
        return instances

    def _serve(self, instances: list[Ensemble], fingerprint: Fingerprint, options: ModelOptions) -> ServedModel:
        manifest = instances[0].manifest
        batcher = DynamicBatcher([instance.run for instance in instances], options.max_batch_size,
                                 options.max_queue_delay, options.max_queue_size,
                                 ModelKey(manifest.name, manifest.version, manifest.classes), self._observer,
                                 options.max_queue_wait, degraded_plan(manifest), options.degrade_after,
                                 options.preferred_batch_sizes)
        batcher.start()
        return ServedModel(instances, batcher, default_plan(manifest, options.members), options, fingerprint,
                           Abstention.of(manifest, options.target_accuracy),
                           PredictionSets.of(manifest, options.coverage, options.conformal_score))

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are refused, queued ones finish (even if the caller is cancelled)."""
        if name not in self._slots and not self.versions_on_disk(name):
            raise ModelNotFound(f"no ensemble {name!r} in the repository")
        await asyncio.shield(self._unload(name, "unloaded", wanted=False))

    async def _unload(self, name: str, reason: str, wanted: bool) -> None:
        slot = self._slots.setdefault(name, _Slot())
        async with slot.lock:
            previous, slot.served = slot.served, {}
            slot.state, slot.reason, slot.wanted = State.UNAVAILABLE, reason, wanted
            await self._notify(name, [], list(previous.values()))
        for model in previous.values():
            await model.batcher.stop()

    async def poll(self) -> None:
        """One look at the repository: load what is new or changed, unload what was removed."""
        found, oddities = await asyncio.to_thread(self.scan)
        self._report(oddities)
        signatures = await asyncio.to_thread(lambda: {name: self._signature(name, versions)
                                                      for name, versions in found.items()})
        for name in found:
            slot = self._slots.get(name)
            if slot is not None and (not slot.wanted or slot.seen == signatures[name]):
                continue
            try:
                await asyncio.shield(self._sync(name, slot.override if slot is not None else None))
            except LoadFailed as error:
                log.error("%s", error)
        for name in [name for name in self._slots if name not in found]:
            log.info("%s was removed from the repository: unloading it", name)
            await asyncio.shield(self._unload(name, "removed from the repository", wanted=False))
            # Forgotten: it no longer counts for readiness, and loads afresh if it comes back.
            if not self._slots[name].served:
                del self._slots[name]

    async def close(self) -> None:
        """Unload everything, letting queued requests finish."""
        for name in list(self._slots):
            await asyncio.shield(self._unload(name, "unloaded", wanted=False))

    async def _notify(self, name: str, added: list[ServedModel], retired: list[ServedModel]) -> None:
        for model in retired:
            self._observer.observe_unload(model.name, model.version)
        for model in added:
            self._observer.observe_load(model.ensemble, model.options.drift_window)
        await self._on_state(name, bool(self._slots[name].served))

    # -- lookups --------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model for a request; `version` "" means the newest version serving."""
        slot = self._slots.get(name)
        if slot is None:
            if not name:
                raise ModelNotFound("the request names no model: set model_name")
            known = ", ".join(self._slots) or "none"
            raise ModelNotFound(f"unknown model {name!r} (models: {known})")
        served = slot.served
        if not served:
            raise ModelNotReady(f"model {name!r} is not ready: {slot.reason}")
        if not version:
            return served[max(served)]
        model = served.get(int(version)) if VERSION.fullmatch(version) else None
        if model is None:
            serving = ", ".join(str(v) for v in sorted(served))
            raise ModelNotFound(f"model {name!r} has no version {version!r} being served (serving: {serving})")
        return model

    def calibration_window(self, name: str) -> int:
        """Labels in the calibration windows of `name`'s versions: its config.json's, else the server's."""
        slot = self._slots.get(name)
        served = slot.served if slot is not None else {}
        return served[max(served)].options.calibration_window if served else self.defaults.calibration_window

    def versions(self, name: str) -> list[int]:
        """The versions of `name` serving, ascending."""
        slot = self._slots.get(name)
        return sorted(slot.served) if slot is not None else []

    def served(self) -> list[ServedModel]:
        """Every version being served; safe to call from another thread (the metrics server's)."""
        return [model for slot in list(self._slots.values()) for model in list(slot.served.values())]

    @property
    def ready(self) -> bool:
        """Every ensemble that was asked to load is serving (unloaded ones do not count)."""
        return all(slot.served for slot in self._slots.values() if slot.wanted)

    def index(self) -> list[IndexEntry]:
        """Every version on disk with its state, and what else the repository holds (UNAVAILABLE, with why).

        Reads the disk: call it from a worker thread (it only reads the slots)."""
        found, oddities = self.scan()
        entries = []
        for name, versions in found.items():
            slot = self._slots.get(name, _Slot())
            try:
                policy = str(self.policy_of(name))
            except LoadFailed as error:
                policy = str(error)
            for version in versions:
                if version in slot.served:
                    entry = IndexEntry(name, str(version), State.READY)
                elif version in slot.refused:
                    entry = IndexEntry(name, str(version), State.UNAVAILABLE, slot.refused[version][0])
                elif version == versions[-1] and not slot.served:
                    entry = IndexEntry(name, str(version), slot.state, slot.reason)
                else:
                    entry = IndexEntry(name, str(version), State.UNAVAILABLE, f"not chosen by the version policy "
                                       f"({policy})")
                entries.append(entry)
        for oddity in oddities:
            folder, _, inside = oddity.path.partition("/")
            entries.append(IndexEntry(folder, inside, State.UNAVAILABLE, f"ignored: {oddity.reason}"))
        return entries

