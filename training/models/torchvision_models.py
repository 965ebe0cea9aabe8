"""Any torchvision classifier by name, adapted to the dataset's classes and input channels."""

from __future__ import annotations

from torch import nn

from training.errors import UsageError


def torchvision_classifier(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build torchvision's `name` from scratch (no weights download) for this dataset."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UsageError(f"unknown torchvision classifier {name!r}: choose one of {', '.join(available)}")
    network: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(network, in_channels)
    return network


def _replace_first_conv(network: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one taking `in_channels` (e.g. grayscale images)."""
    for qualified_name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, child_name = qualified_name.rpartition(".")
            setattr(network.get_submodule(parent_name), child_name, nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,  # type: ignore[arg-type]
                module.padding, module.dilation, module.groups, module.bias is not None,  # type: ignore[arg-type]
            ))
            return
    raise UsageError("this torchvision model has no Conv2d to adapt to the input channels")
