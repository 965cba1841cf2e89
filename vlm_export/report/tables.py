"""The report's tables, defined once and rendered twice (report.md and report.html).

Why a tiny table model: the markdown and the HTML report must say the same thing; each
cell carries a status (pass/fail) so the HTML can highlight a miss against tolerance
while the markdown marks it in bold. Inputs are the plain dicts of manifest.json and
parity.json (optional sections read defensively: a bundle from an older build lacks them).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from vlm_export.bundle.schema import Manifest

DASH = "–"


class Status(enum.Enum):
    PLAIN = "plain"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class Cell:
    text: str
    status: Status = Status.PLAIN


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    note: str = ""
    items: tuple[str, ...] = field(default=())  # a list shown under the table (e.g. node names)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for people: `digits` significant digits; 6 or more means fixed decimals
    (cosines near 1, where 0.999999 and 1.000000 must stay distinguishable)."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if digits >= 6 and 1e-3 <= abs(value) < 1e3:
            return f"{value:.{digits}f}"
        text = f"{value:.{digits}g}"
        return f"{value:.0f}" if "e" in text and abs(value) >= 1 else text
    return str(value)


def _cells(*values: Any) -> tuple[Cell, ...]:
    return tuple(v if isinstance(v, Cell) else Cell(fmt(v)) for v in values)


def _against(value: float | None, bound: float | None, upper: bool, digits: int = 6) -> Cell:
    """A metric with its tolerance: `0.9857 (≥ 0.99)`, FAIL when outside the bound."""
    if value is None:
        return Cell(DASH)
    if bound is None:
        return Cell(fmt(value, digits))
    ok = value <= bound if upper else value >= bound
    sign = "≤" if upper else "≥"
    return Cell(f"{fmt(value, digits)} ({sign} {fmt(bound)})", Status.PASS if ok else Status.FAIL)


def verdict_cell(passed: bool | None) -> Cell:
    if passed is None:
        return Cell(DASH)
    return Cell("PASS", Status.PASS) if passed else Cell("FAIL", Status.FAIL)


def parity_table(parity: dict[str, Any]) -> Table:
    """Per component × variant: each parity metric against its tolerance."""
    rows = []
    for rec in parity.get("records", []):
        m, tol = rec.get("metrics", {}), rec.get("tolerance", {})
        rows.append(
            (Cell(rec["component"]), Cell(rec["variant"]), Cell(rec.get("precision", DASH)), verdict_cell(rec.get("passed")))
            + (
                _against(m.get("cosine_min"), tol.get("cosine_min"), upper=False),
                Cell(fmt(m.get("cosine_mean"), 6)),
                _against(m.get("max_abs"), tol.get("max_abs"), upper=True, digits=4),
                Cell(fmt(m.get("mean_abs"))),
                _against(m.get("top1_agreement"), tol.get("top1_agreement"), upper=False, digits=4),
                Cell(fmt(rec.get("samples"))),
                Cell(rec.get("evaluation", "ort-cpu")),
                Cell(fmt(rec.get("beside", {}).get("ort_cpu_kernels", {}).get("cosine_min"), 6)),
                Cell("; ".join(rec.get("failures", [])) or DASH, Status.FAIL if rec.get("failures") else Status.PLAIN),
            )
        )
    header = ("component", "variant", "precision", "verdict", "cos min (tol)", "cos mean", "max abs (tol)", "mean abs", "top-1 (tol)",
              "samples", "judged with", "cos min on ORT CPU int kernels (not judged)", "reasons")
    return Table("Parity against PyTorch FP32", header, tuple(rows), note=_verdict_note(parity.get("machine")))


def _verdict_note(machine: Any) -> str:
    """Which CPU the verdicts were computed on, and what "judged with" means."""
    where = ""
    if isinstance(machine, dict) and machine.get("model"):
        isa = ", ".join(str(f) for f in machine.get("isa", [])) or "no INT8 dot-product flags"
        where = f"Verdicts computed on {machine['model']} ({machine.get('arch', '?')}; {isa}; onnxruntime {machine.get('onnxruntime', '?')}). "
    return (where + "judged with: ort-cpu = onnxruntime's CPU kernels (the int8-cpu recipe's 7-bit weights make them exact on "
            "every CPU); float-qdq = Q/DQ evaluated in float, as TensorRT's explicit quantization computes, independent of this "
            "CPU. The last figure is the QDQ graph on this CPU's integer kernels, reported only.")


def latency_busy(parity: dict[str, Any], component: str) -> str | None:
    """"load 3.2 > 2 cores" when the component's latency was measured on a busy machine
    (parity.json "latency_conditions"); None when quiet or not recorded (older bundles)."""
    from vlm_export.verify.latency import busy_reason

    return busy_reason((parity.get("latency_conditions") or {}).get(component))


def speedup_text(rec: dict[str, Any], provider: str = "cpu", busy: str | None = None) -> str:
    """The "× PyTorch" figure of one record: the median of per-round ratios with its
    interquartile range ("1.71× (1.65–1.76)"), "unreliable (load 3.2 > 2 cores)" when the
    machine was busy, or the plain p50 ratio for records measured before interleaving."""
    latency = rec.get("latency", {})
    lat, torch_lat = latency.get(provider) or {}, latency.get("pytorch-eager-cpu") or {}
    if not lat.get("p50_ms") or not (torch_lat.get("p50_ms") or lat.get("vs_pytorch")):
        return DASH
    if busy:
        return f"unreliable ({busy})"
    ratio = lat.get("vs_pytorch")
    if isinstance(ratio, dict) and ratio.get("median"):
        return f"{ratio['median']:.2f}× ({ratio.get('q1', ratio['median']):.2f}–{ratio.get('q3', ratio['median']):.2f})"
    return f"{torch_lat['p50_ms'] / lat['p50_ms']:.2f}×"


def _latency_note(parity: dict[str, Any]) -> str:
    """How the figures were measured, on what, and whether to believe them."""
    conditions = parity.get("latency_conditions") or {}
    parts = ["× PyTorch = median over interleaved rounds of (PyTorch FP32 eager p50 / variant p50) in the same round, "
             "with the interquartile range of the per-round ratios in brackets." if conditions else
             "× PyTorch = PyTorch FP32 eager p50 / variant p50, same run."]
    for comp, c in conditions.items():
        if not isinstance(c, dict):
            continue
        before, after, method = c.get("before") or {}, c.get("after") or {}, c.get("method") or {}
        cpu, threads = before.get("cpu") or {}, before.get("threads") or {}
        isa = ", ".join(cpu.get("isa") or []) or "none of the tracked ISA flags"
        load = f"load average {_load(before)} before, {_load(after)} after"
        busy = latency_busy(parity, comp)
        parts.append(
            f"{comp}: {method.get('rounds', '?')} rounds × {method.get('runs_per_round', '?')} runs on {cpu.get('model', '?')} "
            f"({cpu.get('cores', '?')} cores; {isa}); threads: onnxruntime {threads.get('onnxruntime_intra_op') or 'default'}, "
            f"torch {threads.get('torch') or DASH}; onnxruntime {before.get('onnxruntime') or DASH}, torch {before.get('torch') or DASH}; "
            f"{load}." + (f" The machine was busy ({busy}): these latency figures are unreliable; "
                          "re-run `vlm-export bench` on a quiet machine." if busy else ""))
    return " ".join(parts)


def _load(state: dict[str, Any]) -> str:
    load = state.get("loadavg") if isinstance(state, dict) else None
    return f"{load[0]:.2f}" if load else "unknown"


def latency_table(parity: dict[str, Any]) -> Table:
    """Per variant and provider: batch-1 p50/p90/p99 and the speed-up over PyTorch eager
    (or why it is unreliable)."""
    rows = []
    for rec in parity.get("records", []):
        busy = latency_busy(parity, rec["component"])
        for provider, lat in rec.get("latency", {}).items():
            if provider.startswith("pytorch") or not isinstance(lat, dict):
                continue
            text = speedup_text(rec, provider, busy)
            speedup = Cell(text, Status.FAIL if busy and text != DASH else Status.PLAIN)
            rows.append(_cells(rec["component"], rec["variant"], provider, lat.get("p50_ms"), lat.get("p90_ms"), lat.get("p99_ms"), lat.get("runs"), speedup))
    seen: set[str] = set()
    for rec in parity.get("records", []):
        lat = rec.get("latency", {}).get("pytorch-eager-cpu")
        if lat and rec["component"] not in seen:
            seen.add(rec["component"])
            times = (lat.get("p50_ms"), lat.get("p90_ms"), lat.get("p99_ms"), lat.get("runs"))
            rows.append(_cells(rec["component"], "PyTorch FP32", "pytorch-eager-cpu", *times, "1.00×"))
    header = ("component", "variant", "provider", "p50 ms", "p90 ms", "p99 ms", "runs", "× PyTorch")
    return Table("Latency (batch 1)", header, tuple(rows), note=_latency_note(parity))


def size_table(manifest: Manifest) -> Table:
    """Per variant: file size, the saving against FP32, recipe and intended providers."""
    rows = []
    for name, comp in manifest.components.items():
        fp32 = comp.variants["fp32"].total_bytes if "fp32" in comp.variants else None
        for key, v in comp.variants.items():
            ratio = f"{fp32 / v.total_bytes:.2f}× smaller" if fp32 and v.total_bytes and key != "fp32" else DASH
            mb = f"{v.total_bytes / 1e6:.1f}" if v.total_bytes else DASH
            rows.append(_cells(name, key, v.recipe or DASH, ", ".join(v.providers), mb, ratio, v.onnx))
    header = ("component", "variant", "recipe", "for providers", "MB", "vs FP32", "file")
    return Table("Variants and sizes", header, tuple(rows))


_LOWER_IS_BETTER = frozenset({"max_abs", "mean_abs", "rel_l2"})
_NOT_SHOWN = frozenset({"scale", "finite"})


def _before_after(name: str, before: Any, after: Any, higher_is_better: bool | None, digits: int = 4) -> tuple[Cell, ...]:
    change = DASH
    status = Status.PLAIN
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        change = f"{after - before:+.4g}"
        if higher_is_better is not None and after != before:
            status = Status.PASS if (after > before) == higher_is_better else Status.FAIL
    return (Cell(name), Cell(fmt(before, digits)), Cell(fmt(after, digits)), Cell(change, status))


def _guard_entries(parity: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("component/variant", decision) for each guarded INT8 variant (older bundles kept
    one decision per component)."""
    for comp, decisions in (parity.get("int8_guard") or {}).items():
        if "before" in decisions:
            yield comp, decisions
        else:
            for variant, decision in decisions.items():
                yield f"{comp}/{variant}", decision


def end_to_end_table(parity: dict[str, Any]) -> Table:
    """What the user sees end to end (zero-shot argmax, captions, projector features)."""
    rows = []
    for rec in [r for r in parity.get("end_to_end") or [] if r.get("name") not in _ANSWERS]:  # answers: generation_table
        metrics = ", ".join(f"{k} {fmt(v, 6 if 'cos' in k or 'agreement' in k else 4)}" for k, v in rec.get("metrics", {}).items() if k not in _NOT_SHOWN)
        tolerance = ", ".join(f"{k} {fmt(v)}" for k, v in rec.get("tolerance", {}).items())
        failures = "; ".join(rec.get("failures", [])) or DASH
        rows.append((Cell(rec.get("name", DASH)), Cell(rec.get("variant", DASH)), verdict_cell(rec.get("passed")),
                     Cell(metrics), Cell(tolerance or DASH), Cell(failures, Status.FAIL if rec.get("failures") else Status.PLAIN)))
    return Table("End-to-end parity", ("check", "variant", "verdict", "metrics", "tolerance", "reasons"), tuple(rows))


_ANSWERS = ("generate", "generate deployed")  # VLM answer records: families.generation_parity, generation_deployed


def generation_table(parity: dict[str, Any]) -> Table:
    """VLM answers vs `model.generate` FP32: per language-model variant, then the deployed pairs."""
    rows = []
    for rec in [r for r in parity.get("end_to_end") or [] if r.get("name") in _ANSWERS]:
        m, tol, parts = rec.get("metrics", {}), rec.get("tolerance", {}), dict(rec.get("components") or {})
        lm = parts.pop("language_model", rec.get("variant"))
        firsts = rec.get("first_divergence") or []
        cos, bound = m.get("step_logits_cosine_min"), tol.get("step_logits_cosine_min")
        cos_cell = _against(cos, bound, upper=False)
        cos_cell = Cell(f"{fmt(cos, 6)} (≥ {bound:g})", cos_cell.status) if cos is not None and bound is not None else cos_cell
        exact = f"{round(m['exact_match'] * len(firsts))}/{len(firsts)}" if firsts and "exact_match" in m else fmt(m.get("exact_match"))
        rows.append(_cells(f"deployed {rec['deployment']}" if rec.get("deployment") else "LM variant", next(iter(parts.values()), DASH),
                           lm, verdict_cell(rec.get("passed")), exact, ", ".join("same" if f < 0 else str(f) for f in firsts) or DASH,
                           cos_cell,
                           Cell(fmt(m.get("step_logits_cosine_mean"), 6)), m.get("forced_top1_agreement"),
                           fmt(bool(m["cache_equals_no_cache"])) if "cache_equals_no_cache" in m else DASH,
                           Cell("; ".join(rec.get("failures", [])) or DASH, Status.FAIL if rec.get("failures") else Status.PLAIN)))
    header = ("record", "vision", "language model", "verdict", "exact match", "first divergence per image", "step cos min (tol)",
              "step cos mean", "forced top-1", "cache = no cache", "reasons")
    note = ("Greedy answers of the runtime vs transformers' `generate(do_sample=False)` in FP32 on the parity images. "
            "LM variant: that language model behind the vision variant of the same key (FP32 when the vision has none); "
            "deployed: the vision + language-model pair a user ships. Judged on the per-step logits cosine with the "
            "reference's tokens fed (teacher forcing); exact match and first divergence are reported, not judged "
            "(a near-tie flips a greedy token).")
    return Table("Answers vs model.generate", header, tuple(rows), note=note)


def guard_tables(parity: dict[str, Any]) -> list[Table]:
    """The INT8 guard's decisions per component and variant: parity, size and latency
    before/after, the attempts it made and the nodes it kept in float."""
    tables = []
    for comp, g in _guard_entries(parity):
        before, after = g.get("before", {}), g.get("after", {})
        keys = [k for k in sorted(set(before) | set(after)) if k not in _NOT_SHOWN]
        rows = [_before_after(k, before.get(k), after.get(k), k not in _LOWER_IS_BETTER, 6 if k.startswith("cos") else 4) for k in keys]
        sizes, lat = g.get("size_bytes", {}), g.get("latency_ms", {})
        if sizes:
            rows.append(_before_after("size MB", _mb(sizes.get("before")), _mb(sizes.get("after")), None))
        if lat:
            rows.append(_before_after("latency p50 ms", lat.get("before"), lat.get("after"), None))
        kept = tuple(g.get("kept_float", []))
        note = f"{len(kept)} node(s) kept in float." if kept else "No node needed to stay in float."
        tables.append(Table(f"INT8 guard: {comp}", ("", "before", "after", "change"), tuple(rows), note, kept))
        attempts = [
            _cells(i + 1, a.get("excluded"), Cell(fmt(a.get("cosine_min"), 6)), Cell(fmt(a.get("cosine_mean"), 6)), verdict_cell(a.get("passed")))
            for i, a in enumerate(g.get("attempts", []))
        ]
        if attempts:
            tables.append(Table(f"INT8 guard attempts: {comp}", ("attempt", "nodes excluded", "cos min", "cos mean", "parity"), tuple(attempts)))
        ranking = _ranking_table(comp, g.get("ranking") or [], set(kept))
        if ranking is not None:
            tables.append(ranking)
    return tables


def _ranking_table(comp: str, ranking: list[dict[str, Any]], kept: set[str], top: int = 10) -> Table | None:
    """The guard's per-node sensitivity (optional `ranking`: node, op, cosine_gain), most sensitive first."""
    if not ranking:
        return None
    rows = tuple(
        _cells(i + 1, r.get("node"), r.get("op"), r.get("cosine_gain"), Cell("float", Status.PASS) if r.get("node") in kept else "int8")
        for i, r in enumerate(ranking[:top])
    )
    note = (f"Top {len(rows)} of the {len(ranking)} shortlisted nodes (the noisiest in one instrumented run): "
            "cosine gained when that node alone stays in float.")
    return Table(f"INT8 guard sensitivity: {comp}", ("rank", "node", "op", "cos gain", "kept as"), rows, note)


def _mb(n: Any) -> float | None:
    return round(n / 1e6, 2) if isinstance(n, (int, float)) else None


def calibration_tables(parity: dict[str, Any]) -> list[Table]:
    """Calibration methods compared on the same samples, the chosen one marked."""
    tables = []
    for comp, c in (parity.get("calibration_methods") or {}).items():
        chosen = c.get("chosen")
        rows = [
            (Cell(method, Status.PASS if method == chosen else Status.PLAIN),)
            + _cells(Cell(fmt(r.get("cosine_min"), 6)), Cell(fmt(r.get("cosine_mean"), 6)), r.get("seconds"), "chosen" if method == chosen else "")
            for method, r in c.get("results", {}).items()
        ]
        note = f"Compared on the same {c['samples']} held-out samples." if c.get("samples") else ""
        tables.append(Table(f"Calibration methods: {comp}", ("method", "cos min", "cos mean", "seconds", ""), tuple(rows), note))
    return tables


def bench_sets(bench: dict[str, Any] | None) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(provider, result rows)] from bench.json, in either shape it is written in:
    `{"providers": {name: {"results": [...]}}}` (`vlm-export bench`, one entry per
    provider) or the flat `{"provider": name, "results": [...]}`."""
    if not bench:
        return []
    if isinstance(bench.get("providers"), dict):
        sets = [(str(name), entry.get("results") or []) for name, entry in bench["providers"].items() if isinstance(entry, dict)]
    else:
        sets = [(str(bench.get("provider", "?")), bench.get("results") or [])]
    return [(name, [r for r in rows if isinstance(r, dict)]) for name, rows in sets if isinstance(rows, list) and rows]


def bench_tables(bench: dict[str, Any] | None) -> list[Table]:
    """bench.json (latency vs batch) as one table per provider; empty when not benchmarked.

    The component column appears only when the results name components; the ratio column
    (median per-round ratio to the baseline variant, interleaved rounds) only when recorded,
    and says "unreliable" when the machine was busy."""
    from vlm_export.verify.latency import busy_reason

    entries = bench.get("providers", {}) if isinstance(bench, dict) and isinstance(bench.get("providers"), dict) else {}
    tables = []
    for provider, results in bench_sets(bench):
        named = any(r.get("component") for r in results)
        ratios = any(isinstance(r.get("vs"), dict) for r in results)
        entry = entries.get(provider) if isinstance(entries.get(provider), dict) else {}
        busy = busy_reason(entry.get("conditions"))
        rows = [
            _cells(*([r.get("component", DASH)] if named else []), r.get("variant"), r.get("batch"), r.get("p50_ms"),
                   r.get("p90_ms"), r.get("p99_ms"), r.get("throughput_per_s"), *([_vs_text(r.get("vs"), busy)] if ratios else []))
            for r in results
        ]
        header = (*(("component",) if named else ()), "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s",
                  *(("× baseline (IQR)",) if ratios else ()))
        note = (f"The machine was busy ({busy}): these figures are unreliable." if busy else
                "× baseline = median over interleaved rounds of baseline p50 / variant p50." if ratios else "")
        tables.append(Table(f"Latency vs batch ({provider} provider)", header, tuple(rows), note))
    return tables


def _vs_text(vs: Any, busy: str | None) -> Cell:
    if not isinstance(vs, dict) or not vs.get("median"):
        return Cell(DASH)
    if busy:
        return Cell(f"unreliable ({busy})", Status.FAIL)
    return Cell(f"{vs['median']:.2f}× ({vs.get('q1', vs['median']):.2f}–{vs.get('q3', vs['median']):.2f}) vs {vs.get('baseline', '?')}")


def all_tables(manifest: Manifest, parity: dict[str, Any], bench: dict[str, Any] | None = None) -> list[Table]:
    """Every table of the report in reading order (the ones with data only)."""
    tables: Iterable[Table | None] = [
        parity_table(parity), end_to_end_table(parity), generation_table(parity), *guard_tables(parity), *calibration_tables(parity),
        latency_table(parity), *bench_tables(bench), size_table(manifest),
    ]
    return [t for t in tables if t is not None and t.rows]
