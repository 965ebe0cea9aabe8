"""K same-architecture members as one network with K times wider layers (member-stacked execution).

The first convolution has K*out channels on the shared input; later convolutions read only
their own member's channels (`groups=K`); each eval-mode batch norm is folded into the
convolution or linear layer before it; after the flatten, linear layers are batched matrix
products over [K, B, F]. The result computes exactly the members' logits, in one pass over
K times fewer, larger operators.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from training.models.registry import Classifier

Norm = TypeVar("Norm", nn.BatchNorm1d, nn.BatchNorm2d)

# Per-element or per-channel layers: on stacked channels they act as on each member's own.
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d)


class ConvStack(nn.Module):
    """K members' convolutions (each with its batch norm folded in) as one convolution over stacked channels."""

    def __init__(self, convolutions: Sequence[nn.Conv2d], norms: Sequence[nn.BatchNorm2d | None],
                 shared_input: bool) -> None:
        super().__init__()
        first = convolutions[0]
        for conv in convolutions:
            if (conv.groups != 1 or conv.padding_mode != "zeros" or conv.weight.shape != first.weight.shape
                    or (conv.stride, conv.padding, conv.dilation) != (first.stride, first.padding, first.dilation)):
                raise ValueError(f"stacking handles plain zero-padded convolutions of one shape, not {conv} "
                                 f"beside {first}")
        count = len(convolutions)
        weights, biases = zip(*(_folded(conv.weight, conv.bias, norm)
                                for conv, norm in zip(convolutions, norms, strict=True)), strict=True)
        # On the shared input one convolution with K*out channels computes every member's at once.
        self.conv = nn.Conv2d(first.in_channels if shared_input else count * first.in_channels,
                              count * first.out_channels, first.kernel_size, first.stride,  # type: ignore[arg-type]
                              first.padding, first.dilation, groups=1 if shared_input else count,  # type: ignore[arg-type]
                              bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat(weights))
            self.conv.bias.copy_(torch.cat(biases))  # type: ignore[union-attr]
        self.conv.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)  # type: ignore[no-any-return]


class MemberFlatten(nn.Module):
    """[B, K*C, H, W] stacked feature maps -> [K, B, C*H*W], each member's features in `nn.Flatten`'s order."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.reshape(features.shape[0], self.count, -1).transpose(0, 1)


class LinearStack(nn.Module):
    """K members' linear layers (each with its batch norm folded in) as one batched matrix product over [K, B, F]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, linears: Sequence[nn.Linear], norms: Sequence[nn.BatchNorm1d | None]) -> None:
        super().__init__()
        if any(linear.weight.shape != linears[0].weight.shape for linear in linears):
            raise ValueError("stacking needs the members' linear layers to have one shape")
        weights, biases = zip(*(_folded(linear.weight, linear.bias, norm)
                                for linear, norm in zip(linears, norms, strict=True)), strict=True)
        self.register_buffer("weight", torch.stack(weights).transpose(1, 2).contiguous())
        self.register_buffer("bias", torch.stack(biases).unsqueeze(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, features, self.weight)


class StackedMembers(nn.Module):
    """Float pixels [B, C, H, W] in [0, 1] -> every member's logits [B, K, classes], as one network."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers((images - self.mean) / self.std).transpose(0, 1)  # type: ignore[no-any-return]


def stack_members(members: Sequence[nn.Module]) -> StackedMembers:
    """One network computing the logits of K eval-mode `Classifier(nn.Sequential)` members of one architecture
    built from Conv2d, BatchNorm2d, ReLU, MaxPool2d, then Flatten, Linear, BatchNorm1d, ReLU (the `cnn` model)."""
    if not members:
        raise ValueError("stacking needs at least one member")
    if any(member.training for member in members):
        raise ValueError("stacking folds batch norm with its running statistics: put the members in eval mode")
    classifiers = [member for member in members if isinstance(member, Classifier)]
    networks = [c.network for c in classifiers if isinstance(c.network, nn.Sequential)]
    if len(networks) != len(members):
        raise ValueError("stacking handles Classifier(nn.Sequential) members, as build_model builds the cnn model")
    first = classifiers[0]
    if not all(torch.equal(c.mean, first.mean) and torch.equal(c.std, first.std) for c in classifiers):
        raise ValueError("the members normalise their input differently, so they cannot share one input")
    sequences = [list(network) for network in networks]
    depth = len(sequences[0])
    if any(len(layers) != depth for layers in sequences):
        raise ValueError("the members differ in depth: stacking needs one architecture")

    count = len(members)
    stacked: list[nn.Module] = []
    flattened = False
    index = 0
    while index < depth:
        layers = [sequence[index] for sequence in sequences]
        kind = type(layers[0])
        if any(type(layer) is not kind for layer in layers):
            raise ValueError(f"layer {index} is a {kind.__name__} in the first member but not in all: "
                             "stacking needs one architecture")
        following = [sequence[index + 1] if index + 1 < depth else None for sequence in sequences]
        if kind is nn.Conv2d and not flattened:
            conv_norms = _norms_after(following, nn.BatchNorm2d, index)
            convolutions = [layer for layer in layers if isinstance(layer, nn.Conv2d)]
            shared_input = not any(isinstance(module, ConvStack) for module in stacked)
            stacked.append(ConvStack(convolutions, conv_norms, shared_input))
            index += 1 if conv_norms[0] is None else 2
        elif kind is nn.Linear and flattened:
            linear_norms = _norms_after(following, nn.BatchNorm1d, index)
            linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
            stacked.append(LinearStack(linears, linear_norms))
            index += 1 if linear_norms[0] is None else 2
        elif _flattens_images(layers[0]) and not flattened and stacked:
            stacked.append(MemberFlatten(count))
            flattened = True
            index += 1
        elif kind in _CHANNELWISE:
            stacked.append(copy.deepcopy(layers[0]))
            index += 1
        else:
            raise ValueError(f"stacking does not handle a {kind.__name__} at layer {index} "
                             f"({'after' if flattened else 'before'} the Flatten)")
    if not flattened:
        raise ValueError("stacking needs a Flatten between the convolutions and the linear layers")
    return StackedMembers(first.mean, first.std, stacked)


def _flattens_images(layer: nn.Module) -> bool:
    """Whether `layer` flattens [B, C, H, W] to [B, C*H*W] (how MemberFlatten orders each member's features)."""
    return isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1


def _norms_after(following: Sequence[nn.Module | None], norm: type[Norm], index: int) -> list[Norm | None]:
    """The batch norms right after layer `index` of each member: all of them, or None for every member."""
    norms = [layer if isinstance(layer, norm) else None for layer in following]
    if any(n is None for n in norms) and any(n is not None for n in norms):
        raise ValueError(f"layer {index + 1} is a {norm.__name__} in some members only: stacking needs one "
                         "architecture")
    return norms


def _folded(weight: torch.Tensor, bias: torch.Tensor | None,
            norm: nn.BatchNorm1d | nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight and bias (output channels first) with the eval-mode batch norm after it folded in."""
    weight = weight.detach()
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.detach()
    if norm is None:
        return weight, bias
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{norm} keeps no running statistics, so there is nothing to fold")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight.detach(), shift * norm.weight.detach() + norm.bias.detach()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.view(shape), bias * scale + shift
