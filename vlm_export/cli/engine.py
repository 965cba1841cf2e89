"""`vlm-export engine`: plan TensorRT engines for a target and, where TensorRT imports, build them.

It prints the plans and their trtexec lines (always; `--dry-run` stops there), then builds
with the TensorRT Python API; elsewhere it exits 2 saying TensorRT is missing, with the
lines to run on the device already printed. TensorRT is imported only when building.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

import typer

from vlm_export.cli.errors import one_line_errors
from vlm_export.cli.options import comma_list


def _print_plans(bundle: Path, plans: list[Any], manifest: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{bundle}: TensorRT engines for {plans[0].target} (TensorRT {plans[0].tensorrt} assumed)")
    for col in ("component", "variant", "engine", "flags", "profile (min / opt / max)", "parity"):
        table.add_column(col)
    for p in plans:
        shapes = "; ".join(f"{i.name} {i.shape_arg('min').split(':')[1]} / {i.shape_arg('opt').split(':')[1]} / {i.shape_arg('max').split(':')[1]}" for i in p.inputs)
        passed = manifest.component(p.component).variants[p.variant].parity_passed
        table.add_row(p.component, p.variant, p.engine, ",".join(p.builder_flags) or "-", shapes, {True: "pass", False: "FAIL", None: "-"}[passed])
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table)
    typer.echo("# equivalent trtexec commands (run in the bundle folder on the device):")
    typer.echo(f"cd {shlex.quote(str(bundle))} && mkdir -p {shlex.quote(str(Path(plans[0].engine).parent))}")
    for p in plans:
        typer.echo(p.trtexec_command())


@one_line_errors
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
    plans = plan(manifest.typed, get_target(target), comma_list(precision), dla_core)
    _verify_planned(manifest, plans)
    _print_plans(bundle, plans, manifest)
    if dry_run:
        return
    _write_dla_inputs(bundle, plans)
    if not is_tensorrt_available():
        require_tensorrt()  # raises the one-line "TensorRT is not installed here" error, exit 2
    for record in build_engines(bundle, plans):
        typer.echo(f"built {record['path']} ({record['bytes'] / 1e6:.1f} MB, TensorRT {record['tensorrt_version']}, {record['device']})")


def _write_dla_inputs(bundle: Path, plans: list[Any]) -> None:
    """The Q/DQ-free ONNX and calibration cache a weakly typed DLA INT8 trtexec line reads
    (engines/qdq_cache.py), written before the lines are run here or on the device."""
    from vlm_export.bundle.paths import resolve_inside
    from vlm_export.engines.build import write_atomic
    from vlm_export.engines.qdq_cache import dla_int8_files

    for p in plans:
        if p.calibration_cache is not None and p.source_onnx is not None:
            model, cache = dla_int8_files(resolve_inside(bundle, p.source_onnx), p.tensorrt)
            write_atomic(resolve_inside(bundle, p.onnx), model)
            write_atomic(resolve_inside(bundle, p.calibration_cache), cache)
            typer.echo(f"wrote {p.onnx} and {p.calibration_cache} (Q/DQ scales as a calibration cache for DLA)")


def _verify_planned(manifest: Any, plans: list[Any]) -> None:
    """Each planned ONNX file inside the bundle, with its checksum and external data, as
    `run` checks them: a trtexec line is only printed for a file the bundle vouches for."""
    from vlm_export.runtime.manifest import check_external_data, verify_file

    for p in plans:
        variant = manifest.variants(p.component)[p.variant]
        verify_file(variant)
        check_external_data(variant)
