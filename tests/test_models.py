from __future__ import annotations

import pytest
import torch

from training.errors import UsageError
from training.models import create_model, model_names


@pytest.mark.parametrize("name", ["cnn", "preresnet20", "preresnet56", "preresnet110", "preresnet164",
                                  "vgg16bn", "wrn28x10", "torchvision:resnet18", "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_models_classify_small_images(name: str, channels: int, size: int) -> None:
    model = create_model(name, 7, channels, size, [0.5] * channels, [0.25] * channels).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_registry_names_and_parameters() -> None:
    assert {"cnn", "preresnet20", "preresnet164", "vgg16bn", "wrn28x10"} <= set(model_names())
    cnn = create_model("cnn", 10, 1, 28, [0.5], [0.25])
    assert sum(p.numel() for p in cnn.parameters()) == 241_898
    preresnet164 = create_model("preresnet164", 100, 3, 32, [0.5] * 3, [0.25] * 3)
    assert 1.6e6 < sum(p.numel() for p in preresnet164.parameters()) < 1.8e6


def test_normalisation_lives_inside_the_model() -> None:
    model = create_model("cnn", 10, 1, 28, [0.3], [0.2])
    assert model.mean.flatten().tolist() == pytest.approx([0.3])
    assert "mean" in model.state_dict()


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(UsageError, match=r"unknown model 'resnet9'.*cnn.*torchvision:<name>"):
        create_model("resnet9", 10, 1, 28, [0.5], [0.5])
    with pytest.raises(UsageError, match=r"unknown torchvision classifier 'nope'.*resnet18"):
        create_model("torchvision:nope", 10, 1, 28, [0.5], [0.5])
