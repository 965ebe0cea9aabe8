"""A small, fast convolutional network with batch norm: the CPU default (242k parameters)."""

from __future__ import annotations

from torch import nn

from training.models.registry import register_model


def _conv_bn_pool(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


@register_model("cnn")
def small_cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Three conv-BN-ReLU-pool stages (32, 64, 128 channels) and a 128-unit hidden layer."""
    features = image_size // 8
    return nn.Sequential(
        *_conv_bn_pool(in_channels, 32), *_conv_bn_pool(32, 64), *_conv_bn_pool(64, 128),
        nn.Flatten(),
        nn.Linear(128 * features * features, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )
