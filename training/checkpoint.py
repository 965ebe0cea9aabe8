"""Atomic checkpoints: written aside, flushed to disk, then renamed over the old one.

A process killed at any moment leaves either the previous checkpoint or the new one, never a
torn file, so `--resume` always finds something loadable. What a killed process leaves behind is
a hidden temporary (`.NAME.PID.tmp`), which nothing reads and `remove_temporaries` deletes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from artefact.repository import sync_directory
from training.errors import UsageError

FORMAT = "valley.checkpoint/1"

_TEMPORARY = re.compile(r"\..+\.\d+\.tmp")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Have `write` fill a temporary beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_directory(path.parent)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that readers see the old file or the new one, nothing else."""
    _replace_atomically(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def remove_temporaries(directory: Path) -> None:
    """Delete the temporaries that killed writers left in `directory` (nothing ever reads them)."""
    if directory.is_dir():
        for path in directory.iterdir():
            if _TEMPORARY.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; a missing, truncated or foreign file is a one-line `UsageError`."""
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise UsageError(f"{path} is not a readable checkpoint (truncated, or not written by valley-train): "
                         f"{_first_sentence(error)}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a valley checkpoint (expected format {FORMAT})")
    return state


def _first_sentence(error: Exception) -> str:
    # torch explains a bad file in paragraphs over several lines; an error here stays on one.
    lines = str(error).strip().splitlines()
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


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
    text = json.dumps(payload, indent=2) + "\n"
    _replace_atomically(path, lambda handle: handle.write(text.encode()))
