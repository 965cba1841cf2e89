"""How far from the machine's limit a variant runs: achieved GMAC/s and the fraction of
the CPU's peak for the variant's precision (issue 18).

Why one module: `vlm-export bench` and `benchmarks/bench_cpu.py` print the same columns
from the same MAC count (verify.macs, from the variant's own ONNX shapes) and the same
peak (verify.cpu_peak), so their figures agree. The MAC count needs `onnx`; on a
runtime-only install without it, `variant_macs` returns None and the columns say "n/a".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from vlm_export.verify.cpu_peak import CpuPeak, machine_peaks

# Which peak a variant's kernels run against on the CPU: QDQ and dynamic INT8 graphs run
# onnxruntime's integer kernels; FP16 graphs run FP32 kernels unless the CPU has FP16 SIMD.
PEAK_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}


def variant_macs(onnx_path: Path, sizes: Optional[Mapping[str, int]] = None) -> Optional[dict[str, Any]]:
    """The MAC count per image of one variant (MacCount.to_json()), or None when `onnx` is
    not installed or the graph's shapes cannot be inferred."""
    try:
        from vlm_export.verify.macs import count_macs
    except ImportError:  # runtime-only install: no onnx
        return None
    try:
        return count_macs(onnx_path, batch=1, sizes=sizes).to_json()
    except (ValueError, OSError) as exc:
        return {"per_image": None, "error": str(exc)}


def achieved(macs_per_image: Optional[float], batch: int, p50_ms: float, peak: Optional[CpuPeak]) -> dict[str, Optional[float]]:
    """{"gmacs": achieved GMAC/s at the p50 latency, "peak_fraction": gmacs / peak}."""
    if not macs_per_image or p50_ms <= 0:
        return {"gmacs": None, "peak_fraction": None}
    gmacs = macs_per_image * batch / (p50_ms * 1e-3) / 1e9
    return {"gmacs": gmacs, "peak_fraction": gmacs / peak.gmacs if peak else None}


def peaks_for(threads: Optional[int]) -> dict[str, CpuPeak]:
    """This machine's peaks for a run with `threads` intra-op threads (None: every physical core)."""
    return machine_peaks(threads)


def format_efficiency(values: Mapping[str, Any]) -> str:
    """"41.2 GMAC/s, 25% of peak" (or "n/a" parts).

    Above 100 % the peak is wrong, not the run: the clock was assumed (a VM reports no max
    frequency) and the core boosts past it; say so rather than print an impossible figure.
    """
    gmacs, fraction = values.get("gmacs"), values.get("peak_fraction")
    left = f"{gmacs:.1f} GMAC/s" if gmacs else "n/a"
    if not fraction:
        right = "peak n/a"
    elif fraction > 1.0:
        right = f"above the assumed peak ({fraction:.0%}): the clock runs faster than assumed"
    else:
        right = f"{fraction:.0%} of peak"
    return f"{left}, {right}"
