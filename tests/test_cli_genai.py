"""`vlm-export genai BUNDLE OUT`: the bundle's language model as an onnxruntime-genai folder.

The folder must load in onnxruntime-genai 0.18 and give the greedy ids our runtime gives
on the same prompt (the bundle's int4-cpu graph, the same CPU kernels); bad input is one
line and exit 2, and nothing is left under a temporary name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _combo_bundle import llava_int8_int4_bundle
from vlm_export.cleanup import TEMP_TAG
from vlm_export.cli import app

runner = CliRunner()
PROMPT = [1, 40, 42, 29, 30, 31]  # <s> + words of the tiny tokenizer
NEW = 10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    return llava_int8_int4_bundle(tmp_path_factory, photo_dir)


def _ours(bundle: Path, variant: str) -> list[int]:
    """Greedy ids of the runtime's language side (the bundle's graph, its embedding table)."""
    from vlm_export.runtime import load
    from vlm_export.runtime.generate_llava import LanguageSide

    model = load(bundle, components=["language_model"], component_variants={"language_model": variant})
    side = LanguageSide.from_manifest(model.manifest, model.runners["language_model"])
    eos = set(model.manifest.data["generation"]["eos_token_ids"])
    ids: list[int] = []
    past, seen, feed = None, 0, side.embed(np.array([PROMPT], dtype=np.int64))
    while len(ids) < NEW and not (ids and ids[-1] in eos):
        total = seen + feed.shape[1]
        logits, past = side.step(feed, np.ones((1, total), dtype=np.int64), side.positions(seen, feed.shape[1]), past)
        ids.append(int(logits[0].argmax()))
        seen, feed = total, side.embed(np.array([[ids[-1]]], dtype=np.int64))
    return ids


def _genai(folder: Path) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install 'onnxruntime-genai==0.18.*')")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int64))
    ids = []
    while not generator.is_done():
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    return ids


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TEMP_TAG in p.name]


def test_genai_folder_runs_in_onnxruntime_genai_like_our_runtime(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "genai"
    result = runner.invoke(app, ["genai", str(bundle), str(out), "--variant", "int4-cpu"])
    assert result.exit_code == 0, result.output
    assert "language_model/int4-cpu (matmulnbits-4bit-block32-rtn-sym-acc4)" in result.output
    assert {p.name for p in out.iterdir()} == {"genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["eos_token_id"] == [2]
    assert config["search"]["max_length"] == 256  # the model's context, no --max-length
    ours = _ours(bundle, "int4-cpu")
    assert len(ours) >= 3
    assert _genai(out)[: len(ours)] == ours
    assert _leftovers(tmp_path) == []


def test_force_replaces_only_a_genai_folder(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "genai"
    assert runner.invoke(app, ["genai", str(bundle), str(out), "--max-length", "64"]).exit_code == 0
    fp32_bytes = (out / "model.onnx").stat().st_size
    again = runner.invoke(app, ["genai", str(bundle), str(out), "--variant", "int4"])
    assert again.exit_code == 2 and again.output.strip().count("\n") == 0
    assert "exists" in again.output and "--force" in again.output
    assert (out / "model.onnx").stat().st_size == fp32_bytes  # untouched
    forced = runner.invoke(app, ["genai", str(bundle), str(out), "--variant", "int4", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "model.onnx").stat().st_size < 0.5 * fp32_bytes  # now the INT4 graph
    assert json.loads((out / "genai_config.json").read_text())["search"]["max_length"] == 256
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "genai_config.json").write_text("{}")
    (mine / "notes.txt").write_text("keep me")
    refused = runner.invoke(app, ["genai", str(bundle), str(mine), "--force"])
    assert refused.exit_code == 2 and "not a folder written by vlm-export genai" in refused.output
    assert (mine / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--variant", "int8-cpu"], "unknown variant 'int8-cpu' (--variant); the language model has: fp32, int4-cpu"),
    (["--variant", "fp16"], "unknown variant 'fp16' (--variant)"),
    (["--max-length", "0"], "--max-length must be >= 1"),
])
def test_bad_variant_or_length_is_one_line(bundle: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["genai", str(bundle), str(tmp_path / "genai"), *args])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert message in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_bundle_without_language_model_or_out_inside_it(bundle: Path, vit_bundle: Path, tmp_path: Path) -> None:
    no_lm = runner.invoke(app, ["genai", str(vit_bundle), str(tmp_path / "genai")])
    assert no_lm.exit_code == 2 and no_lm.output.strip().count("\n") == 0
    assert "vit bundle without a language model" in no_lm.output
    inside = runner.invoke(app, ["genai", str(bundle), str(bundle / "genai")])
    assert inside.exit_code == 2 and "inside the bundle" in inside.output and not (bundle / "genai").exists()
    assert list(tmp_path.iterdir()) == []


def test_mrope_language_model_is_refused(bundle: Path, tmp_path: Path) -> None:
    """Qwen2-VL's LM takes (batch, 3, seq) position ids; genai feeds (batch, seq): onnxruntime-genai
    fails at its first step ("Invalid rank for input: position_ids"), so the command refuses first.
    The manifest's own flag decides (a copy of the LLaVA bundle with generation.mrope set)."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"]["mrope"] = True
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["genai", str(copy), str(tmp_path / "genai")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "3-D M-RoPE position ids" in result.output and not (tmp_path / "genai").exists()


def test_replace_without_an_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing (macOS, musl, some filesystems): two renames, same result."""
    import vlm_export.bundle.swap as swap
    from vlm_export.cli.genai import replace_into

    new, out = tmp_path / "stage" / "genai", tmp_path / "out"
    new.mkdir(parents=True)
    out.mkdir()
    (new / "model.onnx").write_text("new")
    (out / "model.onnx").write_text("old")
    monkeypatch.setattr(swap, "renameat2", lambda src, dst, flags: False)
    replace_into(new, out)
    assert (out / "model.onnx").read_text() == "new" and (new / "model.onnx").read_text() == "old"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_genai_deletes_only_its_staging_folder_and_the_genai_folder_it_replaces(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command deletes one thing: its staging folder (cleanup.temp_dir, beside OUT),
    which after --force holds the old OUT, proven a genai folder. The user's files beside
    OUT, a model folder and the bundle stay, also when writing fails half-way."""
    import vlm_export.genai_text as genai_text

    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / f"genai{TEMP_TAG[:-1]}").mkdir()  # a look-alike name without the tool's tag
    before, bundle_before = _snapshot(tmp_path), _snapshot(bundle)
    real = genai_text.write_genai_text_model

    def half_written(bundle_dir: Path, folder: Path, *args: object) -> Path:
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(genai_text, "write_genai_text_model", half_written)
    failed = runner.invoke(app, ["genai", str(bundle), str(tmp_path / "genai")])
    assert failed.exit_code == 2 and "no space left" in failed.output
    assert _snapshot(tmp_path) == before  # nothing left, nothing taken
    monkeypatch.setattr(genai_text, "write_genai_text_model", real)
    assert runner.invoke(app, ["genai", str(bundle), str(tmp_path / "genai")]).exit_code == 0
    assert runner.invoke(app, ["genai", str(bundle), str(tmp_path / "genai"), "--variant", "int4-cpu", "--force"]).exit_code == 0
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("genai/") and k != "genai"} == before
    assert sorted(k for k in after if k.startswith("genai/")) == [
        "genai/genai_config.json", "genai/model.onnx", "genai/tokenizer.json", "genai/tokenizer_config.json"]
    assert _snapshot(bundle) == bundle_before


def test_force_never_replaces_the_current_directory(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that holds only genai's files is replaceable, but not while it is where
    the user stands: --force would delete the current directory."""
    out = tmp_path / "genai"
    assert runner.invoke(app, ["genai", str(bundle), str(out)]).exit_code == 0
    before = _snapshot(out)
    monkeypatch.chdir(out)
    refused = runner.invoke(app, ["genai", str(bundle), ".", "--force"])
    assert refused.exit_code == 2 and refused.output.strip().count("\n") == 0
    assert "is or holds the current directory" in refused.output
    assert _snapshot(out) == before and _leftovers(tmp_path) == []
