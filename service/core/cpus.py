"""How many CPUs this process may really use: its affinity, capped by a container's CPU quota.

In a container `os.cpu_count()` and even the affinity mask report the host's cores; the limit
Kubernetes sets (`resources.limits.cpu`) is a CFS quota, read from cgroup v2's `cpu.max` or
cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`. Sizing onnxruntime's thread pools by the
host would start dozens of threads that the quota then throttles. And the compute threads' CPU
priority, below the event loop's.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
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


COMPUTE_NICENESS = 10
"""How much lower than the event loop's the compute threads' CPU priority is (Linux nice steps)."""


def threads_per_instance(session_threads: int, instances: int) -> int:
    """`session_threads`, or (0) the cores this process may use shared among `instances`."""
    return session_threads or max(1, usable_cpus() // instances)


def lower_thread_priority(step: int = COMPUTE_NICENESS) -> None:
    """Lower the CPU priority of the calling thread (and of the threads it starts later) by `step` nice steps.

    Compute threads run at a lower priority than the event loop: when model runs saturate the cores, the loop
    still refuses what it cannot take within milliseconds and answers health checks, instead of queueing behind
    the compute it is protecting. Only raising niceness is done, which needs no privilege; where threads have no
    priority of their own (not Linux), nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + step))
