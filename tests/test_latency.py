"""Latency figures people can trust (issue 18, Trust): interleaved rounds, ratios with a
spread, the machine state beside them, and "unreliable" when the machine was busy.

The pair measured is two deterministic numpy sorts of different sizes (single-threaded,
a few hundred microseconds to a millisecond): cheap, and on a shared 2-core box a
slowdown hits both sides of each round's ratio alike. The stated spread: two
measurements of the same pair give median ratios within a factor RATIO_AGREEMENT of each
other, and each median lies inside the other's interquartile range widened by the same
factor.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from vlm_export.report.markdown import parity_rows
from vlm_export.report.tables import bench_tables, latency_table, speedup_text
from vlm_export.runtime.cpu import cpu_info
from vlm_export.verify.latency import (
    LatencyResult, busy_reason, interleaved, machine_state, measure, ratio_stats, split_runs,
)

RATIO_AGREEMENT = 1.25  # the stated spread: two measurements' median ratios agree within ×/÷ 1.25


def _pair() -> dict[str, object]:
    rng = np.random.default_rng(0)
    small, large = rng.standard_normal(20_000), rng.standard_normal(100_000)
    return {"small": lambda: np.sort(small), "large": lambda: np.sort(large)}


def test_interleaved_structure_and_absolute_figures() -> None:
    result = interleaved(_pair(), rounds=6, runs_per_round=3, warmup=1)
    assert result.rounds == 6 and result.runs_per_round == 3 and list(result.stats) == ["small", "large"]
    for name, stats in result.stats.items():
        assert stats["runs"] == 18 and stats["rounds"] == 6 and len(result.round_p50[name]) == 6
        assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    ratio = result.ratio("large", "small")
    assert ratio["rounds"] == 6 and ratio["q1"] <= ratio["median"] <= ratio["q3"] and ratio["iqr"] == pytest.approx(ratio["q3"] - ratio["q1"])
    # Five times the elements: sorting is clearly slower, never faster, whatever the load.
    assert ratio["median"] > 1.5
    record = result.conditions_json()
    assert set(record) >= {"before", "after", "method", "busy"}
    assert record["method"] == {"rounds": 6, "runs_per_round": 3, "warmup": 1, "order": ["small", "large"]}
    json.dumps(record)  # goes into parity.json / bench.json as is


def test_two_measurements_of_the_same_pair_agree_within_the_stated_spread() -> None:
    pair = _pair()
    first, second = (interleaved(pair, rounds=15, runs_per_round=3, warmup=2).ratio("large", "small") for _ in range(2))
    assert abs(math.log(first["median"] / second["median"])) <= math.log(RATIO_AGREEMENT), (first, second)
    for a, b in ((first, second), (second, first)):
        assert a["q1"] / RATIO_AGREEMENT <= b["median"] <= a["q3"] * RATIO_AGREEMENT, (first, second)


def test_ratio_is_taken_per_round_so_a_slow_round_cancels() -> None:
    # Round 2 ran while something else took the CPU: both sides doubled. Sequential
    # measurement would mix slow and fast minutes; the per-round ratio does not.
    base, cand = [10.0, 20.0, 10.0, 10.0], [5.0, 10.0, 5.0, 5.0]
    assert ratio_stats(base, cand) == {"median": 2.0, "q1": 2.0, "q3": 2.0, "iqr": 0.0, "rounds": 4}


def test_split_runs_and_measure_kept() -> None:
    assert split_runs(20) == (5, 4) and split_runs(3) == (3, 1) and split_runs(1) == (1, 1) and split_runs(50) == (10, 5)
    stats = measure(lambda: None, warmup=1, runs=3)
    assert stats["runs"] == 3 and set(stats) >= {"p50_ms", "p90_ms", "p99_ms", "mean_ms"}


def test_machine_state_records_cpu_threads_versions_and_load() -> None:
    state = machine_state(ort_threads=2, torch_threads=1)
    info = cpu_info()
    assert state["cpu"] == {k: info[k] for k in ("model", "arch", "cores", "isa")}
    assert state["threads"] == {"onnxruntime_intra_op": 2, "torch": 1}
    assert state["onnxruntime"] and state["torch"]  # both installed in the test environment
    assert state["loadavg"] is None or len(state["loadavg"]) == 3


def _state(load: float, cores: int = 2, ort: int | None = None, torch: int | None = 2) -> dict:
    return {"cpu": {"model": "Test CPU", "arch": "x86_64", "cores": cores, "isa": ["avx2"]},
            "threads": {"onnxruntime_intra_op": ort, "torch": torch}, "onnxruntime": "1.32.0", "torch": "2.13.0",
            "loadavg": [load, load, load]}


def test_busy_means_load_above_the_cores_the_run_used() -> None:
    assert busy_reason({"before": _state(3.2), "after": _state(2.0)}) == "load 3.2 > 2 cores"
    assert busy_reason({"before": _state(0.3), "after": _state(2.1)}) is None  # our own 2 threads, quiet otherwise
    assert busy_reason({"before": _state(1.8, cores=8, ort=1, torch=1), "after": _state(0.2)}) == "load 1.8 > 1 core"
    assert busy_reason({"before": _state(2.0, cores=8, ort=None, torch=1), "after": _state(2.0)}) is None  # ORT default: every core
    assert busy_reason(None) is None and busy_reason({"before": {**_state(9.0), "loadavg": None}}) is None


def _parity(load: float) -> dict:
    stats = {"p50_ms": 10.0, "p90_ms": 12.0, "p99_ms": 13.0, "mean_ms": 10.5, "runs": 20, "rounds": 5}
    rec = {"component": "vision", "variant": "int8-cpu", "precision": "int8", "passed": True, "failures": [],
           "metrics": {"cosine_min": 0.995, "cosine_mean": 0.998, "max_abs": 0.1},
           "latency": {"cpu": {**stats, "vs_pytorch": {"median": 1.71, "q1": 1.65, "q3": 1.76, "iqr": 0.11, "rounds": 5}},
                       "pytorch-eager-cpu": {**stats, "p50_ms": 17.1}}}
    conditions = LatencyResult({}, {}, 5, 4, 3, {"before": _state(load), "after": _state(load)}).conditions_json()
    return {"samples": ["a.jpg"], "records": [rec], "latency_conditions": {"vision": conditions}}


def test_report_prints_ratio_with_spread_on_a_quiet_machine() -> None:
    parity = _parity(0.4)
    table = latency_table(parity)
    row = next(r for r in table.rows if r[1].text == "int8-cpu")
    assert row[-1].text == "1.71× (1.65–1.76)"
    assert "interleaved rounds" in table.note and "Test CPU" in table.note and "load average 0.40 before" in table.note
    assert "unreliable" not in table.note


def test_busy_machine_makes_the_report_say_unreliable() -> None:
    parity = _parity(3.2)
    table = latency_table(parity)
    row = next(r for r in table.rows if r[1].text == "int8-cpu")
    assert row[-1].text == "unreliable (load 3.2 > 2 cores)"
    assert "×" not in row[-1].text and "unreliable" in table.note
    assert speedup_text(parity["records"][0], busy="load 3.2 > 2 cores") == "unreliable (load 3.2 > 2 cores)"
    manifest = {"format_version": 1, "family": "vit", "source": {"path": "/m", "config_sha256": "0" * 64, "model_type": "vit"},
                "components": {"vision": {"inputs": [], "outputs": [], "variants": {"int8-cpu": {"precision": "int8", "onnx": "vision/v.onnx", "sha256": "0" * 64, "bytes": 1000}}}},
                "preprocess": {}, "parity": {"passed": True, "failed": []}}
    rows = parity_rows(manifest, parity)  # what `build` prints and report.md's first table shows
    assert rows[0][8] == "unreliable (load 3.2 > 2 cores)"


def test_older_records_without_rounds_keep_the_plain_ratio() -> None:
    parity = _parity(0.4)
    old = copy.deepcopy(parity)
    del old["latency_conditions"]
    del old["records"][0]["latency"]["cpu"]["vs_pytorch"]
    row = next(r for r in latency_table(old).rows if r[1].text == "int8-cpu")
    assert row[-1].text == "1.71×"


def test_bench_table_shows_the_ratio_or_unreliable() -> None:
    rows = [{"component": "vision", "variant": v, "batch": 1, "p50_ms": p, "p90_ms": p, "p99_ms": p, "throughput_per_s": 1e3 / p,
             "vs": {"baseline": "fp32", "median": 10.0 / p, "q1": 10.0 / p, "q3": 10.0 / p}} for v, p in (("fp32", 10.0), ("int8-cpu", 5.0))]
    for load, expected in ((0.3, "2.00× (2.00–2.00) vs fp32"), (3.2, "unreliable (load 3.2 > 2 cores)")):
        conditions = {"before": _state(load), "after": _state(load)}
        table = bench_tables({"providers": {"cpu": {"conditions": conditions, "results": rows}}})[0]
        assert table.rows[1][-1].text == expected


def test_build_records_interleaved_latency_and_its_conditions(vit_bundle: Path) -> None:
    """parity.json: PyTorch and every variant of a component measured in the same rounds,
    the ratio per record with its quartiles, and the machine state beside them."""
    parity = json.loads((vit_bundle / "parity.json").read_text())
    conditions = parity["latency_conditions"]["vision"]
    method = conditions["method"]
    assert method["order"][0] == "pytorch-eager-cpu" and set(method["order"][1:]) == {r["variant"] for r in parity["records"]}
    for state in (conditions["before"], conditions["after"]):
        assert state["cpu"]["model"] == cpu_info()["model"] and state["cpu"]["isa"] == cpu_info()["isa"]
        assert state["threads"]["torch"] >= 1 and state["onnxruntime"] and state["torch"]
    assert conditions["busy"] == busy_reason(conditions)
    for rec in parity["records"]:
        cpu, torch_lat = rec["latency"]["cpu"], rec["latency"]["pytorch-eager-cpu"]
        assert cpu["runs"] == torch_lat["runs"] == method["rounds"] * method["runs_per_round"]
        ratio = cpu["vs_pytorch"]
        assert ratio["rounds"] == method["rounds"] and 0 < ratio["q1"] <= ratio["median"] <= ratio["q3"]
