"""The export's graphs: the networks as uint8-in ONNX graphs, the fused ensemble graph, and their parity with
PyTorch (every graph matches within `PARITY_TOLERANCE` on real validation images, or nothing is written)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from artefact.manifest import (
    OUTPUTS,
    TensorSpec,
)
from artefact.uncertainty import LOG_FLOOR, softmax

log = logging.getLogger(__name__)


PARITY_TOLERANCE = 1e-4

PARITY_IMAGES = 256

INPUT_NAME = "pixels"


class PixelClassifier(nn.Module):
    """uint8 pixels [B, C, H, W] in 0..255 -> logits; the scaling to [0, 1] is part of the graph."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels.float() / 255.0)  # type: ignore[no-any-return]


class FusedEnsemble(nn.Module):
    """All members in one graph: tempered softmax per member, their mean, and uncertainty.

    Outputs, in `artefact.manifest.OUTPUTS` order: probabilities [B, C], predicted_class [B]
    (int64), confidence [B], entropy [B] (nats), mutual_information [B] (entropy of the mean
    minus mean member entropy), member_disagreement [B] (fraction of members whose own top
    class differs from the ensemble's), member_probabilities [B, K, C].
    """

    temperature: torch.Tensor

    def __init__(self, members: Sequence[nn.Module], temperature: float) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = pixels.float() / 255.0
        return ensemble_outputs_of(torch.stack([member(images) for member in self.members], dim=1), self.temperature)


def ensemble_outputs_of(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every ensemble output, in `OUTPUTS` order, from the members' logits [B, K, C]: what a fused graph computes
    after its members, whichever way they were run."""
    member_probabilities = torch.softmax(logits / temperature, dim=-1)
    probabilities = member_probabilities.mean(dim=1)
    confidence, predicted = probabilities.max(dim=-1)
    entropy = -(probabilities * probabilities.clamp_min(LOG_FLOOR).log()).sum(dim=-1)
    member_entropy = -(member_probabilities * member_probabilities.clamp_min(LOG_FLOOR).log()).sum(dim=-1)
    mutual_information = (entropy - member_entropy.mean(dim=1)).clamp_min(0.0)
    disagreement = (member_probabilities.argmax(dim=-1) != predicted.unsqueeze(1)).float().mean(dim=1)
    return (probabilities, predicted, confidence, entropy, mutual_information, disagreement, member_probabilities)


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str]) -> None:
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        # The exporter reports its own progress and optimisation notes as warnings.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=output_names,
                          dynamo=True, dynamic_shapes={"pixels": {0: batch}}, external_data=False, verbose=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def open_session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_parity(name: str, expected: np.ndarray, actual: np.ndarray) -> float:
    difference = float(np.max(np.abs(expected - actual)))
    if not difference <= PARITY_TOLERANCE:
        raise RuntimeError(f"{name}: onnxruntime and PyTorch probabilities differ by {difference:.3g} "
                           f"(> {PARITY_TOLERANCE}); the export is wrong, nothing was written")
    log.info("%s: max |onnxruntime - PyTorch| probability difference %.2e on %d images", name, difference,
             len(expected))
    return difference


def network_graph(network: nn.Module, example: torch.Tensor, parity_pixels: np.ndarray, path: Path) -> None:
    """One network's graph (pixels in, logits out), its probabilities checked against PyTorch's."""
    wrapped = PixelClassifier(network)
    export_graph(wrapped, example, path, ["logits"])
    with torch.no_grad():
        expected = softmax(wrapped(torch.from_numpy(parity_pixels)).double().numpy())
    actual = softmax(open_session(path).run(None, {INPUT_NAME: parity_pixels})[0].astype(np.float64))
    check_parity(path.name, expected, actual)


def output_specs(members: int, classes: int) -> list[TensorSpec]:
    """The fused graph's outputs: per-image scalars unless named here."""
    specs = {name: TensorSpec(name=name, datatype="FP32", shape=[-1]) for name in OUTPUTS}
    specs["probabilities"] = TensorSpec(name="probabilities", datatype="FP32", shape=[-1, classes])
    specs["predicted_class"] = TensorSpec(name="predicted_class", datatype="INT64", shape=[-1])
    specs["member_probabilities"] = TensorSpec(name="member_probabilities", datatype="FP32",
                                               shape=[-1, members, classes])
    return [specs[name] for name in OUTPUTS]
