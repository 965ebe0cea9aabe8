"""Wide residual networks (Zagoruyko & Komodakis 2016); WRN-28-10 is the paper's largest model."""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.relu(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)  # type: ignore[no-any-return]


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for index in range(blocks):
                layers.append(WideBlock(in_planes, stage, stride if index == 0 else 1, dropout))
                in_planes = stage
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(in_planes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.conv1(x)))  # type: ignore[no-any-return]


@register_model("wrn28x10")
def wrn28x10(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels)
