"""The CPU an INT8 variant is measured on and the one that serves it: its model and the instruction-set features
that decide how 8-bit products are added up.

onnxruntime's CPU kernels multiply uint8 activations by int8 weights with the best instructions the CPU has. VNNI
(AVX-512 VNNI or AVX-VNNI) and AMX add each product into 32 bits, exactly. AVX2, and AVX-512 without VNNI, use
VPMADDUBSW, which first adds pairs of products into 16 bits and saturates there: two products near 255 x 127
overflow, and the graph computes something else than on a VNNI machine. So the same INT8 graph can answer
differently on two CPUs, and a variant records the CPU it was validated on (`Manifest.variants[].validated_on`);
a server names both CPUs when a variant does not reproduce its samples. Features come from Linux's
/proc/cpuinfo; elsewhere the list is empty and only the machine type is known.
"""

from __future__ import annotations

import platform
from pathlib import Path

from artefact.manifest import ValidatedOn

# The flags that decide which 8-bit kernels run (x86: /proc/cpuinfo's names; Arm: asimddp is the dot product,
# i8mm the 8-bit matrix multiply).
INT8_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
_EXACT_X86 = ("amx_int8", "avx512_vnni", "avx_vnni")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."), or the machine type where the system does not say."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """The INT8-relevant features this CPU reports, in `INT8_FEATURES` order."""
    flags: set[str] = set()
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return [feature for feature in INT8_FEATURES if feature in flags]


def int8_arithmetic(features: list[str]) -> str:
    """How u8 x s8 products are added on a CPU with these features, in words."""
    exact = [feature for feature in _EXACT_X86 if feature in features]
    if exact:
        return f"{exact[0]}: products added in 32 bits"
    if "avx512bw" in features or "avx2" in features:
        return "no VNNI: pairs of products added in 16 bits, saturating"
    if "asimd" in features:
        return "Arm SIMD: products widened before they are added"
    return "features unknown"


def describe(machine: ValidatedOn) -> str:
    """'Intel(R) Xeon(R) ... (avx2 avx512f avx512_vnni; avx512_vnni: products added in 32 bits), onnxruntime 1.31.1'."""
    listed = " ".join(machine.cpu_features) or "no features listed"
    return f"{machine.cpu} ({listed}; {int8_arithmetic(machine.cpu_features)}), onnxruntime {machine.onnxruntime}"


def this_machine(onnxruntime_version: str) -> ValidatedOn:
    """This machine as a variant records it: CPU model, INT8-relevant features, machine type, onnxruntime."""
    return ValidatedOn(cpu=cpu_model(), cpu_features=cpu_features(), machine=platform.machine(),
                       onnxruntime=onnxruntime_version)


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
