"""The cascade's front network at export: one SWA or distilled network put before the members.

`valley-train export --front RUN_DIR` reads the run's one network, checks that it was trained on
the members' data with their architecture, fits its own temperature on the validation split and
measures it there and on the test split. The cascade fit (`artefact.cascade.fit_cascade`) then
decides on the validation split alone whether images it is confident about may leave with its
answer; the export writes its graph (`front.onnx`, and at every precision exported) and records
it in the manifest's `front` either way, so a request can ask for it alone (`members: front`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from artefact.manifest import Metrics
from artefact.metrics import classification_metrics
from artefact.uncertainty import softmax
from training.calibrate import fit_temperature
from training.config import TrainConfig
from training.data import DataSplits
from training.engine import predict_logits
from training.errors import UsageError
from training.runs import RunDir

FRONT_FILE = "front.onnx"


@dataclass(frozen=True)
class FrontNetwork:
    """The front network, its temperature (fitted on validation) and its tempered probabilities [N, C] and metrics
    on both splits."""

    method: Literal["swa", "distilled"]
    provenance: dict[str, Any]
    network: nn.Module
    temperature: float
    val: np.ndarray
    test: np.ndarray
    validation: Metrics
    test_metrics: Metrics



def tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """One network's logits [N, C] as its probabilities at `temperature` (float64)."""
    result: np.ndarray = softmax(logits.astype(np.float64) / temperature)
    return result


def load_front(path: Path, members: TrainConfig, splits: DataSplits) -> FrontNetwork:
    """The network of the SWA or distilled run at `path`, checked against the members' configuration, measured."""
    from training.export.sources import one_network  # the exporter's reader of one-network runs

    run = RunDir(path)
    run.require_run()
    if not (run.is_swa or run.is_distilled):
        raise UsageError(f"--front takes an SWA or distilled run (valley-train swa or distill --out); {path} is "
                         "neither")
    sources = one_network(run)
    if sources.config.model != members.model:
        raise UsageError(f"the front network {path} is {sources.config.model!r} and the members are "
                         f"{members.model!r}: a front shares the members' architecture")
    if sources.config.data != members.data:
        raise UsageError(f"the front network {path} was trained on other data than the members ({sources.config.data}"
                         f" against {members.data}): its validation and test figures would not compare")
    source = sources.members[0]
    network = source.build(splits)
    device = torch.device("cpu")
    val_logits, val_labels = predict_logits(network, splits.val, splits, device)
    test_logits, test_labels = predict_logits(network, splits.test, splits, device)
    temperature = fit_temperature(val_logits[:, None], val_labels)
    val, test = tempered(val_logits, temperature), tempered(test_logits, temperature)
    method: Literal["swa", "distilled"] = "swa" if sources.method == "swa" else "distilled"
    return FrontNetwork(method, source.provenance, network, temperature, val, test,
                        classification_metrics(val, val_labels), classification_metrics(test, test_labels))
