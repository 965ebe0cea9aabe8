"""Learning-rate schedules: the paper's base schedule, the FGE cycle and cosine restarts (SSE).

A schedule is a pure function of (epoch, iteration), so resuming needs nothing but its
hyperparameters; `state_dict` records them so a resumed run can refuse a different schedule.
`step` is called before every optimizer step with the epoch (counted from the schedule's
own start) and the iteration within it.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any

from torch.optim import Optimizer


@dataclasses.dataclass
class Schedule(ABC):
    iterations_per_epoch: int

    def __post_init__(self) -> None:
        if self.iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {self.iterations_per_epoch}")
        self.last_lr: float | None = None

    @abstractmethod
    def lr(self, epoch: int, iteration: int) -> float:
        """The learning rate for the step at `iteration` of `epoch`."""

    def snapshot_due(self, epoch: int, iteration: int) -> bool:
        """Whether the weights after the step at (epoch, iteration) are an ensemble member."""
        return False

    def step(self, optimizer: Optimizer, epoch: int, iteration: int) -> float:
        """Set the learning rate of every parameter group for the coming step; returns it."""
        value = self.lr(epoch, iteration)
        for group in optimizer.param_groups:
            group["lr"] = value
        self.last_lr = value
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **dataclasses.asdict(self), "last_lr": self.last_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.state_dict()
        mismatched = [key for key in expected if key != "last_lr" and state.get(key) != expected[key]]
        if mismatched:
            details = ", ".join(f"{key}: checkpoint {state.get(key)!r} vs now {expected[key]!r}" for key in mismatched)
            raise ValueError(f"the checkpoint was written with another schedule ({details})")
        self.last_lr = state.get("last_lr")


@dataclasses.dataclass
class BaseSchedule(Schedule):
    """Garipov et al.'s base schedule: flat, linear decay from 50% to 90% of the budget to
    `final_factor`, then flat. Updated once per epoch, as in the reference code."""

    lr0: float = 0.05
    budget_epochs: int = 100
    final_factor: float = 0.01

    def factor(self, epoch: int) -> float:
        progress = epoch / self.budget_epochs
        if progress <= 0.5:
            return 1.0
        if progress <= 0.9:
            return 1.0 - (progress - 0.5) / 0.4 * (1.0 - self.final_factor)
        return self.final_factor

    def lr(self, epoch: int, iteration: int) -> float:
        return self.lr0 * self.factor(epoch)


@dataclasses.dataclass
class FGECycle(Schedule):
    """Piecewise-linear cycle lr1 -> lr2 -> lr1 over `cycle_epochs`, updated every iteration.

    lr1 is the high value at the cycle's ends and lr2 the low value in the middle, where the
    snapshot is taken (the reference README swaps the names "min" and "max": a trap).
    """

    lr1: float = 0.05
    lr2: float = 0.0005
    cycle_epochs: int = 2

    def position(self, epoch: int, iteration: int) -> float:
        """Where the step at (epoch, iteration) sits in its cycle, in [0, 1)."""
        return ((epoch % self.cycle_epochs) + iteration / self.iterations_per_epoch) / self.cycle_epochs

    def lr(self, epoch: int, iteration: int) -> float:
        s = self.position(epoch, iteration)
        if s < 0.5:
            return self.lr1 * (1.0 - 2.0 * s) + self.lr2 * 2.0 * s
        return self.lr1 * (2.0 * s - 1.0) + self.lr2 * (2.0 - 2.0 * s)

    def snapshot_due(self, epoch: int, iteration: int) -> bool:
        # After the step taken at the cycle's lowest lr (s = 0.5, lr = lr2 exactly). The reference
        # code snapshots one step earlier, at the end of epoch c/2 - 1, where lr is a hair above lr2.
        step_in_cycle = (epoch % self.cycle_epochs) * self.iterations_per_epoch + iteration
        return step_in_cycle == self.cycle_epochs * self.iterations_per_epoch // 2


@dataclasses.dataclass
class CosineRestarts(Schedule):
    """Snapshot ensembles (Huang et al. 2017): cosine annealing from lr0 to 0, restarted every
    `cycle_epochs`; a snapshot at the end of each cycle."""

    lr0: float = 0.1
    cycle_epochs: int = 10

    def lr(self, epoch: int, iteration: int) -> float:
        steps = self.cycle_epochs * self.iterations_per_epoch
        step = (epoch % self.cycle_epochs) * self.iterations_per_epoch + iteration
        return self.lr0 / 2.0 * (math.cos(math.pi * step / steps) + 1.0)

    def snapshot_due(self, epoch: int, iteration: int) -> bool:
        return epoch % self.cycle_epochs == self.cycle_epochs - 1 and iteration == self.iterations_per_epoch - 1
