"""The training loop shared by base runs, FGE and curves: epochs, checkpoints, resume, evaluation.

Base training and FGE differ only in their schedule (and FGE's snapshots), curves in their model
(a `training.curves.Curve`) and a weight-decay penalty, so all run the same `Trainer.fit`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from artefact.manifest import Metrics
from artefact.metrics import classification_metrics
from artefact.uncertainty import softmax
from training import checkpoint, distributed
from training.data import DatasetInfo, DataSplits, Shard, SizedDataset, make_batches, subset
from training.errors import UsageError
from training.models import Classifier, create_model
from training.runs import RunDir
from training.schedules import Schedule

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when a GPU is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from error
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but no CUDA GPU is usable here: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s): "
                         "use cuda:0 .. cuda:N-1")
    return device


def build_model(name: str, info: DatasetInfo, device: torch.device) -> Classifier:
    """A fresh registered model for `info`'s images, on `device`, in the memory format training uses."""
    model = create_model(name, info.num_classes, info.in_channels, info.image_size, info.mean, info.std)
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum and weight decay, the paper's optimizer for base runs and FGE alike."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # channels_last makes oneDNN's (and cuDNN's) convolutions markedly faster for small CNNs.
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling and augmentation seed of one epoch: a resumed run replays the same batches."""
    return seed * 1_000_003 + epoch


@dataclass
class EpochResult:
    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float


def train_epoch(
    model: nn.Module,
    splits: DataSplits,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    epoch: int,
    batch_seed: int,
    batch_size: int,
    device: torch.device,
    on_step: Callable[[int, int], None] | None = None,
    workers: int = 0,
    penalty: Callable[[], torch.Tensor] | None = None,
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EpochResult:
    """One pass over the training split; `schedule` sets the lr before every step of `epoch`.

    `penalty`, called after each forward pass, is added to that step's loss (curves put their weight
    decay there); `objective(logits, images, labels)`, when given, is minimised instead of the
    cross-entropy (distillation's soft targets); the logged loss is the cross-entropy alone,
    comparable across run kinds.

    In a process group `model` is the DistributedDataParallel wrapper and each process trains on its
    slice of every batch; the loss and accuracy returned are over all processes' images.
    """
    model.train()
    batches = make_batches(splits.train, splits.info, batch_size, train=True, seed=batch_seed,
                           workers=workers, shard=distributed.shard())
    # Sums stay on the device so a GPU step never waits for the host.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    started = time.perf_counter()
    for iteration, (images, labels) in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}", leave=False,
                                                      disable=_progress_disabled(), unit="batch")):
        schedule.step(optimizer, epoch, iteration)
        images, labels = _to_device(images, labels, device)
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        minimised = loss if objective is None else objective(logits, images, labels)
        if penalty is not None:
            minimised = minimised + penalty()
        optimizer.zero_grad(set_to_none=True)
        minimised.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += int(labels.shape[0])
        if on_step is not None:
            on_step(epoch, iteration)
    loss_sum, correct = distributed.sum_over_processes(loss_sum), distributed.sum_over_processes(correct)
    if distributed.active():
        seen = int(distributed.sum_over_processes(torch.tensor(seen, device=device)))
    return EpochResult(epoch=epoch + 1, loss=float(loss_sum) / seen, accuracy=float(correct) / seen,
                       lr=float(schedule.last_lr or 0.0), seconds=time.perf_counter() - started)


def _progress_disabled() -> bool | None:
    # tqdm's None: a bar where stderr is a terminal. Only rank 0 draws one.
    return None if distributed.is_main() else True


@torch.no_grad()
def _predict(model: nn.Module, data: SizedDataset, info: DatasetInfo, device: torch.device,
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits = [torch.empty(0, info.num_classes, dtype=torch.float64)]
    labels = [torch.empty(0, dtype=torch.int64)]
    for images, targets in make_batches(data, info, batch_size, train=False):
        images, _ = _to_device(images, targets, device)
        logits.append(model(images).double().cpu())
        labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def predict_logits(
    model: nn.Module, data: SizedDataset, splits: DataSplits, device: torch.device, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, C] (float64) and labels [N] of `model` in eval mode over `data`, in order.

    In a process group each process predicts a contiguous run of whole batches (the batches a single
    process forms) and every process gets all the rows back: the same arrays, up to float error.
    """
    if not distributed.active():
        logits, labels = _predict(model, data, splits.info, device, batch_size)
        return logits.numpy(), labels.numpy()
    processes = distributed.world_size()
    shares = [Shard(rank, processes).whole_batches(len(data), batch_size) for rank in range(processes)]
    logits, labels = _predict(model, subset(data, shares[distributed.rank()]), splits.info, device, batch_size)
    counts = [len(share) for share in shares]
    return distributed.gather_rows(logits, counts).numpy(), distributed.gather_rows(labels, counts).numpy()


@dataclass
class Evaluation:
    metrics: Metrics
    probabilities: np.ndarray
    labels: np.ndarray


def evaluate(model: nn.Module, data: SizedDataset, splits: DataSplits, device: torch.device) -> Evaluation:
    """Metrics, probabilities [N, C] and labels [N] of `model` on `data`."""
    logits, labels = predict_logits(model, data, splits, device)
    probabilities = softmax(logits)
    return Evaluation(classification_metrics(probabilities, labels), probabilities, labels)


@dataclass
class Trainer:
    """Runs epochs with checkpoints after each, and resumes from the last one.

    After every epoch it appends to the run's log and rewrites its last checkpoint; it keeps the
    checkpoint of every epoch in `keep_epochs` and of the last one. In a process group
    (`training.distributed`) every process trains and only rank 0 writes.
    """

    run: RunDir
    model: nn.Module
    model_name: str
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    splits: DataSplits
    batch_size: int
    seed: int
    device: torch.device
    config: dict[str, Any]
    keep_epochs: set[int] = field(default_factory=set)
    # Epochs already run before this trainer's schedule started (FGE starts at the base run's E).
    epoch_offset: int = 0
    workers: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    on_snapshot: Callable[[Trainer, int, int], dict[str, Any]] | None = None
    penalty: Callable[[], torch.Tensor] | None = None
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # DistributedDataParallel must search each step's graph for parameters it left out (a curve's bends with a
    # zero coefficient at that step's t), or it waits for their gradients forever.
    find_unused_parameters: bool = False

    def state(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "epoch_offset": self.epoch_offset,
            "rng": torch.get_rng_state(),
            # Dropout on a GPU draws from the CUDA generators: a resumed run needs them too.
            "cuda_rng": self._cuda_rng_state(),
            "config": self.config,
            "history": self.history,
            "snapshots": self.snapshots,
        }

    def _cuda_rng_state(self) -> list[torch.Tensor] | None:
        if self.device.type != "cuda":
            return None
        if distributed.active():
            # Its own GPU's generator only: asking for every GPU's would open a context on each from every process.
            return [torch.cuda.get_rng_state(self.device)]
        return torch.cuda.get_rng_state_all()

    def resume(self) -> bool:
        """Restore the last checkpoint of this run directory; False when there is none."""
        if distributed.is_main():
            self.run.remove_temporaries()
        path = self.run.last_checkpoint
        if not path.is_file():
            return False
        state = checkpoint.load(path)
        checkpoint.load_model_weights(self.model, state, self.model_name, path)
        self.optimizer.load_state_dict(state["optimizer"])
        try:
            self.schedule.load_state_dict(state["schedule"])
        except ValueError as error:
            message = f"cannot resume {self.run.path}: {error}; use the original options or a new --out"
            raise UsageError(message) from error
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            if distributed.active():
                torch.cuda.set_rng_state(state["cuda_rng"][0], self.device)
            else:
                torch.cuda.set_rng_state_all(state["cuda_rng"][:torch.cuda.device_count()])
        self.epoch, self.history, self.snapshots = state["epoch"], state["history"], state["snapshots"]
        # The log may hold lines of an epoch whose checkpoint never landed: rewrite it from the checkpoint.
        if distributed.is_main():
            self._write_log()
        log.info("resumed %s after epoch %d", self.run.path, self.epoch_offset + self.epoch)
        return True

    def _write_log(self) -> None:
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        self.run.log_file.write_text(lines)

    def _step_hook(self, epoch: int, iteration: int) -> None:
        if self.on_snapshot is not None and self.schedule.snapshot_due(epoch, iteration):
            distributed.average_batch_norm(self.model)
            self.snapshots.append(self.on_snapshot(self, epoch, iteration))

    def fit(self, epochs: int, validate: bool = True) -> None:
        """Train until `epochs` epochs of this schedule are done, checkpointing after each."""
        main = distributed.is_main()
        if main:
            self.run.path.mkdir(parents=True, exist_ok=True)
        network = distributed.wrap(self.model, self.device, self.find_unused_parameters)
        for epoch in tqdm(range(self.epoch, epochs), desc="training", unit="epoch", disable=_progress_disabled(),
                          initial=self.epoch, total=epochs):
            # Batches depend on the absolute epoch: FGE from epoch E sees what the base run saw after E.
            batch_seed = epoch_seed(self.seed, self.epoch_offset + epoch)
            result = train_epoch(network, self.splits, self.optimizer, self.schedule, epoch, batch_seed,
                                 self.batch_size, self.device, on_step=self._step_hook, workers=self.workers,
                                 penalty=self.penalty, objective=self.objective)
            # What is evaluated and saved is the processes' average statistic (identical weights everywhere).
            distributed.average_batch_norm(self.model)
            record: dict[str, Any] = {"epoch": self.epoch_offset + result.epoch, "lr": result.lr,
                                      "train_loss": result.loss, "train_accuracy": result.accuracy,
                                      "seconds": round(result.seconds, 3)}
            if validate and len(self.splits.val) > 0:
                metrics = evaluate(self.model, self.splits.val, self.splits, self.device).metrics
                record.update(val_accuracy=metrics.accuracy, val_nll=metrics.nll)
            self.epoch = epoch + 1
            self.history.append(record)
            absolute = self.epoch_offset + self.epoch
            if main:
                self._save(self.state(), absolute, keep=absolute in self.keep_epochs or self.epoch == epochs)
                with open(self.run.log_file, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", absolute, record)
        # Every process may now read what rank 0 wrote (checkpoints, snapshots).
        distributed.barrier()

    def _save(self, state: dict[str, Any], absolute: int, keep: bool) -> None:
        # The kept checkpoint first: a process killed between the two resumes from the previous epoch and
        # writes this one again, so a kept epoch is never skipped.
        if keep:
            checkpoint.save_atomic(state, self.run.epoch_checkpoint(absolute))
        checkpoint.save_atomic(state, self.run.last_checkpoint)

