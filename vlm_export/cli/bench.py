"""`vlm-export bench`: latency and throughput of every variant of a bundle on one provider.

It writes OUT/bench.json atomically (the only file it adds; manifest and checksums stay
as they were). On a bundle that cannot be written (read-only folder or filesystem, full
disk) it still prints its table, says in one line that nothing was saved and exits 0:
the measurements are the point, the bundle is not ours to fix. `--output FILE` writes
the results to FILE instead and leaves the bundle untouched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from vlm_export.cli.errors import one_line_errors
from vlm_export.cli.options import comma_list
from vlm_export.errors import BundleError, InputError

BENCH_NAME = "bench.json"
MAX_BATCH = 4096
MAX_RUNS = 100_000
def bench_feed(inputs: list[dict[str, Any]], batch: int, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs of batch `batch`: N(0,1) floats, zeros for integer inputs.

    Latency only; the values do not matter as long as every variant sees the same ones.
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in inputs:
        shape = []
        for dim in spec["shape"]:
            if dim == "batch":
                shape.append(batch)
            elif isinstance(dim, str):
                if dim not in sizes:
                    raise InputError(f"input '{spec['name']}' has dimension '{dim}' with no benchmark size; pass --target")
                shape.append(sizes[dim])
            else:
                shape.append(int(dim))
        dtype = np.dtype(spec["dtype"])
        feed[spec["name"]] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feed


def _write_bench(bundle: Path, provider: str, entry: dict[str, Any], output: Optional[Path] = None) -> Path:
    """Merge this provider's results into OUT/bench.json (or `output`) via a temp file and
    a rename. The old bench.json is read through the bundle's containment check; one that
    is broken, a symlink or a FIFO is replaced, never trusted or followed."""
    from vlm_export.runtime.bundle_files import read_bundle_json, write_bundle_file

    folder, name = (Path(output).parent, Path(output).name) if output is not None else (Path(bundle), BENCH_NAME)
    data: dict[str, Any] = {"format_version": 1, "providers": {}}
    if os.path.lexists(folder / name):
        try:
            old = read_bundle_json(folder, name)
            if isinstance(old, dict) and isinstance(old.get("providers"), dict):
                data = old
        except BundleError:
            pass
    data["providers"][provider] = entry
    return write_bundle_file(folder, name, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _bench_rows(bundle: Path, provider: str, batches: list[int], runs: int, variants: Optional[list[str]], target: Optional[str],
                threads: Optional[int], conditions: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Per component and batch size, every variant measured in interleaved rounds
    (verify.latency): absolute p50/p90/p99, the median per-round ratio to the fp32
    variant (`vs`, with its quartiles), and on the CPU provider the achieved GMAC/s and
    fraction of the CPU's peak for the variant's precision (verify.efficiency). Each measurement's machine state is appended to
    `conditions`. Sizes of symbolic dims other than batch: the opt of `target`'s engine
    profile, else the opt the family declared for the component (manifest `dims`)."""
    from vlm_export.engines import get_target, symbol_sizes
    from vlm_export.runtime import load
    from vlm_export.runtime.cpu import default_threads
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.verify.efficiency import PEAK_PRECISION, achieved, peaks_for, variant_macs
    from vlm_export.verify.latency import interleaved, split_runs

    manifest = read_manifest(bundle)
    peaks = peaks_for(threads) if provider == "cpu" else {}
    rounds, per_round = split_runs(runs)
    rows = []
    for component in manifest.components:
        comp = manifest.component(component)
        sizes = symbol_sizes(comp, get_target(target) if target else None)
        keys = [k for k in comp.variants if variants is None or k in variants]
        if not keys:
            continue
        models = {key: load(bundle, provider=provider, variant=key, components=[component], threads=threads, target=target)
                  for key in keys}
        paths = manifest.variants(component)
        macs = {key: variant_macs(paths[key].path, {k: v for k, v in sizes.items() if k != "batch"}) for key in keys}
        base = "fp32" if "fp32" in keys else keys[0]
        for batch in batches:
            feed = bench_feed([t.to_json() for t in comp.inputs], batch, sizes)
            measured = interleaved({key: (lambda m=m: m.run(feed, component)) for key, m in models.items()}, rounds, per_round,
                                   ort_threads=threads or default_threads())
            if conditions is not None:
                conditions.append(measured.conditions_json())
            for key in keys:
                stats, precision = measured.stats[key], comp.variants[key].precision
                per_image = (macs[key] or {}).get("per_image")
                rows.append({"component": component, "variant": key, "precision": precision,
                             "batch": batch, **stats, "throughput_per_s": batch * 1e3 / stats["p50_ms"],
                             "vs": {"baseline": base, **measured.ratio(base, key)}, "macs_per_image": per_image,
                             **achieved(per_image, batch, stats["p50_ms"], peaks.get(PEAK_PRECISION.get(precision, "fp32")))})
    if not rows:
        raise InputError(f"no variant of '{bundle}' matches --variants {','.join(variants or [])}")
    return rows


def merge_conditions(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a whole bench run: the state before its first measurement and after
    its last, the method, and the busiest reason any measurement gave (None when quiet)."""
    if not conditions:
        return {}
    busy = [c["busy"] for c in conditions if c.get("busy")]
    return {"before": conditions[0].get("before"), "after": conditions[-1].get("after"), "method": conditions[0].get("method"),
            "measurements": len(conditions), "busy": busy[0] if busy else None}


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise InputError(f"--batch '{text}' must be a comma list of positive integers up to {MAX_BATCH}, e.g. 1,8")
    return batches


def _check_ranges(runs: int, threads: Optional[int]) -> None:
    """--runs and --threads within what a benchmark can use, before any model loads."""
    if not 1 <= runs <= MAX_RUNS:
        raise InputError(f"--runs must be 1..{MAX_RUNS} (got {runs})")
    most = (os.cpu_count() or 1) * 4
    if threads is not None and not 1 <= threads <= most:
        raise InputError(f"--threads must be 1..{most} (4 per CPU core here; got {threads})")


def _save(bundle: Path, provider: str, entry: dict[str, Any], output: Optional[Path]) -> None:
    """Write bench.json (and refresh the reports) or, when the OS refuses, say so in one line."""
    from vlm_export.runtime.bundle_files import BundleWriteError

    try:
        path = _write_bench(bundle, provider, entry, output)
        if output is None:
            _refresh(bundle)
    except BundleWriteError as exc:
        typer.echo(f"warning: measurements not saved: {exc}; pass --output FILE to save them elsewhere", err=True)
        return
    typer.echo(f"results written to {path}")


def _refresh(bundle: Path) -> None:
    try:
        from vlm_export.report import refresh_reports

        refresh_reports(bundle)
    except ImportError:  # a runtime-only install has no matplotlib
        typer.echo("reports not refreshed: matplotlib missing (pip install 'vlm-export[build]')", err=True)


@one_line_errors
def bench(
    bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`."),
    provider: str = typer.Option("cpu", help="cpu, cuda, tensorrt-ep (onnxruntime providers)."),
    batch: str = typer.Option("1,8", help="Comma list of batch sizes."),
    runs: int = typer.Option(20, help="Timed runs per variant and batch size, split into interleaved rounds of at most 5 (after 3 warm-up runs)."),
    variants: Optional[str] = typer.Option(None, help="Comma list of variant keys. Defaults to every variant of the bundle."),
    target: Optional[str] = typer.Option(None, help="Size patch/sequence dims at this target's engine-profile opt values, and give the TensorRT EP this target's recorded plan. Defaults to the opt sizes the model declared."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for onnxruntime (1..4 per CPU core). Defaults to onnxruntime's choice."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the results to this JSON file instead of OUT/bench.json (the bundle stays untouched, e.g. when read-only)."),
) -> None:
    """Latency p50/p90/p99 and throughput per variant on one provider; writes OUT/bench.json
    (a read-only bundle: results printed, one warning line, exit 0)."""
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    from vlm_export.verify.efficiency import format_efficiency, peaks_for

    _check_ranges(runs, threads)
    batches = _parse_batches(batch)
    measured: list[dict[str, Any]] = []
    rows = _bench_rows(bundle, provider, batches, runs, comma_list(variants), target, threads, measured)
    conditions = merge_conditions(measured)
    method = conditions.get("method") or {}
    table = Table(title=f"{bundle} on {provider}: {method.get('rounds')} interleaved rounds × {method.get('runs_per_round')} runs per row")
    for col in ("component", "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s", "× base (IQR)", "GMAC/s, % of peak"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        vs = r["vs"]
        ratio = "unreliable" if conditions.get("busy") else f"{vs['median']:.2f}× ({vs['q1']:.2f}–{vs['q3']:.2f}) vs {vs['baseline']}"
        table.add_row(r["component"], r["variant"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['throughput_per_s']:.1f}", ratio, format_efficiency(r))
    console = Console() if Console().is_terminal else Console(width=170)
    console.print(table)
    peaks = peaks_for(threads) if provider == "cpu" else {}
    for peak in peaks.values():
        typer.echo(f"{peak.describe()}")
    if conditions.get("busy"):
        typer.echo(f"warning: the machine was busy ({conditions['busy']}): these figures are unreliable; re-run on a quiet machine", err=True)
    entry = {"measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
             "machine": f"{platform.machine()} {platform.processor() or platform.system()}", "threads": threads, "runs": runs,
             "conditions": conditions, "results": rows, "peaks": {k: p.to_json() for k, p in peaks.items()}}
    _save(bundle, provider, entry, output)
