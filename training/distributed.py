"""Data-parallel training under `torchrun`: the process group, this process's place in it, and the collectives.

`torchrun --nproc_per_node=N -m training.cli ...` starts N copies of the command with WORLD_SIZE,
RANK and LOCAL_RANK in their environment; `setup` joins them into one process group (gloo on
the CPU, NCCL on GPUs, one GPU per process). Outside torchrun nothing here does anything: every
helper returns its input untouched, so a single process computes exactly what it always did.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.data import Shard
from training.errors import UsageError


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process belongs to a process group (collectives run)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the run: the group's size, torchrun's WORLD_SIZE before `setup`, else 1."""
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in the run (0 alone outside torchrun)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def shard() -> Shard:
    """This process's share of every training batch."""
    return Shard(rank(), world_size())


def setup(device: torch.device, global_batch: int) -> torch.device:
    """Join torchrun's process group (no-op outside torchrun); returns the device this process trains on.

    The global batch is split evenly over the processes, so it must be a multiple of their number;
    that is checked before joining, so every process stops with the same one-line error.
    """
    if not launched():
        return device
    processes = world_size()
    if global_batch % processes != 0:
        raise UsageError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                         f"{processes} processes torchrun started: use a multiple of {processes}")
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"under torchrun every process takes the GPU of its LOCAL_RANK: pass --device cuda "
                             f"(or auto), not {device}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}, "
                             "so start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


# How long a leaving process hands gloo's worker threads the GIL (`teardown`).
_GLOO_SETTLE_SECONDS = 0.2


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if not active():
        return
    gloo = dist.get_backend() == "gloo"
    dist.destroy_process_group()
    if gloo:
        # A gloo worker thread frees the tensors of the collective it just finished after the caller has its
        # result, and needs the GIL for that: still waiting for it when the interpreter finalises, it aborts
        # the process (SIGABRT). Sleeping hands it the GIL before this process exits.
        time.sleep(_GLOO_SETTLE_SECONDS)


def barrier() -> None:
    """Wait until every process gets here: what rank 0 wrote before it is on disk for all."""
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel when in a process group (gradients averaged), else `model` itself.

    Buffers are not broadcast from rank 0 at every forward pass: each process keeps batch-norm
    running statistics of its own shard, and `average_batch_norm` combines them before they are
    used or saved.
    """
    if not active():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # torch renamed the option (2.14 warns on the old name); both leave buffers alone in the forward pass.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync: dict[str, Any] = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **no_buffer_sync)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over the processes (in place), or `tensor` itself outside a group."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def _batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None]


def _running_statistics(model: nn.Module) -> list[torch.Tensor]:
    statistics: list[torch.Tensor] = []
    for layer in _batch_norm_layers(model):
        assert layer.running_mean is not None and layer.running_var is not None
        statistics += [layer.running_mean, layer.running_var]
    return statistics


def _weighted_mean_in_place(statistics: list[torch.Tensor], weight: float, total: float) -> None:
    """Replace each tensor by sum_r weight_r * tensor_r / total over the processes, in one all-reduce."""
    if not statistics:
        return
    flat = torch.cat([statistic.reshape(-1) for statistic in statistics]).mul_(weight)
    dist.all_reduce(flat)
    flat.div_(total)
    offset = 0
    for statistic in statistics:
        statistic.copy_(flat[offset : offset + statistic.numel()].view_as(statistic))
        offset += statistic.numel()


@torch.no_grad()
def average_batch_norm(model: nn.Module) -> None:
    """Make every process's batch-norm running mean and variance their mean over the processes.

    Each process updates them from its own slice of every batch; the average is what evaluation
    uses and checkpoints keep. `num_batches_tracked` is the same everywhere and stays.
    """
    if active():
        _weighted_mean_in_place(_running_statistics(model), 1.0, float(world_size()))


@torch.no_grad()
def combine_batch_norm(model: nn.Module, seen: int) -> int:
    """Combine exact batch-norm averages each process computed over `seen` images of its own into the
    average over all of them (weighted by counts); returns the images seen by all processes together."""
    if not active():
        return seen
    count = torch.tensor(float(seen), dtype=torch.float64, device=_communication_device())
    total = float(sum_over_processes(count))
    if total == 0:
        return 0
    _weighted_mean_in_place(_running_statistics(model), float(seen), total)
    # Every batch of the pass was run by exactly one process: the count is the single process's.
    for layer in _batch_norm_layers(model):
        if layer.num_batches_tracked is not None:
            sum_over_processes(layer.num_batches_tracked)
    return int(total)


def _communication_device() -> torch.device:
    # NCCL moves only GPU tensors; gloo moves CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every process's rows concatenated in rank order (process r holds `counts[r]`), on the CPU, in every process."""
    if not active() or max(counts) == 0:
        return local
    device = _communication_device()
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).cpu()
