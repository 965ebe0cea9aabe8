"""The drift score rises with corruption severity on real images.

A real ensemble (two FGE snapshots of the small CNN, trained in process for a few epochs on 3000
Fashion-MNIST images) is exported as the fused graph the server runs, and answers windows of
corrupted test images; each window is scored against the baseline fitted on the validation
answers by the function export uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from artefact.drift import Baseline, drift_score
from artefact.manifest import OUTPUTS
from training.calibrate import fit_temperature
from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from training.data import DataSplits, ImageTensors, load_splits, make_batches
from training.engine import build_model, epoch_seed, make_optimizer, predict_logits, train_epoch
from training.export.fits import fit_drift_baseline
from training.export.graphs import INPUT_NAME, FusedEnsemble, export_graph
from training.schedules import BaseSchedule, FGECycle

IMAGES = 3000
"""Of each split: the test split gives three disjoint windows of 1000 answers per corruption and severity."""
ALERT_MULTIPLE = 2.0
"""The alert level, in clean levels: clean test windows of the exported 8-member Fashion-MNIST ensemble reach 1.4x the
clean level at most (benchmarks/drift_corruption.py), and severity 2 of every corruption there averages above 2x."""
BATCH = 128
BASE_EPOCHS = 3
SNAPSHOTS = 2
CPU = torch.device("cpu")
SIGNALS = ["confidence", "entropy", "mutual_information", "predicted_class"]


@dataclass(frozen=True)
class TrainedEnsemble:
    fused: onnxruntime.InferenceSession
    baseline: Baseline
    test_images: np.ndarray
    test_labels: np.ndarray

    def answers(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The fused graph's label-free answers for uint8 images [N, 1, 28, 28]."""
        return dict(zip(SIGNALS, self.fused.run(SIGNALS, {INPUT_NAME: images}), strict=True))


def _fge_members(splits: DataSplits) -> list[nn.Module]:
    """Base training, then one snapshot per 1-epoch FGE cycle, taken at the cycle's lowest learning rate."""
    torch.manual_seed(0)
    model = build_model("cnn", splits.info, CPU)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4)
    steps = len(make_batches(splits.train, splits.info, BATCH, train=True))
    base = BaseSchedule(iterations_per_epoch=steps, lr0=0.05, budget_epochs=BASE_EPOCHS)
    for epoch in range(BASE_EPOCHS):
        train_epoch(model, splits, optimizer, base, epoch, epoch_seed(0, epoch), BATCH, CPU)
    cycle = FGECycle(iterations_per_epoch=steps, lr1=0.05, lr2=0.005, cycle_epochs=1)
    members: list[nn.Module] = []

    def snapshot(epoch: int, iteration: int) -> None:
        if cycle.snapshot_due(epoch, iteration):
            members.append(copy.deepcopy(model).eval())

    for epoch in range(SNAPSHOTS):
        train_epoch(model, splits, optimizer, cycle, epoch, epoch_seed(0, BASE_EPOCHS + epoch), BATCH, CPU,
                    on_step=snapshot)
    assert len(members) == SNAPSHOTS
    return members


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> TrainedEnsemble:
    """The trained members as one fused graph, and the drift baseline of their validation answers."""
    splits = load_splits("fashion-mnist", subset=IMAGES)
    threads = torch.get_num_threads()
    # One thread: when other processes hold the cores, a second one makes every layer wait at its barrier for a
    # descheduled thread, and an epoch of this small CNN takes ten times as long instead of half.
    torch.set_num_threads(1)
    try:
        members = _fge_members(splits)
        val_logits, val_labels = zip(*(predict_logits(m, splits.val, splits, CPU) for m in members), strict=True)
    finally:
        torch.set_num_threads(threads)
    member_val = np.stack(val_logits, axis=1)
    temperature = fit_temperature(member_val, val_labels[0])
    drift = fit_drift_baseline(member_val, val_labels[0], temperature)
    baseline = Baseline.of(drift, splits.info.num_classes)
    test = splits.test
    assert isinstance(test, ImageTensors)
    graph = tmp_path_factory.mktemp("drift-shift") / "ensemble.onnx"
    export_graph(FusedEnsemble(members, temperature), test.images[:2], graph, list(OUTPUTS))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # as for training: robust to a busy machine, and fast enough on a 3000-image set
    fused = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return TrainedEnsemble(fused, baseline, test.images.numpy(), test.labels.numpy())


def _window_scores(ensemble: TrainedEnsemble, images: np.ndarray) -> np.ndarray:
    """The drift score of each disjoint window of `baseline.window` consecutive images."""
    answers = ensemble.answers(images)
    window = ensemble.baseline.window
    return np.array([drift_score(ensemble.baseline, {name: value[start : start + window]
                                                     for name, value in answers.items()})
                     for start in range(0, len(images) - window + 1, window)])


def test_the_ensemble_is_trained_and_clean_test_windows_stay_under_the_alert_level(ensemble: TrainedEnsemble
                                                                                   ) -> None:
    baseline = ensemble.baseline
    assert baseline.window == 1000 and 0 < baseline.clean_level < 0.05
    answers = ensemble.answers(ensemble.test_images)
    accuracy = float(np.mean(answers["predicted_class"] == ensemble.test_labels))
    assert accuracy > 0.75, "a real model, not chance"
    clean = _window_scores(ensemble, ensemble.test_images)
    assert len(clean) == 3
    assert np.all(clean < ALERT_MULTIPLE * baseline.clean_level), (clean, baseline.clean_level)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_the_drift_score_rises_with_corruption_severity(name: str, ensemble: TrainedEnsemble) -> None:
    """The mean over three windows rises strictly from each severity to the next (no tolerance: the measured steps
    are several times the spread between windows), and severity 5 is far above clean."""
    # One seed for every severity: the same noise draws and rotation directions, scaled, so levels differ by
    # their parameter alone.
    scores = [_window_scores(ensemble, corrupt(ensemble.test_images, name, severity, seed=0))
              for severity in SEVERITIES]
    means = [float(np.mean(windows)) for windows in scores]
    clean_level = ensemble.baseline.clean_level
    assert all(later > earlier for earlier, later in pairwise(means)), (name, means)
    assert np.all(scores[-1] > ALERT_MULTIPLE * clean_level), (name, scores[-1])
    assert means[-1] > 4 * clean_level, (name, means, clean_level)
