"""Manifest values from an untrusted bundle: bounded, typed, one line each (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app
from vlm_export.errors import BundleError
from vlm_export.runtime.manifest import read_manifest


@pytest.fixture()
def bundle_copy(vit_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(vit_bundle, dst)
    return dst


def _edit(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _inspect_one_line(bundle: Path) -> str:
    result = CliRunner().invoke(app, ["inspect", str(bundle)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_deep_nesting_is_one_line(bundle_copy: Path) -> None:
    """200,000 levels used to raise RecursionError from json; now refused by counting."""
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text[:-2] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(BundleError, match="nests 200001 levels deep"):
        read_manifest(bundle_copy)
    assert "nests 200001 levels deep" in _inspect_one_line(bundle_copy)


def test_brackets_inside_strings_do_not_count(bundle_copy: Path) -> None:
    _edit(bundle_copy, lambda d: d["source"].update(path="[" * 500 + "{" * 500))
    assert read_manifest(bundle_copy).data["source"]["path"].startswith("[[[")


def test_oversized_manifest_is_refused(bundle_copy: Path) -> None:
    _edit(bundle_copy, lambda d: d.update(padding="x" * (9 << 20)))
    with pytest.raises(BundleError, match="larger than 8 MB"):
        read_manifest(bundle_copy)


def test_manifest_fifo_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    os.mkfifo(bundle_copy / "manifest.json")
    code = f"from vlm_export.runtime.manifest import read_manifest\nread_manifest({str(bundle_copy)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is not a regular file" in proc.stderr.strip().splitlines()[-1]


def test_huge_preprocess_size_is_refused_before_allocating(bundle_copy: Path, photo_dir: Path) -> None:
    """10^6 x 10^6 made the kernel kill the process at 18 GB; now one line at load."""
    _edit(bundle_copy, lambda d: d["preprocess"].update(size={"height": 10**6, "width": 10**6}))
    # a child capped at 4 GB of address space, so a regression fails instead of starving the machine
    cap = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); " \
          "sys.argv = ['vlm-export', *sys.argv[1:]]; runpy.run_module('vlm_export.cli', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", cap, "run", str(bundle_copy), str(photo_dir / "chelsea.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: '{bundle_copy / 'manifest.json'}' has 'preprocess.size' {{'height': 1000000, 'width': 1000000}} "
        "(want whole numbers 1..8192); rebuild the bundle"
    ]


@pytest.mark.parametrize("value", ["224", 0, -5, 3.5, True, [224, 224]])
def test_preprocess_size_types(bundle_copy: Path, value: Any) -> None:
    _edit(bundle_copy, lambda d: d["preprocess"].update(size={"height": value, "width": 32}))
    with pytest.raises(BundleError, match=r"'preprocess.size'"):
        read_manifest(bundle_copy)


def test_huge_input_dims_are_refused(bundle_copy: Path) -> None:
    _edit(bundle_copy, lambda d: d["components"]["vision"]["inputs"][0].update(shape=["batch", 3, 100000, 100000]))
    line = _inspect_one_line(bundle_copy)
    assert "component 'vision' input 'pixel_values' with shape ['batch', 3, 100000, 100000]" in line


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(parity="oops"), "'parity' of type str (want an object)"),
        (lambda d: d.pop("source"), "no 'source' object"),
        (lambda d: d.update(source="x"), "no 'source' object"),
        (lambda d: d.update(family=["vit"]), "no 'family' string"),
        (lambda d: d["parity"].update(file=["parity.json"]), "a malformed 'parity' object"),
        (lambda d: d.update(files=[]), "a malformed 'files' object"),
        (lambda d: d["components"]["vision"].update(inputs="pixel_values"), "inputs that is not a list"),
        (lambda d: d["components"]["vision"]["variants"]["fp32"].update(onnx=5), "field 'onnx' that is not a string"),
        (lambda d: d["components"]["vision"]["variants"]["fp32"].update(external_data="w.bin"), "'external_data' that is not a list"),
    ],
)
def test_malformed_values_are_one_line(bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str) -> None:
    _edit(bundle_copy, edit)
    assert message in _inspect_one_line(bundle_copy)
