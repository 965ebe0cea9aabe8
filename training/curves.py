"""Low-loss curves between two trained networks (Garipov et al. 2018), for any `nn.Module`.

A curve is a list of control points w_0..w_{n-1}, one full set of the network's parameters each:
the two endpoints (fixed) and the bends between them (trained). The weights at t are
w(t) = sum_k c_k(t) w_k, with Bernstein coefficients for a Bezier curve and hat functions for a
polygonal chain, and the network runs on them through `torch.func.functional_call`: the same
module, no hand-written curve twin of each layer, parameters matched by name.

Batch-norm running statistics mean nothing along a trained curve (every step ran at another t),
so every point taken off a curve gets them recomputed over the training data
(`recompute_batch_norm`) before it is evaluated or exported.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Final, Literal, get_args

import torch
from torch import nn
from torch.func import functional_call

from training import distributed
from training.config import CurveKind

CURVE_KINDS: Final[tuple[str, ...]] = get_args(CurveKind)


def evenly_spaced(count: int) -> list[float]:
    """`count` >= 2 evenly spaced t from 0 to 1, both ends included: curve-eval's grid, export's --num-points."""
    return [index / (count - 1) for index in range(count)]


def bezier_coefficients(t: float, points: int) -> torch.Tensor:
    """Bernstein polynomials c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k), k = 0..n-1 (float64)."""
    degree = points - 1
    return torch.tensor([math.comb(degree, k) * t**k * (1.0 - t) ** (degree - k) for k in range(points)],
                        dtype=torch.float64)


def polychain_coefficients(t: float, points: int) -> torch.Tensor:
    """Hat functions c_k(t) = max(0, 1 - |t (n-1) - k|), k = 0..n-1 (float64): a polygonal chain."""
    position = t * (points - 1)
    return torch.tensor([max(0.0, 1.0 - abs(position - k)) for k in range(points)], dtype=torch.float64)


def curve_coefficients(kind: CurveKind, t: float, points: int) -> torch.Tensor:
    """The weights of the `points` control points at `t` in [0, 1]; they sum to 1."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if points < 2:
        raise ValueError(f"a curve has at least its two endpoints, got {points} control points")
    if kind == "bezier":
        return bezier_coefficients(t, points)
    if kind == "polychain":
        return polychain_coefficients(t, points)
    raise ValueError(f"unknown curve {kind!r}: choose one of {', '.join(CURVE_KINDS)}")


def _key(name: str) -> str:
    """A parameter's name as a key of a control point (module names may not hold dots): checkpoints keep
    every control point's parameters by the network's own names, `points.K.layer1:0:conv1:weight`."""
    return name.replace(".", ":")


class ParameterMismatch(ValueError):
    """An endpoint state dict that does not hold the architecture's parameters and buffers (names or shapes)."""


def _check_endpoint(network: nn.Module, state: Mapping[str, torch.Tensor], which: str) -> None:
    expected = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    missing = [name for name in expected if name not in state]
    if missing:
        raise ParameterMismatch(f"the {which} network has no {missing[0]!r}")
    extra = [name for name in state if name not in expected]
    if extra:
        raise ParameterMismatch(f"the {which} network has {extra[0]!r}, which the architecture has not")
    for name, like in expected.items():
        if state[name].shape != like.shape:
            raise ParameterMismatch(f"the {which} network's {name!r} is {tuple(state[name].shape)}, "
                                    f"the architecture's is {tuple(like.shape)}")


class _Buffers(nn.Module):
    """One endpoint's buffers (batch-norm statistics, constants) under the network's names: saved with the
    curve, so a trained curve needs nothing of the runs it joined."""

    def __init__(self, network: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = [name for name, _ in network.named_buffers()]
        for name, like in network.named_buffers():
            self.register_buffer(_key(name), state[name].detach().to(like.device).clone())

    def by_name(self) -> dict[str, torch.Tensor]:
        return {name: self.get_buffer(_key(name)) for name in self.names}


class Curve(nn.Module):
    """A curve between two networks of one architecture: fixed endpoints and `bends` trainable bends.

    `network` is the architecture's template: its own parameters are never used (they are replaced
    by w(t) at every call) and it keeps its buffers (batch-norm statistics, constants). Every
    control point holds a copy of every parameter of `network`, by name; the endpoints are not
    trainable, so gradients reach only the bends. A curve with no bends is the straight line.
    """

    def __init__(self, network: nn.Module, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                 kind: CurveKind = "bezier", bends: int = 1) -> None:
        super().__init__()
        if kind not in CURVE_KINDS:
            raise ValueError(f"unknown curve {kind!r}: choose one of {', '.join(CURVE_KINDS)}")
        if bends < 0:
            raise ValueError(f"bends must be >= 0, got {bends}")
        self.kind: CurveKind = kind
        self.network = network
        self.names = [name for name, _ in network.named_parameters()]
        self._strides = {name: parameter.stride() for name, parameter in network.named_parameters()}
        _check_endpoint(network, start, "start")
        _check_endpoint(network, end, "end")
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        like = dict(network.named_parameters())
        count = bends + 2
        points = []
        for k in range(count):
            # Bends start on the straight line: w_k = (k/(n-1)) w_end + (1 - k/(n-1)) w_start.
            share = k / (count - 1)
            point = nn.ParameterDict()
            for name in self.names:
                if k == 0:
                    value = start[name]
                elif k == count - 1:
                    value = end[name]
                else:
                    value = torch.lerp(start[name].double(), end[name].double(), share)
                # The template's exact strides: a channels_last conv weight stays channels_last even where
                # its layout is ambiguous (one input channel), or every activation would change layout.
                tensor = torch.empty_like(like[name]).copy_(value.detach())
                point[_key(name)] = nn.Parameter(tensor, requires_grad=0 < k < count - 1)
            points.append(point)
        self.points = nn.ModuleList(points)
        # Buffers (batch-norm statistics, constants) at each endpoint, to place them along t.
        self.start_buffers = _Buffers(network, start)
        self.end_buffers = _Buffers(network, end)
        self.last_l2: torch.Tensor | None = None

    @classmethod
    def from_state_dict(cls, network: nn.Module, state: Mapping[str, torch.Tensor], kind: CurveKind,
                        bends: int) -> Curve:
        """The curve a `state_dict()` of a `bends`-bend curve of `network`'s architecture holds."""
        parameters = [name for name, _ in network.named_parameters()]
        buffers = [name for name, _ in network.named_buffers()]

        def endpoint(k: int, holder: str) -> dict[str, torch.Tensor]:
            try:
                return {**{name: state[f"points.{k}.{_key(name)}"] for name in parameters},
                        **{name: state[f"{holder}.{_key(name)}"] for name in buffers}}
            except KeyError as error:
                raise ParameterMismatch(f"the checkpoint has no {error.args[0]!r}") from None

        curve = cls(network, endpoint(0, "start_buffers"), endpoint(bends + 1, "end_buffers"), kind, bends)
        try:
            curve.load_state_dict(state)
        except RuntimeError as error:
            raise ParameterMismatch(str(error).splitlines()[-1].strip()) from error
        return curve

    @property
    def bends(self) -> int:
        return len(self.points) - 2

    def control_point(self, k: int) -> dict[str, nn.Parameter]:
        """Control point k (0 is the start, bends + 1 the end): its parameters by the network's names."""
        point: nn.ParameterDict = self.points[k]  # type: ignore[assignment]  # ModuleList items are Modules
        return {name: point[_key(name)] for name in self.names}

    def bend_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the bends' parameters (the endpoints stay fixed)."""
        return [parameter for k in range(1, len(self.points) - 1) for parameter in self.control_point(k).values()]

    def coefficients(self, t: float) -> torch.Tensor:
        return curve_coefficients(self.kind, t, len(self.points))

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        """w(t) for every parameter, by name (differentiable in the bends)."""
        coefficients = self.coefficients(t).tolist()
        points = [self.control_point(k) for k in range(len(self.points))]
        weights = {}
        for name in self.names:
            # Control points with a zero coefficient are skipped: at t = 0 and t = 1 the weights are the
            # endpoint's own, bit for bit, and a polychain step touches two points only.
            terms = [c * points[k][name] for k, c in enumerate(coefficients) if c != 0.0]
            weight = terms[0]
            for term in terms[1:]:
                weight = weight + term
            strides = self._strides[name]
            if weight.stride() != strides:
                # Arithmetic on a conv weight whose layout is ambiguous (one input channel) gives it contiguous
                # strides; the template's channels_last strides keep every activation channels_last (1.6x faster).
                weight = torch.empty_strided(weight.shape, strides, dtype=weight.dtype,
                                             device=weight.device).copy_(weight)
            weights[name] = weight
        return weights

    def forward(self, images: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """Logits of the network at `t`; in training mode with no `t`, one t ~ U(0, 1) for the batch.

        t is drawn from torch's global generator, whose state every checkpoint saves, so a resumed
        run draws the same t's. `last_l2` is ||w(t)||^2, for the loss's weight-decay term.
        """
        if t is None:
            if not self.training:
                raise ValueError("pass t to evaluate a curve: it is sampled only in training")
            t = float(torch.rand(()))
        weights = self.weights(t)
        self.last_l2 = sum((w.pow(2).sum() for w in weights.values()), torch.zeros((), device=images.device))
        logits: torch.Tensor = functional_call(self.network, weights, (images,))
        return logits

    def buffers_at(self, t: float) -> dict[str, torch.Tensor]:
        """The endpoints' buffers placed at `t`: equal ones as they are, float ones on the line between them.

        Batch-norm statistics placed so are a starting point only: `recompute_batch_norm` replaces them.
        """
        placed = {}
        ends = self.end_buffers.by_name()
        for name, first in self.start_buffers.by_name().items():
            last = ends[name]
            if torch.equal(first, last) or t == 0.0:
                placed[name] = first
            elif t == 1.0:
                placed[name] = last
            elif first.is_floating_point():
                placed[name] = torch.lerp(first, last, t)
            else:
                placed[name] = first if t < 0.5 else last
        return placed

    def endpoint_state(self, which: Literal["start", "end"]) -> dict[str, torch.Tensor]:
        """An endpoint's full state dict: its parameters (a control point) and its buffers."""
        k, buffers = (0, self.start_buffers) if which == "start" else (len(self.points) - 1, self.end_buffers)
        state = {name: parameter.detach() for name, parameter in self.control_point(k).items()}
        return {**state, **buffers.by_name()}

    @torch.no_grad()
    def endpoint_network(self, which: Literal["start", "end"]) -> nn.Module:
        """A plain copy of an endpoint network as it was trained (its own batch-norm statistics), in eval mode."""
        network = copy.deepcopy(self.network)
        network.load_state_dict({name: value.clone() for name, value in self.endpoint_state(which).items()})
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        return network.eval()

    def line(self) -> Curve:
        """The straight line between this curve's endpoints (a curve with no bends), for comparison."""
        return Curve(copy.deepcopy(self.network), self.endpoint_state("start"), self.endpoint_state("end"),
                     self.kind, bends=0)

    @torch.no_grad()
    def network_at(self, t: float) -> nn.Module:
        """A plain copy of the network with the weights w(t) (batch-norm statistics still to recompute)."""
        network = copy.deepcopy(self.network)
        state = {name: weight.detach().clone() for name, weight in self.weights(t).items()}
        state.update({name: value.clone() for name, value in self.buffers_at(t).items()})
        network.load_state_dict(state, strict=True)
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        return network.eval()


def has_batch_norm(network: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in network.modules())


@torch.no_grad()
def recompute_batch_norm(network: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every batch-norm layer's running statistics by their exact average over `batches`.

    One forward pass with batch norm in training mode, each batch weighted by its size (momentum
    b / (seen + b)), so the result is the cumulative average over the data, not an exponential
    one. `torch.optim.swa_utils.update_bn` averages per batch (a short last batch counts as much as
    a full one) and calls `model(x)` only; this takes the images a caller prepared (no augmentation)
    for a network already at its t. Momenta and the training flag are restored; returns the
    number of images seen.

    In a process group each process passes its own share of the batches and the averages are
    combined weighted by images seen: the average a single process computes over all the batches.
    """
    layers = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = {layer: layer.momentum for layer in layers}
    was_training = network.training
    # Only batch norm in training mode: dropout and stochastic depth stay off, as in evaluation.
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.train()
    seen = 0
    try:
        for images in batches:
            size = int(images.shape[0])
            for layer in layers:
                layer.momentum = size / (seen + size)
            network(images)
            seen += size
    finally:
        for layer in layers:
            layer.momentum = momenta[layer]
        network.train(was_training)
    return distributed.combine_batch_norm(network, seen)
