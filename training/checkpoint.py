"""Atomic checkpoints: written aside, flushed to disk, then renamed over the old one.

A process killed at any moment leaves either the previous checkpoint or the new one, never a
torn file, so `--resume` always finds something loadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.errors import UsageError

FORMAT = "valley.checkpoint/1"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that readers see the old file or the new one, nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        torch.save({"format": FORMAT, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; a missing or foreign file is a `UsageError`."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise UsageError(f"{path} is not a readable checkpoint ({type(error).__name__}): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a valley checkpoint (expected format {FORMAT})")
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], model_name: str, path: Path) -> None:
    """Load the weights of a checkpoint into `model`, refusing one of another architecture."""
    stored_name = state.get("model_name")
    if stored_name != model_name:
        raise UsageError(
            f"checkpoint {path} holds a {stored_name!r} model, not {model_name!r}: "
            f"pass --model {stored_name} or start a new run directory"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first_line = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UsageError(
            f"checkpoint {path} does not fit this {model_name!r} model ({first_line}): "
            "was it written for another dataset or model configuration?"
        ) from error


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (reports and configs are read by other programs while runs go on)."""
    import json

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)
