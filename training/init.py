"""Networks trained elsewhere: a starting point read from a weight file (`--init PATH`).

A user's own classifier, saved by their own PyTorch code, or torchvision's published weights
read from disk (nothing is downloaded), becomes the start of a valley run: `train` fine-tunes
it, `fge` runs its cycles from it. The file may hold a plain state_dict, a checkpoint dict that
holds one (under `state_dict`, `model_state_dict`, `model`, `network` or `net`; valley's own
checkpoints too), saved with `torch.save`; it is read with `weights_only`, so it cannot run code.

The keys are the network's own (`conv.weight`, `fc.bias`: what `model.state_dict()` gives), or a
valley network's (`network.` before them; its normalisation buffers are the dataset's and are
kept). They are matched strictly: a missing or unexpected key, or a tensor of another shape, is
one line naming them. Two adaptations are made where they are asked for or unambiguous:
`--reset-head` leaves the classifier head (the network's last linear layer) as freshly
initialised, for weights trained on another set of classes; and a first convolution trained on
another number of input channels is adapted as timm does (summed for one channel from three,
repeated and rescaled otherwise).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import UsageError

log = logging.getLogger(__name__)

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "network", "net")
"""Where checkpoint dicts keep the network's state, in the order they are looked for."""
_SHOWN = 5


@dataclass(frozen=True)
class Initialised:
    """What was read into the network: the file, and what was adapted on the way."""

    path: Path
    tensors: int
    reset_head: tuple[str, ...] = ()
    """The head's keys left as initialised (--reset-head)."""
    adapted: tuple[str, ...] = ()
    """Keys whose input channels were adapted."""


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict a weight file holds; a one-line `UsageError` for anything else."""
    if path.is_dir():
        raise UsageError(f"--init {path} is a folder: pass the weight file (a valley run directory is a base run: "
                         "fge --from, curve --start/--end take it as it is)")
    if not path.is_file():
        raise UsageError(f"--init {path} does not exist")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--init {path} is not a PyTorch weight file torch.load can read safely: {first[:200]}"
                         ) from error
    for _ in range(3):  # a checkpoint may nest the state one or two levels down
        if _is_state(payload):
            return dict(payload)
        if not isinstance(payload, Mapping):
            break
        nested = next((payload[key] for key in NESTED_KEYS if key in payload), None)
        if nested is None:
            break
        payload = nested
    kind = type(payload).__name__
    keys = ", ".join(map(str, list(payload)[:_SHOWN])) if isinstance(payload, Mapping) else ""
    raise UsageError(f"--init {path} holds no state_dict (a {kind}{f' with keys {keys}' if keys else ''}): save "
                     f"`model.state_dict()`, or a dict holding it under one of {', '.join(NESTED_KEYS)}")


def _is_state(payload: Any) -> bool:
    return isinstance(payload, Mapping) and bool(payload) and \
        all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items())


def head_of(network: nn.Module) -> str:
    """The qualified name of the network's classifier head: its last linear layer."""
    linears: list[str] = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UsageError("--reset-head: this network has no linear layer to take for its classifier head")
    return linears[-1]


def _first_conv(network: nn.Module) -> str | None:
    return next((name for name, module in network.named_modules() if isinstance(module, nn.Conv2d)), None)


def _adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A convolution's weight [O, I, k, k] for `channels` inputs in place of I (timm's adapt_input_conv)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(channels / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown} and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else shown


def load_initial_weights(model: nn.Module, path: Path, reset_head: bool = False) -> Initialised:
    """Read `path` into `model` (a `Classifier`: normalisation, then `model.network`), keys matched strictly."""
    network: nn.Module = getattr(model, "network", model)
    state = read_weights(path)
    if any(key.startswith("network.") for key in state):  # a valley network, normalisation buffers included
        state = {key.removeprefix("network."): value for key, value in state.items() if key.startswith("network.")}
    own = network.state_dict()
    head = head_of(network) if reset_head else None
    skipped = tuple(key for key in own if head is not None and key.rpartition(".")[0] == head)
    missing = [key for key in own if key not in state and key not in skipped]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        problems = [*([f"missing {_listed(missing)}"] if missing else []),
                    *([f"unexpected {_listed(unexpected)}"] if unexpected else [])]
        raise UsageError(f"--init {path} does not fit this network: {'; '.join(problems)} (keys are matched "
                         "strictly: save the same architecture's model.state_dict())")
    conv = _first_conv(network)
    adapted, shapes, loaded = [], [], {}
    for key, tensor in own.items():
        if key in skipped:
            loaded[key] = tensor
            continue
        value = state[key]
        if value.shape != tensor.shape and conv is not None and key == f"{conv}.weight" and value.dim() == 4 \
                and value.shape[0] == tensor.shape[0] and value.shape[2:] == tensor.shape[2:]:
            value = _adapt_channels(value, tensor.shape[1])
            adapted.append(key)
        if value.shape != tensor.shape:
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(tensor.shape)}")
            continue
        loaded[key] = value.to(tensor.dtype)
    if shapes:
        hint = " (another class count: pass --reset-head to start the classifier head afresh)" \
            if head_of(network) in {shape.split(" ")[0].rpartition(".")[0] for shape in shapes} else ""
        raise UsageError(f"--init {path} does not fit this network: shapes differ for {_listed(shapes)}{hint}")
    network.load_state_dict(loaded, strict=True)
    if skipped:
        log.info("--init %s: the classifier head (%s) starts afresh", path, ", ".join(skipped))
    if adapted:
        log.info("--init %s: %s adapted to %d input channels", path, ", ".join(adapted),
                 own[adapted[0]].shape[1])
    return Initialised(path, len(loaded) - len(skipped), skipped, tuple(adapted))
