"""The bad-input catalogue: every CLI command on inputs a user can get wrong.

Each case asserts the contract of `vlm_export.cli`: exit code 2, exactly one `error:`
line on stderr that names the file or flag, no traceback, and nothing new on disk
(no `OUT`, no `OUT.partial-*`, no file added to the bundle or the working folder).
The cases here are the ones tests/test_bad_input.py does not already cover; most run
in-process through typer's CliRunner (fast), a few through `python -m vlm_export.cli`
to check the real entry point and interpreter exit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from vlm_export.cli import app


@dataclass(frozen=True)
class Ctx:
    """What a case may use: a scratch folder, the tiny model and bundles, photos."""

    tmp: Path
    vit_dir: Path
    vit_bundle: Path
    photos: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def model_copy(self) -> Path:
        dst = self.tmp / "model"
        if not dst.exists():
            shutil.copytree(self.vit_dir, dst)
        return dst

    def bundle_copy(self) -> Path:
        dst = self.tmp / "bundle"
        if not dst.exists():
            shutil.copytree(self.vit_bundle, dst)
        return dst

    def build(self, model: Path, *extra: str) -> list[str]:
        return ["build", str(model), "-o", str(self.out), "--calibration", str(self.photos),
                "--parity-images", str(self.photos), "--calibration-size", "4", "--latency-runs", "1", *extra]


def _model_with(ctx: Ctx, name: str, content: bytes | None) -> Path:
    model = ctx.model_copy()
    if content is None:
        (model / name).unlink()
    else:
        (model / name).write_bytes(content)
    return model


def _file(ctx: Ctx, name: str, content: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(content)
    return path


def _legacy_weights_only(ctx: Ctx) -> Path:
    """A checkpoint with only a pickled pytorch_model.bin: refused, never unpickled."""
    model = _model_with(ctx, "model.safetensors", None)
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not loaded")
    return model


def _folder_of_text(ctx: Ctx) -> Path:
    folder = ctx.tmp / "texts"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def _truncated_jpeg(ctx: Ctx) -> Path:
    from PIL import Image

    full = ctx.tmp / "full.jpg"
    Image.open(ctx.photos / "chelsea.png").convert("RGB").save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    return _file(ctx, "truncated.jpg", data[: len(data) // 3])


def _tampered_bundle(ctx: Ctx, edit: Callable[[dict], None]) -> Path:
    bundle = ctx.bundle_copy()
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))
    return bundle


def _corrupt_onnx(ctx: Ctx) -> Path:
    bundle = ctx.bundle_copy()
    rel = json.loads((bundle / "manifest.json").read_text())["components"]["vision"]["variants"]["fp32"]["onnx"]
    with (bundle / rel).open("ab") as fh:
        fh.write(b"\x00")
    return bundle


# (id, argv maker, substrings the one error line must contain; "{tmp}", "{photos}" filled in)
Case = tuple[str, Callable[[Ctx], list[str]], tuple[str, ...]]

BUILD_CASES: list[Case] = [
    ("config-not-json", lambda c: c.build(_model_with(c, "config.json", b"{not json")), ("config.json", "not valid JSON")),
    ("config-not-utf8", lambda c: c.build(_model_with(c, "config.json", b"\xff\xfe\x00")), ("config.json", "not valid JSON")),
    ("config-no-model-type", lambda c: c.build(_model_with(c, "config.json", b'{"hidden_size": 8}')), ("config.json", "model_type")),
    ("config-is-a-list", lambda c: c.build(_model_with(c, "config.json", b"[1, 2]")), ("config.json", "model_type")),
    ("legacy-pickle-weights-only", lambda c: c.build(_legacy_weights_only(c)), ("pytorch_model.bin", "pickled weights are not loaded")),
    ("preprocessor-config-missing", lambda c: c.build(_model_with(c, "preprocessor_config.json", None)), ("preprocessor_config.json", "missing")),
    ("preprocessor-config-not-json", lambda c: c.build(_model_with(c, "preprocessor_config.json", b"{oops")), ("preprocessor_config.json",)),
    ("unknown-target", lambda c: c.build(c.vit_dir, "--target", "pdp-11"), ("pdp-11",)),
    ("calibration-size-0", lambda c: c.build(c.vit_dir, "--calibration-size", "0"), ("--calibration-size",)),
    ("calibration-size-negative", lambda c: c.build(c.vit_dir, "--calibration-size", "-5"), ("--calibration-size",)),
    ("int8-guard-maybe", lambda c: c.build(c.vit_dir, "--int8-guard", "maybe"), ("--int8-guard", "maybe")),
    ("precision-empty", lambda c: c.build(c.vit_dir, "--precision", ""), ("--precision",)),
    ("precision-mixed-unknown", lambda c: c.build(c.vit_dir, "--precision", "fp16,int3"), ("--precision", "int3")),
    ("calibration-folder-missing", lambda c: c.build(c.vit_dir, "--calibration", str(c.tmp / "nowhere")), ("nowhere",)),
    ("parity-folder-without-images", lambda c: c.build(c.vit_dir, "--parity-images", str(_folder_of_text(c))), ("--parity-images",)),
    ("out-parent-missing", lambda c: ["build", str(c.vit_dir), "-o", str(c.tmp / "no" / "such" / "out")], ("-o", "does not exist")),
]

RUN_CASES: list[Case] = [
    ("run-truncated-jpeg", lambda c: ["run", str(c.vit_bundle), str(_truncated_jpeg(c))], ("truncated.jpg", "truncated")),
    ("run-text-file", lambda c: ["run", str(c.vit_bundle), str(_file(c, "notes.txt", b"hello, not an image\n"))], ("notes.txt",)),
    ("run-empty-file", lambda c: ["run", str(c.vit_bundle), str(_file(c, "empty.png", b""))], ("empty.png",)),
    ("run-missing-image", lambda c: ["run", str(c.vit_bundle), str(c.tmp / "ghost.jpg")], ("ghost.jpg", "no such file")),
    ("run-folder-as-image", lambda c: ["run", str(c.vit_bundle), str(c.photos)], ("{photos}", "folder")),
    ("run-labels-on-a-classifier", lambda c: ["run", str(c.vit_bundle), str(c.photos / "chelsea.png"), "--labels", ""], ("--labels", "CLIP")),
    ("run-unknown-precision", lambda c: ["run", str(c.vit_bundle), str(c.photos / "chelsea.png"), "--precision", "fp8"], ("--precision", "fp8")),
    ("run-unknown-variant", lambda c: ["run", str(c.vit_bundle), str(c.photos / "chelsea.png"), "--variant", "int3"], ("--variant", "int3")),
    ("run-unknown-provider", lambda c: ["run", str(c.vit_bundle), str(c.photos / "chelsea.png"), "--provider", "abacus"], ("--provider", "abacus")),
    ("run-missing-bundle", lambda c: ["run", str(c.tmp / "nobundle"), str(c.photos / "chelsea.png")], ("nobundle", "manifest.json")),
    ("run-manifest-not-json", lambda c: ["run", str(_file(c, "manifest.json", b"\x00\x01garbage").parent), str(c.photos / "chelsea.png")], ("manifest.json", "not valid JSON")),
    ("run-newer-format", lambda c: ["run", str(_tampered_bundle(c, lambda d: d.update(format_version=7))), str(c.photos / "chelsea.png")], ("manifest.json", "newer")),
    ("run-unknown-family", lambda c: ["run", str(_tampered_bundle(c, lambda d: d.update(family="perceiver"))), str(c.photos / "chelsea.png")], ("perceiver",)),
    ("run-path-escapes", lambda c: ["run", str(_tampered_bundle(c, lambda d: d["components"]["vision"]["variants"]["fp32"].update(onnx="../../x.onnx"))), str(c.photos / "chelsea.png")], ("../../x.onnx", "inside the bundle")),
    ("run-variant-not-an-object", lambda c: ["run", str(_tampered_bundle(c, lambda d: d["components"]["vision"]["variants"].update(fp32=[1]))), str(c.photos / "chelsea.png")], ("manifest", "fp32")),
    ("run-checksum-mismatch", lambda c: ["run", str(_corrupt_onnx(c)), str(c.photos / "chelsea.png")], ("checksum mismatch",)),
    ("inspect-non-bundle", lambda c: ["inspect", str(c.tmp)], ("{tmp}", "manifest.json")),
    ("inspect-components-not-an-object", lambda c: ["inspect", str(_tampered_bundle(c, lambda d: d.update(components=["vision"])))], ("manifest.json", "components")),
    ("compare-non-bundle", lambda c: ["compare", str(c.vit_bundle), str(c.tmp)], ("{tmp}",)),
    ("engine-unknown-target", lambda c: ["engine", str(c.vit_bundle), "--target", "pdp-11", "--dry-run"], ("pdp-11",)),
    ("engine-non-bundle", lambda c: ["engine", str(c.tmp), "--target", "desktop-ada", "--dry-run"], ("manifest.json",)),
    ("bench-unknown-provider", lambda c: ["bench", str(c.vit_bundle), "--provider", "abacus", "--runs", "1"], ("--provider", "abacus")),
    ("bench-bad-batch", lambda c: ["bench", str(c.vit_bundle), "--batch", "one", "--runs", "1"], ("--batch", "one")),
    ("bench-unknown-variant", lambda c: ["bench", str(c.vit_bundle), "--variants", "int3", "--runs", "1"], ("int3",)),
]

SUBPROCESS_IDS = {"config-not-json", "int8-guard-maybe", "run-truncated-jpeg", "inspect-non-bundle", "bench-unknown-provider"}
CASES = BUILD_CASES + RUN_CASES


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under `roots` with its size and mtime: anything written shows up."""
    files: dict[str, tuple[int, int]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _invoke(argv: list[str], subprocess_run: bool) -> tuple[int, str]:
    if subprocess_run:
        proc = subprocess.run([sys.executable, "-m", "vlm_export.cli", *argv], capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr
    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(result.exception)))
    return result.exit_code, result.stderr


@pytest.mark.parametrize(("case_id", "argv_of", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(
    case_id: str, argv_of: Callable[[Ctx], list[str]], needles: tuple[str, ...],
    tiny_vit_dir: Path, vit_bundle: Path, photo_dir: Path, tmp_path: Path,
) -> None:
    ctx = Ctx(tmp=tmp_path, vit_dir=tiny_vit_dir, vit_bundle=vit_bundle, photos=photo_dir)
    argv = argv_of(ctx)
    watched = (tmp_path, vit_bundle, tiny_vit_dir, photo_dir)
    before = _snapshot(*watched)
    code, stderr = _invoke(argv, case_id in SUBPROCESS_IDS)

    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle.format(tmp=tmp_path, photos=photo_dir) in errors[0], errors[0]
    assert _snapshot(*watched) == before, "the command wrote files"
    assert not list(tmp_path.glob("out*")), "an OUT or OUT.partial-* folder was left behind"
