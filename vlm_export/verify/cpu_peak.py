"""The CPU's peak multiply-accumulate rate per precision, from its ISA, cores and clock.

Why: achieved GMAC/s (verify.macs ÷ latency) means little without the machine's limit
beside it (issue 18). The peak here is the textbook one: what the vector units could
retire if every cycle of every core issued multiply-accumulates,

    peak MAC/s = MACs per instruction × instructions per cycle × cores × clock,

with, per core and cycle (x86):

- FP32: FMA lanes × FMA units. Lanes are the datapath width / 32: 16 with AVX-512
  (8 on AMD Zen 4, family 0x19, which runs 512-bit ops on 256-bit halves), 8 with AVX2,
  4 with SSE; units default to 2 (two FMA pipes: Intel Skylake-SP and later server parts,
  AMD Zen 2-5). Without FMA, a multiply and an add each take a pipe: 1 MAC per lane.
- INT8 with VNNI (AVX-512 VNNI or AVX-VNNI): `vpdpbusd` does 4 u8×s8 MACs per 32-bit lane,
  so 4× the FP32 rate at the same width.
- INT8 with AVX2 / AVX-512BW only: `vpmaddubsw` (u8×s8 pairs to s16) then `vpmaddwd`
  (pairs to s32) on the same pipes: 2 multiply instructions per 4 MACs per 32-bit lane,
  so 2× the FP32 rate.
- INT8 with AMX: 1024 MACs per cycle per core (one TMUL tile product per 16 cycles of
  16×64×… ; Intel's figure), on top of which nothing above matters.
- FP16: the FP32 rate (onnxruntime's CPU kernels convert to FP32) unless the CPU has
  AVX-512 FP16 or ARM's half-precision SIMD (asimdhp), then 2×.

ARM: NEON is 128-bit: FP32 4 lanes × 2 pipes by default (Cortex-A78/X1 class); `sdot`
(asimddp) 4× and `smmla` (i8mm) 8× that for INT8. SVE is taken at 128 bits.

The clock: `lscpu`'s "CPU max MHz" or cpufreq's cpuinfo_max_freq (the boost ceiling); in
a VM both are often absent, and /proc/cpuinfo's "cpu MHz" is the nominal (TSC) clock:
then the figure is marked `assumed` and says so, since boost would raise the real peak
(and sustained all-core AVX-512 clocks may lower it). Cores: physical cores (threads that
share a core share its vector units), at most the threads a run used.

Standard library only: the runtime-only install runs `bench`.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vlm_export.runtime.cpu import physical_cores

DEFAULT_FMA_UNITS = 2
_ARM = ("aarch64", "arm64")


@dataclass(frozen=True)
class CpuPeak:
    """Peak MACs per second of `cores` cores at `clock_ghz`, and how it was derived."""

    precision: str
    macs_per_cycle: float  # per core
    cores: int
    clock_ghz: float
    how: str  # the ISA path, e.g. "AVX-512 VNNI vpdpbusd: 16 lanes × 4 MACs × 2 units"
    clock_source: str
    assumed: bool  # the clock is a guess (no max frequency reported)

    @property
    def gmacs(self) -> float:
        """Peak in GMAC/s."""
        return self.macs_per_cycle * self.cores * self.clock_ghz

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "gmacs": self.gmacs, "macs_per_cycle_per_core": self.macs_per_cycle,
                "cores": self.cores, "clock_ghz": self.clock_ghz, "how": self.how, "clock_source": self.clock_source,
                "assumed": self.assumed}

    def describe(self) -> str:
        """One line for a report: the figure and how it was reached."""
        mark = " (clock assumed)" if self.assumed else ""
        return (f"{self.precision} peak {self.gmacs:.0f} GMAC/s{mark} = {self.macs_per_cycle:g} MAC/cycle/core "
                f"[{self.how}] × {self.cores} core(s) × {self.clock_ghz:.2f} GHz [{self.clock_source}]")


def vector_bits(flags: set[str], vendor: str = "", family: Optional[int] = None) -> int:
    """Datapath width the FMA pipes execute per cycle: AVX-512 counts as 256 on AMD Zen 4."""
    if "avx512f" in flags:
        return 256 if vendor == "AuthenticAMD" and family == 0x19 else 512
    if "avx2" in flags or "avx" in flags:
        return 256
    return 128


def macs_per_cycle(precision: str, flags: set[str], arch: str = "x86_64", vendor: str = "", family: Optional[int] = None,
                   fma_units: int = DEFAULT_FMA_UNITS) -> tuple[float, str]:
    """(MACs per cycle per core, how) for `precision` (fp32, fp16, int8) on a CPU with `flags`
    (/proc/cpuinfo names). `fma_units` defaults to 2; raises ValueError on another precision."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision '{precision}'; known: fp32, fp16, int8")
    if arch.lower() in _ARM:
        return _arm_rate(precision, flags, fma_units)
    bits = vector_bits(flags, vendor, family)
    lanes = bits // 32
    width = {512: "AVX-512", 256: "AVX2" if "avx512f" not in flags else "AVX-512 on 256-bit pipes", 128: "SSE"}[bits]
    has_fma = "fma" in flags or "avx512f" in flags
    fp32 = lanes * fma_units if has_fma else lanes
    fp32_how = f"{width} FMA: {lanes} lanes × {fma_units} units" if has_fma else f"{width} mul+add: {lanes} lanes"
    if precision == "fp32":
        return float(fp32), fp32_how
    if precision == "fp16":
        if "avx512_fp16" in flags:
            return float(2 * fp32), f"AVX-512 FP16: 2 × ({fp32_how})"
        return float(fp32), f"FP32 kernels ({fp32_how})"
    if "amx_int8" in flags:
        return 1024.0, "AMX-INT8 TMUL: 1024 MACs"
    if "avx512_vnni" in flags and "avx512f" in flags:
        return float(4 * fp32), f"AVX-512 VNNI vpdpbusd: {lanes} lanes × 4 MACs × {fma_units} units"
    if "avx_vnni" in flags:
        return float(4 * 8 * fma_units), f"AVX-VNNI vpdpbusd: 8 lanes × 4 MACs × {fma_units} units"
    if "avx2" in flags or "avx512bw" in flags:
        return float(2 * fp32), f"{width} vpmaddubsw+vpmaddwd: {lanes} lanes × 4 MACs / 2 instructions × {fma_units} units"
    return float(fp32), f"no int8 dot product: FP32 rate ({fp32_how})"


def _arm_rate(precision: str, flags: set[str], units: int) -> tuple[float, str]:
    fp32 = 4 * units
    if precision == "fp32":
        return float(fp32), f"NEON FMA: 4 lanes × {units} units"
    if precision == "fp16":
        return (float(2 * fp32), f"NEON FP16 FMA: 8 lanes × {units} units") if "asimdhp" in flags else \
            (float(fp32), f"FP32 kernels (NEON FMA: 4 lanes × {units} units)")
    if "i8mm" in flags:
        return float(8 * fp32), f"NEON i8mm smmla: 32 MACs × {units} units"
    if "asimddp" in flags:
        return float(4 * fp32), f"NEON sdot: 4 lanes × 4 MACs × {units} units"
    return float(2 * fp32), f"NEON smull/sadalp: 2 × FP32 rate ({units} units)"


def parse_clock(lscpu_text: str = "", max_khz: Optional[int] = None, cpuinfo_text: str = "") -> tuple[float, str, bool]:
    """(GHz, source, assumed): lscpu "CPU max MHz", else cpufreq's cpuinfo_max_freq, else
    /proc/cpuinfo "cpu MHz" (assumed: nominal), else BogoMIPS / 2 (assumed: x86 TSC)."""
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", lscpu_text, re.MULTILINE)
    if match and float(match.group(1)) > 0:
        return float(match.group(1)) / 1e3, "lscpu CPU max MHz", False
    if max_khz:
        return max_khz / 1e6, "cpufreq cpuinfo_max_freq", False
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo_text, re.MULTILINE)
    if match and float(match.group(1)) > 0:
        return (float(match.group(1)) / 1e3, "/proc/cpuinfo cpu MHz: nominal clock, no max reported (VM?); boost unknown", True)
    match = re.search(r"^bogomips\s*:\s*([\d.]+)", cpuinfo_text, re.MULTILINE | re.IGNORECASE)
    if match:
        return float(match.group(1)) / 2e3, "BogoMIPS / 2 (x86 TSC clock), no frequency reported", True
    return 1.0, "no clock reported anywhere: 1 GHz placeholder", True


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _field(text: str, name: str) -> str:
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def machine_peaks(threads: Optional[int] = None, fma_units: int = DEFAULT_FMA_UNITS) -> dict[str, CpuPeak]:
    """Peaks of this machine per precision (fp32, fp16, int8) for a run with `threads`
    intra-op threads (None: every physical core)."""
    cpuinfo, lscpu = _read("/proc/cpuinfo"), _lscpu()
    flags = set(_field(cpuinfo, "flags").split()) | set(_field(cpuinfo, "Features").split())
    family_text = _field(cpuinfo, "cpu family")
    family = int(family_text) if family_text.isdigit() else None
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    ghz, source, assumed = parse_clock(lscpu, int(khz) if khz.isdigit() else None, cpuinfo)
    cores = physical_cores(cpuinfo, lscpu) or os.cpu_count() or 1
    if threads:
        cores = max(1, min(cores, int(threads)))
    peaks = {}
    for precision in ("fp32", "fp16", "int8"):
        rate, how = macs_per_cycle(precision, flags, platform.machine(), _field(cpuinfo, "vendor_id"), family, fma_units)
        peaks[precision] = CpuPeak(precision, rate, cores, ghz, how, source, assumed)
    return peaks
