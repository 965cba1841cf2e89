"""The base install (`pip install vlm-export`, the device) and what it needs.

Decision: typer and rich stay in the base install, because the device runs `vlm-export
run/inspect/bench/engine`; they are pure Python and small. The runtime API must not need
them: `vlm_export.runtime` loads and runs a bundle where they cannot be imported.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vlm_export.runtime import load

ROOT = Path(__file__).resolve().parent.parent


# What `vlm-export run BUNDLE IMAGE --precision int8 --top-k 3` computes, minus the CLI.
_DESCRIBE = "from vlm_export.runtime import load\n{extra}\nm = load({bundle!r}, precision='int8')\nresult = [m.precision, m.describe({image!r}, top_k=3)]\n"


def test_runtime_runs_without_typer_or_rich(vit_bundle: Path, photo_dir: Path) -> None:
    """A fresh interpreter loads and runs the bundle with typer, rich and click
    unimportable, never tries to import them, and (unblocked) leaves none loaded."""
    from _runtime_isolation import CLI_SIDE, assert_runtime_only

    image = str(photo_dir / "chelsea.png")
    precision, line = assert_runtime_only(_DESCRIBE.format(bundle=str(vit_bundle), image=image, extra=""), packages=CLI_SIDE)
    assert precision == "int8-cpu"
    assert line == load(vit_bundle, precision="int8").describe(image, top_k=3)
    assert len(line.split(", ")) == 3


def test_isolation_check_catches_a_cli_import(vit_bundle: Path, photo_dir: Path) -> None:
    """The control: the same workload plus an import of the command line must be reported."""
    from _runtime_isolation import CLI_SIDE, assert_detected

    workload = _DESCRIBE.format(bundle=str(vit_bundle), image=str(photo_dir / "chelsea.png"), extra="import vlm_export.cli")
    assert_detected(workload, packages=CLI_SIDE)


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower())
    return names


def test_device_requirements_cover_the_base_install() -> None:
    """The device installs runtimes/requirements-runtime.txt, then the package with
    --no-deps (to keep the CPU onnxruntime out): every base dependency must be in that
    file, with onnxruntime as onnxruntime-gpu."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {"onnxruntime-gpu" if n == "onnxruntime" else n for n in _requirement_names(base)}
    assert wanted == {"numpy", "onnxruntime-gpu", "pillow", "tokenizers", "typer", "rich"}
    listed = _requirement_names((ROOT / "runtimes" / "requirements-runtime.txt").read_text().splitlines())
    assert sorted(wanted - listed) == []


def test_console_script_is_the_cli_app() -> None:
    """`vlm-export` (pyproject's [project.scripts]) resolves to the typer app of vlm_export.cli."""
    from vlm_export.cli import app

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vlm-export"]
    assert script.value == "vlm_export.cli:app"
    assert script.load() is app
