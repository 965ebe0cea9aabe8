"""Pre-activation ResNets for small images (He et al. 2016), as in the paper's CIFAR experiments."""

from __future__ import annotations

import torch
from torch import nn

from training.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual  # type: ignore[no-any-return]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual  # type: ignore[no-any-return]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PreResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if depth >= 44 and (depth - 2) % 9 == 0 and depth not in (56, 110):
            block, blocks = Bottleneck, (depth - 2) // 9
        elif (depth - 2) % 6 == 0:
            block, blocks = BasicBlock, (depth - 2) // 6
        else:
            raise ValueError(f"PreResNet depth must be 6n+2 (basic) or 9n+2 (bottleneck), got {depth}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.in_planes = 16
        self.layer1 = self._stage(block, 16, blocks, stride=1)
        self.layer2 = self._stage(block, 32, blocks, stride=2)
        self.layer3 = self._stage(block, 64, blocks, stride=2)
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, count: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for index in range(count):
            layers.append(block(self.in_planes, planes, stride if index == 0 else 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]


def _variant(depth: int) -> None:
    @register_model(f"preresnet{depth}")
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return PreResNet(depth, num_classes, in_channels)


for _depth in (20, 56, 110, 164):
    _variant(_depth)
