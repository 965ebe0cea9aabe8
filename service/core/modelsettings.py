"""The settings one served ensemble runs with: its config.json (`artefact.config`) over the server's flags."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from artefact.config import KINDS, Device, Execution, ModelSettings, Precision
from service.core.cpus import threads_per_instance
from service.errors import InvalidInput
from service.settings import Settings


@dataclass(frozen=True)
class ModelOptions:
    """The settings one ensemble is served with: its config.json over the server's flags."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay: float
    """Seconds a request waits for others to join its batch."""
    max_queue_size: int
    max_queue_wait: float | None
    """Seconds a request may wait for its run; None: no bound but its deadline."""
    degrade_after: float | None
    instances: int
    session_threads: int
    """onnxruntime intra-op threads per instance (0 in the settings: the usable cores shared among instances)."""
    device: Device
    execution: Execution
    precision: Precision
    members: str
    target_accuracy: float | None
    """The abstention target of requests that do not say; None: the manifest's."""
    coverage: float | None
    """The prediction sets' coverage of requests that do not say; None: the manifest's."""
    conformal_score: str | None
    """The prediction sets' conformity score of requests that do not say; None: the manifest's."""
    calibration_window: int
    drift_window: int

    @classmethod
    def of(cls, settings: Settings) -> ModelOptions:
        """What the server's flags give a model whose config.json sets nothing."""
        return cls(settings.max_batch_size, (), settings.max_queue_delay, settings.max_queue_size,
                   settings.max_queue_wait, settings.degrade_after, settings.instances, settings.threads_per_instance,
                   settings.device, settings.execution, settings.precision, settings.members, None, None, None,
                   settings.calibration_window, settings.drift_window)

    def over(self, config: ModelSettings | None, settings: Settings) -> ModelOptions:
        """These options with what `config` sets in their place."""
        if config is None:
            return self
        changes: dict[str, Any] = {key: value for key, value in (
            ("max_batch_size", config.max_batch_size), ("execution", config.execution),
            ("precision", config.precision), ("members", config.members),
            ("target_accuracy", config.target_accuracy), ("coverage", config.coverage),
            ("conformal_score", config.conformal_score), ("calibration_window", config.calibration_window),
            ("drift_window", config.drift_window)) if value is not None}
        if config.degrade_queue_ms is not None:
            changes["degrade_after"] = config.degrade_queue_ms / 1000.0 or None
        batching = config.dynamic_batching
        if batching is not None:
            changes["preferred_batch_sizes"] = tuple(batching.preferred_batch_size)
            if batching.max_queue_delay_microseconds is not None:
                changes["max_queue_delay"] = batching.max_queue_delay_microseconds / 1e6
            queue = batching.default_queue_policy
            if queue is not None and queue.max_queue_size is not None:
                changes["max_queue_size"] = queue.max_queue_size
            if queue is not None and queue.default_timeout_microseconds is not None:
                changes["max_queue_wait"] = queue.default_timeout_microseconds / 1e6 or None
        if config.instance_group is not None:
            group = config.instance_group[0]
            changes["instances"] = group.count
            if group.kind != "KIND_AUTO":
                changes["device"] = KINDS[group.kind]
        instances = changes.get("instances", self.instances)
        threads = config.session_threads if config.session_threads is not None else settings.session_threads
        changes["session_threads"] = threads_per_instance(threads, instances)
        options = replace(self, **changes)
        if options.preferred_batch_sizes and options.preferred_batch_sizes[-1] > options.max_batch_size:
            raise InvalidInput(f"dynamic_batching.preferred_batch_size {options.preferred_batch_sizes[-1]} is over "
                               f"the max_batch_size of {options.max_batch_size} (the server's --max-batch-size)")
        return options
