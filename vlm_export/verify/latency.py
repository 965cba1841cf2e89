"""Latency figures people can trust: interleaved rounds, ratios with a spread, and the
state of the machine they were measured on.

Why interleaved: a speed-up measured as "PyTorch for 20 runs, then each variant for 20
runs" compares different minutes of a machine that something else may be using; the
report then said INT8 was half as fast as PyTorch while the same bundle, run alone, was
1.7× faster (issue 18). Here every candidate runs a few calls in each round (round r:
baseline, v1, v2, …), and a ratio is the median over rounds of (baseline p50 in round r /
candidate p50 in round r): a slowdown that lasts longer than a round hits both sides of
each ratio. The spread of the per-round ratios (first and third quartile) is reported
beside it, and the absolute p50/p90/p99 per candidate over all its timed calls.

Why the machine state: a figure measured on a busy machine is not a fact about the
bundle. `machine_state()` records the CPU (model, ISA flags), the threads the run used,
onnxruntime/torch versions and the load average; `busy_reason()` says when the load
exceeded the cores the run used (the load average counts our own threads too, so on a
quiet machine it stays at or below them). Build (`_parity`), `vlm-export bench` and
`benchmarks/bench_cpu.py` all measure with `interleaved()`.

Standard library and numpy only (the runtime-only install runs `bench`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

DEFAULT_WARMUP = 3
DEFAULT_RUNS = 20
# Fewest rounds a time budget may leave (interleaved(budget_s=...)): five per-round ratios
# still give a median and quartiles.
MIN_ROUNDS = 5
# A quarter of a core of slack over the cores the run used: the 1-minute load average of a quiet
# machine wanders a little above the threads we ran (daemons, the interpreter itself).
LOAD_SLACK = 0.25


def measure(fn: Callable[[], object], warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS) -> dict[str, float]:
    """p50/p90/p99 and mean in milliseconds over `runs` calls after `warmup` calls
    (one candidate alone; use `interleaved` to compare candidates)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {**_stats(np.asarray(times)), "runs": runs}


def _stats(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def split_runs(total: int) -> tuple[int, int]:
    """`--latency-runs N` (timed calls per candidate) as (rounds, runs per round): at most
    5 calls per round so that there are several rounds; N < 5 means rounds of one call."""
    total = max(1, int(total))
    per_round = max(1, min(5, total // 5))
    return max(1, total // per_round), per_round


def ratio_stats(base_rounds: np.ndarray | list[float], cand_rounds: np.ndarray | list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios base p50 / candidate p50 (> 1: the
    candidate is faster than the base)."""
    ratios = np.asarray(base_rounds, dtype=float) / np.maximum(np.asarray(cand_rounds, dtype=float), 1e-12)
    q1, median, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "rounds": int(ratios.size)}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed (a runtime-only install has no torch)
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # not available on this platform
        return None


def machine_state(ort_threads: int | None = None, torch_threads: int | None = None) -> dict[str, Any]:
    """A snapshot of what the figures depend on: CPU model and ISA flags, cores, the
    threads the run used (onnxruntime intra-op: None or 0 = onnxruntime's default, one per
    core; torch: `torch.get_num_threads()` when torch is loaded), library versions, and
    the load average (1, 5, 15 min) now."""
    from vlm_export.runtime.cpu import cpu_info

    if torch_threads is None and "torch" in sys.modules:
        torch_threads = int(sys.modules["torch"].get_num_threads())
    info = cpu_info()
    return {
        "cpu": {k: info[k] for k in ("model", "arch", "cores", "isa")},
        "threads": {"onnxruntime_intra_op": ort_threads or None, "torch": torch_threads},
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
        "loadavg": _loadavg(),
    }


def cores_used(state: Mapping[str, Any]) -> int:
    """The cores a run could keep busy: the most threads any candidate used, at most the
    machine's cores (onnxruntime's default uses every core)."""
    cores = int(state.get("cpu", {}).get("cores") or os.cpu_count() or 1)
    threads = state.get("threads", {})
    ort = threads.get("onnxruntime_intra_op") or cores
    torch = threads.get("torch") or 1
    return max(1, min(cores, max(int(ort), int(torch))))


def busy_reason(conditions: Mapping[str, Any] | None) -> str | None:
    """"load 3.2 > 2 cores" when the 1-minute load average before or after the run was
    above the cores it used (plus LOAD_SLACK); None on a quiet machine or when unknown."""
    if not isinstance(conditions, Mapping):
        return None
    before, after = conditions.get("before") or {}, conditions.get("after") or {}
    loads = [s["loadavg"][0] for s in (before, after) if isinstance(s, Mapping) and s.get("loadavg")]
    if not loads or not before:
        return None
    used = cores_used(before)
    load = max(loads)
    return f"load {load:.1f} > {used} core{'s' if used != 1 else ''}" if load > used + LOAD_SLACK else None


@dataclass
class LatencyResult:
    """Per candidate: absolute p50/p90/p99 over every timed call, and each round's p50."""

    stats: dict[str, dict[str, float]]
    round_p50: dict[str, list[float]]
    rounds: int
    runs_per_round: int
    warmup: int
    conditions: dict[str, Any] = field(default_factory=dict)  # before/after machine_state, method

    def ratio(self, base: str, candidate: str) -> dict[str, float]:
        """Median (and quartiles) over rounds of base p50 / candidate p50."""
        return ratio_stats(self.round_p50[base], self.round_p50[candidate])

    @property
    def busy(self) -> str | None:
        return busy_reason(self.conditions)

    def conditions_json(self) -> dict[str, Any]:
        """What parity.json / bench.json record beside the figures."""
        return {**self.conditions, "method": {"rounds": self.rounds, "runs_per_round": self.runs_per_round, "warmup": self.warmup,
                                              "order": list(self.stats)},
                "busy": self.busy}


def _warm(fn: Callable[[], object], warmup: int, slow_s: float | None) -> float:
    """`warmup` untimed calls, fewer (at least 2) once a call takes longer than `slow_s`:
    the first call pays one-off costs, the second is warm. Returns the last call's seconds."""
    last = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        fn()
        last = time.perf_counter() - start
        if slow_s is not None and i >= 1 and last > slow_s:
            break
    return last


def budgeted(rounds: int, runs_per_round: int, round_s: float, budget_s: float, min_rounds: int = MIN_ROUNDS) -> tuple[int, int]:
    """(rounds, runs per round) that fit `budget_s` of timed calls when one call of every
    candidate takes `round_s` together: the plan unchanged when it fits, else rounds of one
    call each, as many as fit but never fewer than `min_rounds` (the quartiles need several)."""
    if rounds * runs_per_round * round_s <= budget_s:
        return rounds, runs_per_round
    fit = int(budget_s // max(round_s, 1e-9))
    return max(min(min_rounds, rounds * runs_per_round), min(fit, rounds * runs_per_round)), 1


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int,
    runs_per_round: int,
    warmup: int = DEFAULT_WARMUP,
    ort_threads: int | None = None,
    torch_threads: int | None = None,
    budget_s: float | None = None,
) -> LatencyResult:
    """Warm every candidate up, then `rounds` rounds in which each candidate (in the given
    order) runs `runs_per_round` timed calls. The machine state is taken before the warm-up
    and after the last round.

    `budget_s` bounds the timed calls' seconds (all candidates together) for large models:
    from the warm-up's last call per candidate, a plan that would not fit becomes rounds of
    one call (`budgeted`), at least MIN_ROUNDS of them; warm-up stops after 2 calls once a
    call takes more than a twentieth of the budget. The rounds actually run are in the result."""
    if not candidates:
        raise ValueError("interleaved() needs at least one candidate")
    rounds, runs_per_round = max(1, int(rounds)), max(1, int(runs_per_round))
    before, began = machine_state(ort_threads, torch_threads), time.perf_counter()
    slow_s = budget_s / 20 if budget_s else None
    round_s = sum(_warm(fn, warmup, slow_s) for fn in candidates.values())
    planned = (rounds, runs_per_round)
    if budget_s:
        rounds, runs_per_round = budgeted(rounds, runs_per_round, round_s, budget_s)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    round_p50: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            this_round = []
            for _ in range(runs_per_round):
                start = time.perf_counter()
                fn()
                this_round.append((time.perf_counter() - start) * 1e3)
            times[name] += this_round
            round_p50[name].append(float(np.median(this_round)))
    after = machine_state(ort_threads, torch_threads)
    stats = {name: {**_stats(np.asarray(t)), "runs": len(t), "rounds": rounds} for name, t in times.items()}
    conditions: dict[str, Any] = {"before": before, "after": after, "seconds": round(time.perf_counter() - began, 3)}
    if budget_s:
        conditions["budget"] = {"budget_s": budget_s, "planned_rounds": planned[0], "planned_runs_per_round": planned[1],
                                "applied": (rounds, runs_per_round) != planned}
    return LatencyResult(stats, round_p50, rounds, runs_per_round, warmup, conditions)
