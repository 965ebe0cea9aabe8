"""The model repository: which ensembles exist on disk, which version of each is served.

Layout: `ROOT/<name>/<version>/manifest.json` (integer versions). The latest version of each
ensemble is served. Loading reads and verifies a version in a worker thread (sha256s, the
manifest's sample outputs) and only then swaps it in; a version that fails is refused with
the reason, and the version already serving (if any) keeps serving. Unloading stops taking
new requests and lets queued ones finish. Loads and unloads are reported to the observer,
and to the state listener (the server's health service).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from artefact.manifest import MANIFEST_FILE, ManifestError
from service.batching import DynamicBatcher, ModelKey
from service.ensemble import Ensemble, load_ensemble
from service.errors import LoadFailed, ModelNotFound, ModelNotReady
from service.observer import Observer
from service.settings import Settings
from service.statistics import ModelStatistics

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class State(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ServedModel:
    """One ensemble version taking requests: the loaded graphs, their batcher, their counters."""

    instances: list[Ensemble]
    """Copies of the verified ensemble, each run by a compute thread of its own."""
    batcher: DynamicBatcher

    @property
    def statistics(self) -> ModelStatistics:
        """What the version has done since it was loaded (the batcher counts its runs)."""
        return self.batcher.statistics

    @property
    def ensemble(self) -> Ensemble:
        """The version's ensemble (its first instance): manifest, providers."""
        return self.instances[0]

    @property
    def name(self) -> str:
        return self.ensemble.manifest.name

    @property
    def version(self) -> int:
        return self.ensemble.manifest.version


@dataclass
class IndexEntry:
    name: str
    version: str
    state: State
    reason: str = ""


@dataclass
class _Slot:
    """Everything the repository knows about one ensemble name."""

    served: ServedModel | None = None
    state: State = State.UNAVAILABLE
    reason: str = "not loaded"
    wanted: bool = True
    """False once unloaded on request: then not being ready does not make the server unready."""
    refused: dict[int, str] = field(default_factory=dict)
    """Versions that failed to load, with the reason."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# Called with the name and whether a version of it now serves, after every load, refusal and unload.
StateListener = Callable[[str, bool], Awaitable[None]]


async def _ignore_state(name: str, serving: bool) -> None:
    pass


class Repository:
    def __init__(self, settings: Settings, observer: Observer, on_state: StateListener = _ignore_state) -> None:
        self.root = settings.repository
        self._settings = settings
        self._observer, self._on_state = observer, on_state
        self._slots: dict[str, _Slot] = {}

    # -- what is on disk ------------------------------------------------------------------

    def on_disk(self) -> dict[str, list[int]]:
        """Every ensemble folder that holds a version, by name (sorted), with its versions."""
        if not self.root.is_dir():
            raise ModelNotFound(f"the model repository {self.root} does not exist or is not a folder")
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        found = {name: self.versions_on_disk(name) for name in names}
        return {name: versions for name, versions in found.items() if versions}

    def versions_on_disk(self, name: str) -> list[int]:
        """Integer version folders that hold a manifest, ascending."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isdigit() and (p / MANIFEST_FILE).is_file())

    # -- loading --------------------------------------------------------------------------

    async def load_all(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Load the latest version of every ensemble on disk; a failure is recorded, not raised.

        Every ensemble is marked LOADING first, so none counts as ready (or unknown) before its
        turn; `stopping` is asked between loads, so a shutdown does not wait for all of them.
        """
        names = list(self.on_disk())
        for name in names:
            slot = self._slots.setdefault(name, _Slot())
            slot.state, slot.reason = State.LOADING, "waiting to load"
        for name in names:
            if stopping():
                return
            try:
                await self.load(name)
            except LoadFailed as error:
                log.error("%s", error)

    async def load(self, name: str) -> ServedModel:
        """Load (or reload) the latest version of `name` and swap it in once verified.

        Runs to the end even when the caller is cancelled (a client's deadline), so a load is
        never left half done.
        """
        if not NAME.fullmatch(name):
            raise ModelNotFound(f"no ensemble {name!r}: names are letters, digits and _ . - (not a path)")
        versions = self.versions_on_disk(name)
        if not versions:
            raise ModelNotFound(f"no ensemble {name!r} in the repository (expected <repository>/{name}/<version>/"
                                f"{MANIFEST_FILE})")
        return await asyncio.shield(self._load(name, versions[-1]))

    async def _load(self, name: str, version: int) -> ServedModel:
        slot = self._slots.setdefault(name, _Slot())
        async with slot.lock:
            slot.wanted = True
            if slot.served is None:
                slot.state, slot.reason = State.LOADING, f"loading version {version}"
            try:
                instances = await asyncio.to_thread(self._load_ensemble, name, self.root / name / str(version))
            except Exception as error:  # whatever the files do to onnxruntime, the version is refused
                reason = f"version {version} of {name!r} was refused: {error}"
                slot.refused[version] = str(error)
                if slot.served is None:
                    slot.state, slot.reason = State.UNAVAILABLE, reason
                    await self._notify(name, None, None)
                else:
                    reason += f" (version {slot.served.version} keeps serving)"
                raise LoadFailed(reason) from error
            slot.refused.pop(version, None)
            served = self._serve(instances)
            previous, slot.served = slot.served, served
            slot.state, slot.reason = State.READY, ""
            await self._notify(name, served, previous)
        if previous is not None:
            await previous.batcher.stop()
        return served

    def _load_ensemble(self, name: str, version_dir: Path) -> list[Ensemble]:
        """The verified ensemble, and as many instances of it as the settings ask for."""
        settings = self._settings
        ensemble = load_ensemble(version_dir, settings.device, settings.threads_per_instance, settings.execution)
        manifest = ensemble.manifest
        if manifest.name != name or str(manifest.version) != version_dir.name:
            raise ManifestError(f"{version_dir}: the manifest names {manifest.name!r} version {manifest.version}; "
                                f"the folder must be {manifest.name}/{manifest.version}")
        return [ensemble] + [ensemble.another_instance() for _ in range(settings.instances - 1)]

    def _serve(self, instances: list[Ensemble]) -> ServedModel:
        manifest = instances[0].manifest
        settings = self._settings
        batcher = DynamicBatcher([instance.run for instance in instances], settings.max_batch_size,
                                 settings.max_queue_delay, settings.max_queue_size,
                                 ModelKey(manifest.name, manifest.version, manifest.classes), self._observer,
                                 settings.max_queue_wait)
        batcher.start()
        return ServedModel(instances, batcher)

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are refused, queued ones finish (even if the caller is cancelled)."""
        if name not in self._slots and not (NAME.fullmatch(name) and self.versions_on_disk(name)):
            raise ModelNotFound(f"no ensemble {name!r} in the repository")
        await asyncio.shield(self._unload(name))

    async def _unload(self, name: str) -> None:
        slot = self._slots.setdefault(name, _Slot())
        async with slot.lock:
            previous, slot.served = slot.served, None
            slot.state, slot.reason, slot.wanted = State.UNAVAILABLE, "unloaded", False
            await self._notify(name, None, previous)
        if previous is not None:
            await previous.batcher.stop()

    async def close(self) -> None:
        """Unload everything, letting queued requests finish."""
        for name in list(self._slots):
            await self.unload(name)

    async def _notify(self, name: str, current: ServedModel | None, previous: ServedModel | None) -> None:
        if previous is not None:
            self._observer.observe_unload(previous.name, previous.version)
        if current is not None:
            self._observer.observe_load(current.ensemble)
        await self._on_state(name, current is not None)

    # -- lookups --------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model for a request; `version` "" means the one being served."""
        slot = self._slots.get(name)
        if slot is None:
            if not name:
                raise ModelNotFound("the request names no model: set model_name")
            known = ", ".join(self._slots) or "none"
            raise ModelNotFound(f"unknown model {name!r} (models: {known})")
        served = slot.served
        if served is None:
            raise ModelNotReady(f"model {name!r} is not ready: {slot.reason}")
        if version and version != str(served.version):
            raise ModelNotFound(f"model {name!r} has no version {version!r} being served (serving version "
                                f"{served.version})")
        return served

    def served(self) -> list[ServedModel]:
        """Every version being served; safe to call from another thread (the metrics server's)."""
        return [served for slot in list(self._slots.values()) if (served := slot.served) is not None]

    @property
    def ready(self) -> bool:
        """Every ensemble that was asked to load is serving (unloaded ones do not count)."""
        return all(slot.served is not None for slot in self._slots.values() if slot.wanted)

    def index(self) -> list[IndexEntry]:
        """Every version on disk with its state; only the served version is READY."""
        entries = []
        for name, versions in self.on_disk().items():
            slot = self._slots.get(name, _Slot())
            for version in versions:
                if slot.served is not None and slot.served.version == version:
                    entry = IndexEntry(name, str(version), State.READY)
                elif version in slot.refused:
                    entry = IndexEntry(name, str(version), State.UNAVAILABLE, slot.refused[version])
                elif version == versions[-1] and slot.served is None:
                    entry = IndexEntry(name, str(version), slot.state, slot.reason)
                else:
                    entry = IndexEntry(name, str(version), State.UNAVAILABLE, "not the latest version")
                entries.append(entry)
        return entries
