"""A served ensemble version, as the inference path sees it, and what it looks versions up in.

The repository (`service.control.repository`) makes `ServedModel`s and is the `Models` the
inference half of the data plane reads; the core never needs to know how versions come and go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from artefact.policy import VersionPolicy
from service.core.abstention import Abstention
from service.core.batching import DynamicBatcher
from service.core.ensemble import Ensemble
from service.core.members import Plan
from service.core.modelsettings import ModelOptions
from service.core.sets import PredictionSets
from service.core.statistics import ModelStatistics

Fingerprint = tuple[tuple[str, int, int, int], ...]
"""(name, mtime_ns, size, inode) of every file of a version folder: a version whose files change (a copy that was
still being written when it was refused, a file replaced under a serving version) is loaded again."""


@dataclass
class ServedModel:
    """One ensemble version taking requests: the loaded graphs, their batcher, their counters."""

    instances: list[Ensemble]
    """Copies of the verified ensemble, each run by a compute thread of its own."""
    batcher: DynamicBatcher
    default_plan: Plan
    """What answers a request that does not name its members."""
    options: ModelOptions
    """The settings it serves with: its config.json's over the server's flags."""
    fingerprint: Fingerprint = ()
    abstention: Abstention | None = None
    """Selective prediction (the `abstain` output); None for a version exported without it."""
    sets: PredictionSets | None = None
    """Conformal prediction sets (the `prediction_set` and `set_size` outputs); None for a version exported without
    them."""

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


class Models(Protocol):
    """The versions serving, by name: what inference looks requests up in."""

    def get(self, name: str, version: str = "") -> ServedModel:
        """The version for a request (version "": the newest serving); `ModelNotFound` or `ModelNotReady`."""

    def versions(self, name: str) -> list[int]:
        """The versions of `name` serving, ascending."""

    def served(self) -> list[ServedModel]:
        """Every version serving (safe from another thread)."""

    def policy_of(self, name: str) -> VersionPolicy:
        """The version policy `name` serves by."""

    @property
    def ready(self) -> bool:
        """Every ensemble asked to load serves."""
