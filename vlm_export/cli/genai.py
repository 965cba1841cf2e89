"""`vlm-export genai BUNDLE OUT [--variant int4-cpu]`: the bundle's language model as an
onnxruntime-genai text model folder (genai_config.json, model.onnx, tokenizer).

Why a command over `genai_text.write_genai_text_model`: a user who already runs
onnxruntime-genai's generator (its search, its batching) can run our verified language
model there, text only (image answers stay with `vlm-export chat`, which splices the image
rows in). The folder is written under a temporary name beside OUT and moved into place
whole; `--force` replaces only a folder this command wrote (its file names, nothing else),
by an atomic exchange where the kernel has one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from vlm_export.cli.errors import one_line_errors
from vlm_export.errors import InputError

GENAI_FILES = frozenset({"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"})
"""What `write_genai_text_model` writes: the proof that `--force` may replace a folder."""


def is_genai_folder(path: Path) -> bool:
    """A real folder holding genai_config.json and only files that this command writes."""
    if path.is_symlink() or not path.is_dir() or not (path / "genai_config.json").is_file():
        return False
    return all(child.name in GENAI_FILES and child.is_file() and not child.is_symlink() for child in path.iterdir())


def check_request(bundle: Path, out: Path, variant: str, force: bool, max_length: int | None) -> str:
    """Refuse bad input before anything is written; returns the variant's recipe."""
    from vlm_export.bundle.output_guard import refuse_protected
    from vlm_export.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    if "language_model" not in manifest.components or not isinstance(manifest.data.get("generation"), dict):
        raise InputError(f"'{bundle}' is a {manifest.family} bundle without a language model; build a LLaVA checkpoint "
                         "with its tokenizer files")
    if manifest.data["generation"].get("mrope"):  # genai_text writes 2-D position_ids; this graph takes (batch, 3, seq)
        raise InputError(f"'{bundle}' is a Qwen2-VL bundle: its language model takes 3-D M-RoPE position ids, which "
                         "onnxruntime-genai's text decoder does not feed; genai takes LLaVA bundles (Llama, Mistral, Qwen2)")
    variants = manifest.variants("language_model")
    if variant not in variants:
        raise InputError(f"unknown variant '{variant}' (--variant); the language model has: {', '.join(variants)}")
    if max_length is not None and max_length < 1:
        raise InputError(f"--max-length must be >= 1 (got {max_length})")
    where = out.resolve()
    if where == bundle.resolve() or bundle.resolve() in where.parents:
        raise InputError(f"OUT '{out}' is inside the bundle '{bundle}'; choose a folder outside it")
    if os.path.lexists(out):
        if not force:
            raise InputError(f"'{out}' exists; choose a new OUT, or pass --force to replace a folder vlm-export genai wrote")
        # --force deletes the old OUT (it ends in the staging folder): never /, home, the
        # current directory or the bundle, whatever files it holds
        refuse_protected(out, [bundle], "OUT", "a folder vlm-export genai wrote")
        if not is_genai_folder(out):
            raise InputError(f"'{out}' is not a folder written by vlm-export genai (genai_config.json and its files only); "
                             "--force replaces only those; choose a new OUT")
    return str(variants[variant].recipe)


def replace_into(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`; an existing `out` ends up at `new`'s name.

    Where renameat2(RENAME_EXCHANGE) works, `out` is at every instant the old or the new
    folder; elsewhere two renames (a kill between them leaves the old folder under the
    temporary name, which the caller's cleanup removes: a derived folder, rebuilt in seconds).
    """
    from vlm_export.bundle.swap import RENAME_EXCHANGE, renameat2

    if not os.path.lexists(out):
        new.rename(out)
    elif not renameat2(new, out, RENAME_EXCHANGE):
        old = new.with_name(new.name + ".old")
        out.rename(old)
        new.rename(out)
        old.rename(new)


@one_line_errors
def genai(
    bundle: Path = typer.Argument(..., help="A LLaVA bundle with a language_model component (Qwen2-VL's M-RoPE model is refused)."),
    out: Path = typer.Argument(..., help="Folder to create for onnxruntime-genai (genai_config.json, model.onnx, tokenizer.json)."),
    variant: str = typer.Option("fp32", help="The language-model variant to convert: fp32, fp16, int4-cpu (the CPU's "
                                              "INT4), int4, int4-b128 or int8-wo, as the bundle has them."),
    max_length: Optional[int] = typer.Option(None, help="genai's search max_length (prompt + answer tokens). "
                                                        "Defaults to the model's context length."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a folder this command wrote."),
) -> None:
    """Write the bundle's language model as an onnxruntime-genai text model (token ids in, text out; no image)."""
    from vlm_export.cleanup import is_temp, remove_tree, temp_dir
    from vlm_export.genai_text import write_genai_text_model

    made = check_request(bundle, out, variant, force, max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_dir(out.parent, out.name)  # nothing under OUT's name until the folder is complete
    try:
        written = write_genai_text_model(bundle, stage / "genai", variant, max_length)
        replace_into(written, out)
    finally:
        remove_tree(stage, is_temp)
    typer.echo(f"wrote {out}: language_model/{variant} ({made}) with its embedding table, genai_config.json and "
               f"tokenizer.json; run it with onnxruntime_genai.Model('{out}')")
