"""The CPUs a server may use: affinity capped by the container's quota (cgroup v2 and v1 files)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from service.core.cpus import cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("content", "quota"), [("150000 100000\n", 1.5), ("50000 100000", 0.5),
                                                 ("max 100000\n", None), ("200000 50000", 4.0)])
def test_cgroup_v2_cpu_max(tmp_path: Path, content: str, quota: float | None) -> None:
    (tmp_path / "cpu.max").write_text(content)
    assert cpu_quota(tmp_path) == quota
    expected = AFFINITY if quota is None else min(AFFINITY, max(1, math.ceil(quota)))
    assert usable_cpus(tmp_path) == expected


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 1.0 and usable_cpus(tmp_path) == 1


def test_no_cgroup_files_means_the_affinity(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == AFFINITY
    (tmp_path / "cpu.max").write_text("garbage")
    assert cpu_quota(tmp_path) is None
