from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import create_model
from training.stacking import stack_members


def _random_cnn(seed: int, channels: int = 1, size: int = 28) -> nn.Module:
    """A cnn member with random weights and random batch-norm statistics, so that a wrong fold shows."""
    torch.manual_seed(seed)
    member = create_model("cnn", 10, channels, size, [0.3] * channels, [0.4] * channels)
    with torch.no_grad():
        for module in member.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
                module.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return member.eval()


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_stacked_network_computes_every_members_logits(count: int, channels: int, size: int) -> None:
    members = [_random_cnn(seed, channels, size) for seed in range(count)]
    images = torch.rand(5, channels, size, size)
    with torch.no_grad():
        expected = torch.stack([member(images) for member in members], dim=1)
        stacked = stack_members(members)(images)
    assert stacked.shape == (5, count, 10)
    assert torch.allclose(stacked, expected, atol=1e-5, rtol=0)


def test_members_must_share_one_architecture_and_be_in_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        stack_members([_random_cnn(0).train()])
    with pytest.raises(ValueError, match="linear layers to have one shape"):
        stack_members([_random_cnn(0), _random_cnn(1, size=32)])
    with pytest.raises(ValueError, match="normalise their input differently"):
        stack_members([_random_cnn(0), create_model("cnn", 10, 1, 28, [0.5], [0.5]).eval()])
    with pytest.raises(ValueError, match="Classifier"):
        stack_members([nn.Linear(4, 2).eval()])
