"""How many CPUs this process may really use: its affinity, capped by a container's CPU quota.

In a container `os.cpu_count()` and even the affinity mask report the host's cores; the limit
Kubernetes sets (`resources.limits.cpu`) is a CFS quota, read from cgroup v2's `cpu.max` or
cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`. Sizing onnxruntime's thread pools by the
host would start dozens of threads that the quota then throttles.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (e.g. 1.5), or None where no quota applies or none can be read."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) >= 1 and fields[0] != "max":
            period = int(fields[1]) if len(fields) > 1 else 100_000
            return int(fields[0]) / period if period > 0 else None
        if fields:
            return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: the affinity mask, capped by the quota rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)
