"""`vlm-export engine` and `vlm-export bench`: the device-side commands.

`engine` prints the plans and their trtexec lines (always; `--dry-run` stops there),
then builds with the TensorRT Python API where it imports; elsewhere it exits 2 saying
TensorRT is missing, with the lines to run on the device already printed. `bench`
times every variant of a bundle on one provider and writes OUT/bench.json atomically
(the only file it adds; manifest and checksums stay as they were).

On a bundle that cannot be written (read-only folder or filesystem, full disk) `bench`
still prints its table, says in one line that nothing was saved and exits 0: the
measurements are the point, the bundle is not ours to fix. `--output FILE` writes the
results to FILE instead and leaves the bundle untouched.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer

from vlm_export.errors import BundleError, InputError

BENCH_NAME = "bench.json"
MAX_BATCH = 4096
MAX_RUNS = 100_000
# Sizes for symbolic dims other than batch when no --target gives its opt values.
DEFAULT_SYMBOL_SIZES = {"patches": 1024, "num_patches": 1024, "sequence": 128, "sequence_length": 128, "past_sequence": 128, "past_sequence_length": 128}


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's error policy (one line, exit 2; Ctrl-C 130), imported at call time so
    that `vlm_export.cli` can import this module without a circular import."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from vlm_export.cli import _one_line_errors as policy

        return policy(fn)(*args, **kwargs)

    return wrapper


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [p.strip().lower() for p in text.split(",") if p.strip()] if text else None


def _print_plans(bundle: Path, plans: list[Any], manifest: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{bundle}: TensorRT engines for {plans[0].target} (TensorRT {plans[0].tensorrt} assumed)")
    for col in ("component", "variant", "engine", "flags", "profile (min / opt / max)", "parity"):
        table.add_column(col)
    for p in plans:
        shapes = "; ".join(f"{i.name} {i.shape_arg('min').split(':')[1]} / {i.shape_arg('opt').split(':')[1]} / {i.shape_arg('max').split(':')[1]}" for i in p.inputs)
        passed = manifest["components"][p.component]["variants"][p.variant].get("parity_passed")
        table.add_row(p.component, p.variant, p.engine, ",".join(p.builder_flags) or "-", shapes, {True: "pass", False: "FAIL", None: "-"}[passed])
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table)
    typer.echo("# equivalent trtexec commands (run in the bundle folder on the device):")
    typer.echo(f"cd {shlex.quote(str(bundle))} && mkdir -p {shlex.quote(str(Path(plans[0].engine).parent))}")
    for p in plans:
        typer.echo(p.trtexec_command())


@_one_line_errors
def engine(
    bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`."),
    target: str = typer.Option(..., "--target", help="Deployment target, e.g. jetson-orin-nano, desktop-ada."),
    precision: Optional[str] = typer.Option(None, help="Comma list of precisions to build. Defaults to every TensorRT variant the target can run."),
    dla_core: Optional[int] = typer.Option(None, "--dla-core", help="Build for this DLA core (Orin NX/AGX), GPU fallback on, static shapes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plans and trtexec lines; build nothing."),
) -> None:
    """Plan (and, where TensorRT imports, build) TensorRT engines for a target."""
    from vlm_export.engines.build import build_engines, is_tensorrt_available, require_tensorrt
    from vlm_export.engines.plan import plan
    from vlm_export.engines.targets import get_target
    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    plans = plan(manifest.data, get_target(target), _split(precision), dla_core)
    _verify_planned(manifest, plans)
    _print_plans(bundle, plans, manifest.data)
    if dry_run:
        return
    if not is_tensorrt_available():
        require_tensorrt()  # raises the one-line "TensorRT is not installed here" error, exit 2
    for record in build_engines(bundle, plans):
        typer.echo(f"built {record['path']} ({record['bytes'] / 1e6:.1f} MB, TensorRT {record['tensorrt_version']}, {record['device']})")


def _verify_planned(manifest: Any, plans: list[Any]) -> None:
    """Each planned ONNX file inside the bundle, with its checksum and external data, as
    `run` checks them: a trtexec line is only printed for a file the bundle vouches for."""
    from vlm_export.runtime.manifest import check_external_data, verify_file

    for p in plans:
        variant = manifest.variants(p.component)[p.variant]
        verify_file(variant)
        check_external_data(variant)


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


def _symbol_sizes(target: Optional[str]) -> dict[str, int]:
    if target is None:
        return dict(DEFAULT_SYMBOL_SIZES)
    from vlm_export.engines.plan import DIM_RANGES
    from vlm_export.engines.targets import get_target

    t = get_target(target)
    return {symbol: getattr(t, key).opt for symbol, key in DIM_RANGES.items()}


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


def _bench_rows(bundle: Path, provider: str, batches: list[int], runs: int, variants: Optional[list[str]], sizes: dict[str, int], threads: Optional[int]) -> list[dict[str, Any]]:
    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.verify import measure

    manifest = read_manifest(bundle)
    rows = []
    for component, comp in manifest.components.items():
        keys = [k for k in comp["variants"] if variants is None or k in variants]
        for key in keys:
            model = load(bundle, provider=provider, variant=key, components=[component], threads=threads)
            for batch in batches:
                feed = bench_feed(comp["inputs"], batch, sizes)
                stats = measure(lambda: model.run(feed, component), runs=runs)
                rows.append({"component": component, "variant": key, "precision": comp["variants"][key]["precision"],
                             "batch": batch, **stats, "throughput_per_s": batch * 1e3 / stats["p50_ms"]})
    if not rows:
        raise InputError(f"no variant of '{bundle}' matches --variants {','.join(variants or [])}")
    return rows


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


@_one_line_errors
def bench(
    bundle: Path = typer.Argument(..., help="A bundle folder made by `vlm-export build`."),
    provider: str = typer.Option("cpu", help="cpu, cuda, tensorrt-ep (onnxruntime providers)."),
    batch: str = typer.Option("1,8", help="Comma list of batch sizes."),
    runs: int = typer.Option(20, help="Timed runs per variant and batch size (after 3 warm-up runs)."),
    variants: Optional[str] = typer.Option(None, help="Comma list of variant keys. Defaults to every variant of the bundle."),
    target: Optional[str] = typer.Option(None, help="Size patch/sequence dims at this target's opt values. Defaults to 1024 patches, 128 tokens."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads for onnxruntime (1..4 per CPU core). Defaults to onnxruntime's choice."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write the results to this JSON file instead of OUT/bench.json (the bundle stays untouched, e.g. when read-only)."),
) -> None:
    """Latency p50/p90/p99 and throughput per variant on one provider; writes OUT/bench.json
    (a read-only bundle: results printed, one warning line, exit 0)."""
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    _check_ranges(runs, threads)
    batches = _parse_batches(batch)
    rows = _bench_rows(bundle, provider, batches, runs, _split(variants), _symbol_sizes(target), threads)
    table = Table(title=f"{bundle} on {provider}: {runs} runs per row")
    for col in ("component", "variant", "batch", "p50 ms", "p90 ms", "p99 ms", "items/s"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["component"], r["variant"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['throughput_per_s']:.1f}")
    console = Console() if Console().is_terminal else Console(width=120)
    console.print(table)
    entry = {"measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
             "machine": f"{platform.machine()} {platform.processor() or platform.system()}", "threads": threads, "runs": runs, "results": rows}
    _save(bundle, provider, entry, output)
