"""Ranges for the numeric `build` flags, checked before anything is loaded.

Why: `--calibration-size 1000000000` ran out of memory after minutes of loading,
`--latency-runs 0` or `-5` crashed with an IndexError in the percentile code. A value
out of range is bad input: one line naming the flag and the range.
"""

from __future__ import annotations

from vlm_export.errors import InputError

CALIBRATION_SIZE = (1, 100_000)
LATENCY_RUNS = (1, 100_000)


def check_range(flag: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InputError(f"{flag} must be between {low} and {high} (got {value})")


def check_build_ranges(calibration_size: int, latency_runs: int) -> None:
    check_range("--calibration-size", calibration_size, CALIBRATION_SIZE)
    check_range("--latency-runs", latency_runs, LATENCY_RUNS)
