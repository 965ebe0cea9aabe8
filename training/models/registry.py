"""Models by name: a registry of constructors, and the wrapper that puts normalisation inside."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from training.errors import UsageError

ModelFactory = Callable[[int, int, int], nn.Module]
"""A constructor taking (num_classes, in_channels, image_size)."""

_REGISTRY: dict[str, ModelFactory] = {}
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a constructor under `name` (decorator)."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def model_names() -> list[str]:
    return sorted(_REGISTRY)


class Classifier(nn.Module):
    """Normalises float pixels in [0, 1] per channel, then runs the network; returns logits.

    Keeping normalisation inside the module means checkpoints and exported graphs take pixels,
    so no client has to know a model's mean and standard deviation.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - self.mean) / self.std)  # type: ignore[no-any-return]


def create_model(
    name: str, num_classes: int, in_channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    """Build a registered model, `torchvision:<name>` or `timm:<name>` wrapped in a normalising `Classifier`."""
    if name.startswith(TORCHVISION_PREFIX):
        from training.models.torchvision_models import torchvision_classifier

        network = torchvision_classifier(name.removeprefix(TORCHVISION_PREFIX), num_classes, in_channels)
    elif name.startswith(TIMM_PREFIX):
        from training.models.timm_models import timm_classifier

        network = timm_classifier(name.removeprefix(TIMM_PREFIX), num_classes, in_channels, image_size)
    elif name in _REGISTRY:
        network = _REGISTRY[name](num_classes, in_channels, image_size)
    else:
        raise UsageError(
            f"unknown model {name!r}: choose one of {', '.join(model_names())}, "
            f"{TORCHVISION_PREFIX}<name> for a torchvision classifier (e.g. {TORCHVISION_PREFIX}resnet18), or "
            f"{TIMM_PREFIX}<name> for a timm one (e.g. {TIMM_PREFIX}resnet18)"
        )
    return Classifier(network, mean, std)
