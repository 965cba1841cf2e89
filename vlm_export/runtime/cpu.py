"""What CPU this is: model name and the ISA features that change integer kernels.

Why: onnxruntime picks its INT8 kernels by CPU features (x86 U8S8 without VNNI
saturates int16 pair sums; VNNI, AMX and ARM's dot products do not). A verdict records
the CPU it was measured on, and the runtime warns when it runs an INT8 CPU variant on a
CPU whose kernels the verdict does not cover. Reads /proc/cpuinfo (Linux, incl. Jetson);
elsewhere it reports the platform only. Standard library only.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

# The flags that matter for INT8 kernels, x86 and ARM (names as /proc/cpuinfo spells them).
# Latency figures record them too (issue 18): AMX tiles/bf16 and 32-bit ARM's NEON join them.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile",
              "neon", "asimd", "asimddp", "i8mm", "sve")


@functools.lru_cache(maxsize=1)
def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """{"model", "arch", "cores", "isa": [flags among INT8_FLAGS]}."""
    import os

    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return {"model": model, "arch": platform.machine(), "cores": os.cpu_count() or 1,
            "isa": [f for f in INT8_FLAGS if f in flags]}


def has_int8_dot_product(isa: list[str], arch: str) -> bool:
    """True where u8·s8 products accumulate without int16 saturation (VNNI, AMX, ARM)."""
    if arch.lower() in ("aarch64", "arm64"):
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(isa))


def int8_cpu_warning(recipe: str, verdict_cpu: dict[str, Any] | None, here: dict[str, Any]) -> str | None:
    """Why an INT8 variant run on this CPU's onnxruntime kernels may not match its verdict.

    None when the verdict covers this CPU: the reduce-range CPU recipe is exact on every
    CPU; the older full-range recipe is covered only where the CPU has an int8 dot product
    (or the verdict CPU lacked one too); the QDQ graph was judged with Q/DQ in float, which
    integer kernels reproduce only where they do not saturate.
    """
    from vlm_export.recipes import PORTABLE_CPU_RECIPES

    if recipe in PORTABLE_CPU_RECIPES or has_int8_dot_product(here["isa"], here["arch"]):
        return None
    where = f"{here['model']} has no VNNI/AMX, so onnxruntime's u8·s8 kernels can saturate"
    if recipe == "qdq-static":
        return f"this INT8 variant is the TensorRT QDQ graph, judged with Q/DQ in float; {where}: use the int8-cpu variant on a CPU"
    built = verdict_cpu or {}
    if built and not has_int8_dot_product(list(built.get("isa", [])), str(built.get("arch", ""))):
        return None
    return (f"this INT8 CPU variant ({recipe}) was verified on {built.get('model', 'another CPU')}; {where}: "
            "rebuild the bundle with this vlm-export (reduce-range weights) to get a verdict that holds here")


def physical_cores(cpuinfo_text: str, lscpu_text: str = "") -> int | None:
    """Physical cores: lscpu sockets × cores per socket, else distinct (physical id, core id)
    pairs of /proc/cpuinfo; None when neither says. Why: SMT siblings share a core's vector
    units, so a matrix-bound run gains nothing from a thread per sibling."""
    import re

    sockets = re.search(r"^Socket\(s\):\s*(\d+)", lscpu_text, re.MULTILINE)
    per_socket = re.search(r"^Core\(s\) per socket:\s*(\d+)", lscpu_text, re.MULTILINE)
    if sockets and per_socket:
        return int(sockets.group(1)) * int(per_socket.group(1))
    pairs, physical = set(), "0"
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            pairs.add((physical, value.strip()))
    return len(pairs) or None


@functools.lru_cache(maxsize=1)
def default_threads() -> int:
    """Intra-op threads for a CPU session: this machine's physical cores, at most the CPUs
    this process may run on (a container's or taskset's affinity), at least 1."""
    import os

    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(physical_cores(text) or allowed, allowed))
