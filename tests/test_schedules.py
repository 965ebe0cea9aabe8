from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from training.schedules import BaseSchedule, CosineRestarts, FGECycle


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize("budget", [10, 40, 200])
def test_base_schedule_shape(budget: int) -> None:
    schedule = BaseSchedule(iterations_per_epoch=5, lr0=0.1, budget_epochs=budget)
    lrs = [schedule.lr(epoch, 0) for epoch in range(budget)]
    assert all(lr == pytest.approx(0.1) for lr, e in zip(lrs, range(budget), strict=True) if e / budget <= 0.5)
    assert all(lr == pytest.approx(0.001) for lr, e in zip(lrs, range(budget), strict=True) if e / budget >= 0.9)
    assert all(later <= earlier + 1e-12 for earlier, later in pairwise(lrs))
    # Linear in between: the middle of the decay (70% of the budget) is halfway from 1 to 0.01.
    assert schedule.factor(round(0.7 * budget)) == pytest.approx(1 - (round(0.7 * budget) / budget - 0.5) / 0.4 * 0.99)
    assert schedule.lr(3, 0) == schedule.lr(3, 4), "the base schedule changes once per epoch"


@given(st.integers(1, 6), st.integers(1, 50), st.floats(0.01, 0.1), st.floats(0.0001, 0.009))
def test_fge_cycle_properties(cycle: int, iterations: int, lr1: float, lr2: float) -> None:
    schedule = FGECycle(iterations_per_epoch=iterations, lr1=lr1, lr2=lr2, cycle_epochs=cycle)
    steps = [(e, i) for e in range(3 * cycle) for i in range(iterations)]
    lrs = [schedule.lr(e, i) for e, i in steps]
    assert lrs[0] == pytest.approx(lr1), "a cycle starts at lr1"
    assert all(lr2 - 1e-12 <= lr <= lr1 + 1e-12 for lr in lrs)
    per_cycle = cycle * iterations
    assert lrs[:per_cycle] == pytest.approx(lrs[per_cycle : 2 * per_cycle]), "cycles repeat"
    # Exactly one snapshot per cycle, after the step taken at the cycle's lowest learning rate.
    due = [index for index, (e, i) in enumerate(steps) if schedule.snapshot_due(e, i)]
    assert [d % per_cycle for d in due] == [per_cycle // 2] * 3
    first = lrs[:per_cycle]
    assert first[due[0]] == pytest.approx(min(first))
    if per_cycle % 2 == 0:
        assert first[due[0]] == pytest.approx(lr2)


@pytest.mark.parametrize("cycle", [2, 4])
def test_fge_even_cycle_reaches_lr2_at_the_middle_epoch(cycle: int) -> None:
    schedule = FGECycle(iterations_per_epoch=10, lr1=0.05, lr2=0.0005, cycle_epochs=cycle)
    assert schedule.lr(cycle // 2, 0) == pytest.approx(0.0005)
    assert schedule.lr(cycle // 4 if cycle >= 4 else 0, 5 if cycle == 2 else 0) == pytest.approx(
        (0.05 + 0.0005) / 2)
    # The snapshot follows the first step of epoch c/2 of each cycle, the one taken at lr2.
    assert schedule.snapshot_due(cycle // 2, 0)
    assert schedule.snapshot_due(cycle + cycle // 2, 0)
    assert not schedule.snapshot_due(cycle // 2 - 1, 9)


def test_one_epoch_cycle_snapshots_mid_epoch() -> None:
    schedule = FGECycle(iterations_per_epoch=10, lr1=0.05, lr2=0.001, cycle_epochs=1)
    assert [i for i in range(10) if schedule.snapshot_due(0, i)] == [5]
    assert schedule.lr(0, 5) == pytest.approx(0.001)


@pytest.mark.parametrize("cycle", [1, 3])
def test_cosine_restarts(cycle: int) -> None:
    schedule = CosineRestarts(iterations_per_epoch=4, lr0=0.2, cycle_epochs=cycle)
    lrs = [schedule.lr(e, i) for e in range(2 * cycle) for i in range(4)]
    per_cycle = 4 * cycle
    assert lrs[0] == pytest.approx(0.2) and lrs[per_cycle] == pytest.approx(0.2), "restarts at lr0"
    assert all(b < a for a, b in pairwise(lrs[:per_cycle])), "anneals"
    due = [(e, i) for e in range(2 * cycle) for i in range(4) if schedule.snapshot_due(e, i)]
    assert due == [(cycle - 1, 3), (2 * cycle - 1, 3)]


def test_step_sets_every_group_and_state_round_trips() -> None:
    optimizer = _optimizer()
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 5.0})
    schedule = FGECycle(iterations_per_epoch=4, lr1=0.05, lr2=0.01, cycle_epochs=2)
    value = schedule.step(optimizer, 1, 0)
    assert [group["lr"] for group in optimizer.param_groups] == [value, value]
    restored = FGECycle(iterations_per_epoch=4, lr1=0.05, lr2=0.01, cycle_epochs=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.last_lr == value
    other = FGECycle(iterations_per_epoch=4, lr1=0.05, lr2=0.01, cycle_epochs=4)
    with pytest.raises(ValueError, match="cycle_epochs"):
        other.load_state_dict(schedule.state_dict())
