"""An ensemble's own serving settings: `<repository>/<name>/config.json` (the export may write it, the server
reads it over its flags).

Where Triton's model configuration has the concept, the file uses its names and shapes, so a
Triton user reads it at sight and the ModelConfig answer round-trips (`max_batch_size`,
`dynamic_batching` with `preferred_batch_size`, `max_queue_delay_microseconds` and
`default_queue_policy`, `instance_group`, `version_policy`; `name`, `platform` and `backend` may
be given where they say what is true). valley's own settings keep their flag names (`execution`,
`precision`, `members`, `degrade_queue_ms`, `session_threads`, `target_accuracy`, `calibration_window`,
`drift_window`), and the prediction sets' defaults are `coverage` and `conformal_score`. What the
file does not set, the server's flags (or the manifest) set.

The file is validated whole: an unknown key or a bad value refuses that ensemble's load with a
reason naming the key, and every other ensemble loads. It is read at every load (a load request,
or polling noticing the file changed), so a change applies to the versions loaded next.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from artefact.policy import PolicyError, VersionPolicy

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1 << 20
"""The largest config.json read (real ones are a few hundred bytes)."""
Device = Literal["auto", "cpu", "cuda"]
Execution = Literal["fused", "members"]
Precision = Literal["fp32", "int8", "fp16"]
MEMBER_CHOICES = ("cascade", "full", "front")
"""What a default `members` names besides a number of members."""
PLATFORM = "valley_ensemble"
BACKEND = "onnxruntime"
MAX_BATCH = 65_536
"""Largest batch a configuration may ask for (a typo of a few zeros would otherwise allocate gigabytes)."""
KINDS: dict[str, Device] = {"KIND_AUTO": "auto", "KIND_CPU": "cpu", "KIND_GPU": "cuda"}


class ConfigError(ValueError):
    """A config.json that cannot be served by; the message names the file and every wrong key."""


def check_members(value: str, name: str = "members") -> str:
    """A default `members`: 'cascade', 'full', 'front' or a positive number (a ValueError names what is wrong)."""
    value = value.strip().lower()
    if value in MEMBER_CHOICES or (value.isascii() and value.isdigit() and int(value) >= 1):
        return value
    raise ValueError(f"{name} takes 'cascade', 'full', 'front' or a number of members >= 1, not {value[:40]!r}")


def _integer(value: Any) -> Any:
    """JSON integers, and the strings protobuf's JSON writes 64-bit integers as ("100"); never true/false."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true/false")
    return value


Integer = Annotated[int, BeforeValidator(_integer)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueuePolicy(_Strict):
    """Triton's `ModelQueuePolicy` (REJECT only: a request that waits too long is refused, never kept)."""

    timeout_action: Literal["REJECT"] = "REJECT"
    default_timeout_microseconds: Integer | None = Field(None, ge=0, le=3_600_000_000)
    """Longest a request may wait for its run (0: no bound but the request's deadline)."""
    allow_timeout_override: Literal[True] = True
    """A request's own deadline always applies."""
    max_queue_size: Integer | None = Field(None, ge=1, le=1_000_000)


class DynamicBatching(_Strict):
    """Triton's `ModelDynamicBatching`."""

    preferred_batch_size: list[Integer] = Field(default_factory=list, max_length=64)
    """Batch sizes worth closing a batch at without waiting out the delay; the largest is the batch aimed for."""
    max_queue_delay_microseconds: Integer | None = Field(None, ge=0, le=10_000_000)
    default_queue_policy: QueuePolicy | None = None

    @field_validator("preferred_batch_size")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes are 1 or more")
        return sorted(set(sizes))


class InstanceGroup(_Strict):
    """Triton's `ModelInstanceGroup`: how many copies of the ensemble run, and on which kind of device."""

    name: str | None = None
    kind: Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"] = "KIND_AUTO"
    count: Integer = Field(1, ge=1, le=64)
    gpus: list[Integer] | None = None

    @field_validator("gpus")
    @classmethod
    def _first_gpu(cls, gpus: list[int] | None) -> list[int] | None:
        if gpus is not None and gpus != [0]:
            raise ValueError("valley runs on the first GPU the process sees (gpus: [0]); choose others with "
                             "CUDA_VISIBLE_DEVICES or one replica per GPU")
        return gpus


class ModelSettings(_Strict):
    """What one ensemble's config.json may set; None (absent) leaves the server's flag in force."""

    name: str | None = None
    platform: Literal["valley_ensemble"] | None = None
    backend: Literal["onnxruntime"] | None = None
    version_policy: dict[str, Any] | None = None
    max_batch_size: Integer | None = Field(None, ge=1, le=MAX_BATCH)
    dynamic_batching: DynamicBatching | None = None
    instance_group: list[InstanceGroup] | None = Field(None, min_length=1, max_length=1)
    execution: Execution | None = None
    precision: Precision | None = None
    members: str | None = None
    degrade_queue_ms: float | None = Field(None, ge=0, le=3_600_000)
    session_threads: Integer | None = Field(None, ge=0, le=1024)
    target_accuracy: float | None = Field(None, gt=0, le=1)
    coverage: float | None = Field(None, gt=0, le=1)
    conformal_score: Literal["lac", "aps", "raps"] | None = None
    calibration_window: Integer | None = Field(None, ge=1, le=1_000_000)
    drift_window: Integer | None = Field(None, ge=0, le=1_000_000)

    @field_validator("members", mode="before")
    @classmethod
    def _members(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # "members": 2 means what "members": "2" does
        return check_members(value) if isinstance(value, str) else value

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                VersionPolicy.from_json(value, "version_policy")
            except PolicyError as error:
                raise ValueError(str(error).removeprefix("version_policy: ")) from None
        return value

    @model_validator(mode="after")
    def _preferred_fit(self) -> ModelSettings:
        batching = self.dynamic_batching
        if batching is not None and self.max_batch_size is not None and batching.preferred_batch_size \
                and batching.preferred_batch_size[-1] > self.max_batch_size:
            raise ValueError(f"dynamic_batching.preferred_batch_size {batching.preferred_batch_size[-1]} is over "
                             f"max_batch_size {self.max_batch_size}")
        return self

    @property
    def policy(self) -> VersionPolicy | None:
        return None if self.version_policy is None else VersionPolicy.from_json(self.version_policy, "")


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigError(f"{where} is not JSON") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object of settings")
    return raw


def parse(text: str, where: str, name: str) -> ModelSettings:
    """config.json's text as settings; `ConfigError` names `where` and every key that is wrong, and why."""
    raw = _json_object(text, where)
    try:
        settings = ModelSettings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: {_reasons(error)}") from None
    if settings.name is not None and settings.name != name:
        raise ConfigError(f"{where}: name {settings.name[:100]!r} is not the ensemble's folder name {name!r} (leave "
                           "name out, or make it match)")
    return settings


def _reasons(error: ValidationError) -> str:
    reasons = []
    for problem in error.errors()[:8]:
        key = ".".join(str(part) for part in problem["loc"]) or "the file"
        if problem["type"] == "extra_forbidden":
            reasons.append(f"unknown key {key!r}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            reasons.append(message if message.startswith(f"{key} ") else f"{key}: {message}")
    more = error.error_count() - len(reasons)
    return "; ".join(reasons) + (f" (and {more} more)" if more > 0 else "") + \
        " (docs/serving.md lists the keys a model's config.json takes)"


def config_text(path: Path, shown: str = "") -> str:
    """The text of a config file; `ConfigError` (naming it as `shown`, else its path) where it cannot be read or
    holds more than `MAX_CONFIG_BYTES` (it is read at every load: a huge file is refused unread)."""
    where = shown or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {size} bytes, more than the {MAX_CONFIG_BYTES} a configuration may hold")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where} cannot be read: {error}") from None


def read_config(path: Path) -> dict[str, Any]:
    """The JSON object of a config file as written (not validated); `ConfigError` where it is not one."""
    return _json_object(config_text(path), str(path))


def set_key(config: dict[str, Any], item: str) -> dict[str, Any]:
    """`config` with one `KEY=VALUE` set: a dotted key reaches into an object (dynamic_batching.max_queue_delay_
    microseconds=500); the value is read as JSON where it is JSON (numbers, true, lists, objects), else as text."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{item[:100]!r}: give KEY=VALUE (a dotted KEY reaches into an object) or a JSON file")
    try:
        value: Any = json.loads(text)
    except (ValueError, RecursionError):
        value = text
    changed = copy.deepcopy(config)
    inner = changed
    for part in parts[:-1]:
        child = inner.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{item[:100]!r}: {part} is not an object")
        inner = child
    inner[parts[-1]] = value
    return changed


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    """Validate `config` for the ensemble in `folder` and write it as folder/config.json, whole or not at all (a
    server polling the repository never reads half a file)."""
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    parse(text, f"{folder.name}/{CONFIG_FILE}", folder.name)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{CONFIG_FILE}.", delete=False,
                                     encoding="utf-8") as aside:
        aside.write(text)
    os.replace(aside.name, folder / CONFIG_FILE)
    return folder / CONFIG_FILE
