"""Only the exported component's weights are read (issue 16, "Load only what is exported").

LLaVA and Qwen2-VL export their vision side; their language models stay shapes on the
`meta` device and their bytes are never read (families/safetensors_parts.py). What must
hold: the loaded parts equal `from_pretrained`'s exactly, single file or sharded; a
LLaVA-1.5-7B whose language model is a 27 GB sparse shard builds its vision bundle within
a memory bound set by the vision tower; a damaged index or shard is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from vlm_export.cli import app

from sparse_checkpoint import build_peak_rss, save_sparse_llava
from test_llava import _save_tiny_llava
from test_qwen2_vl import qwen_dir  # noqa: F401 - fixture

INDEX = "model.safetensors.index.json"
# Vision depth of the CI variant of the 7B proof (the real tower has 24 layers; the
# benchmark benchmarks/bench_sparse_llava.py builds that one). Width, image size and the
# 7B language model are the real ones.
CI_VISION_LAYERS = 2
# The build's own memory apart from the weights: Python with torch, transformers, onnx and
# onnxruntime imported, a tiny LLaVA exported and checked (measured 0.56 GB), plus the
# activations of the parity batch (photo_dir's 6 images at 336 px: 577 tokens, 16 heads)
# and onnxruntime's arenas (together ~0.9 GB at CI depth).
BASE_RSS = 3 << 29  # 1.5 GiB
# Peak RSS per byte of FP32 vision weights on top of BASE_RSS: the loaded module (1), the
# exported ONNX model in memory (1), the sessions that check it (≤ 2); issue 16's own
# target is 4x. Measured (AMD EPYC, 2 cores): 1.76 GiB at CI depth (0.18 GiB of weights;
# 1.41 GiB with 3 parity images), 3.75 GiB for the full 24-layer tower with 3 parity
# images (1.21 GiB of weights, benchmarks/bench_sparse_llava.py).
# Reading the language model would add 25 GiB.
RSS_PER_WEIGHT_BYTE = 4


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_llava(tmp_path_factory.mktemp("llava-single"))


@pytest.fixture(scope="module")
def sharded_llava_dir(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint re-saved by transformers in small shards with an index."""
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("llava-sharded")
    LlavaForConditionalGeneration.from_pretrained(llava_dir).save_pretrained(folder, max_shard_size="40KB")
    shutil.copy(llava_dir / "preprocessor_config.json", folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2 and (folder / INDEX).is_file()
    return folder


# ---------------------------------------------------------------- equal to the full load


@pytest.mark.parametrize(("fixture", "architecture", "parts"), [
    ("llava_dir", "LlavaForConditionalGeneration", ("model.vision_tower.", "model.multi_modal_projector.")),
    ("sharded_llava_dir", "LlavaForConditionalGeneration", ("model.vision_tower.", "model.multi_modal_projector.")),
    ("qwen_dir", "Qwen2VLForConditionalGeneration", ("model.visual.",)),
])
def test_parts_equal_the_full_load_and_nothing_else_is_loaded(
    fixture: str, architecture: str, parts: tuple[str, ...], request: pytest.FixtureRequest
) -> None:
    import torch

    from vlm_export.families import detect
    from vlm_export.families.loading import load_pretrained

    model_dir = request.getfixturevalue(fixture)
    new = detect(model_dir).load(model_dir).model
    old = load_pretrained(model_dir, architecture)
    new_tensors = {**dict(new.named_parameters()), **dict(new.named_buffers())}
    old_tensors = {**dict(old.named_parameters()), **dict(old.named_buffers())}
    assert new_tensors.keys() == old_tensors.keys()
    loaded = {k for k in new_tensors if k.startswith(parts)}
    assert loaded and all(torch.equal(new_tensors[k], old_tensors[k]) and new_tensors[k].dtype == old_tensors[k].dtype
                          for k in loaded)
    rest = set(new_tensors) - loaded
    assert any(k.startswith("model.language_model.") for k in rest)
    assert all(new_tensors[k].is_meta for k in rest), sorted(k for k in rest if not new_tensors[k].is_meta)[:3]
    assert not new.training


def _relayout(src: Path, dst: Path, rename: Callable[[str], str]) -> Path:
    """`src` with every file key renamed: the same weights under another layout's names."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _prefixes(*pairs: tuple[str, str]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for old, new in pairs:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    return rename


# Names the same weights have in files written by other transformers versions: llava-hf's
# hub checkpoints (4.x, CLIP keys under `vision_model.`), and the 5.x model's own names
# (what a state_dict() saved by hand holds); Qwen2-VL's hub names are what the fixture
# holds (`visual.`, `model.`), 5.x's are `model.visual.`, `model.language_model.`.
LAYOUTS = {
    "llava-hf": ("llava_dir", _prefixes(("vision_tower.", "vision_tower.vision_model."))),
    "llava-model-names": ("llava_dir", _prefixes(("vision_tower.", "model.vision_tower."),
                                                  ("multi_modal_projector.", "model.multi_modal_projector."),
                                                  ("language_model.model.", "model.language_model."),
                                                  ("language_model.lm_head.", "lm_head."))),
    "qwen2-vl-model-names": ("qwen_dir", _prefixes(("visual.", "model.visual."), ("model.", "model.language_model."))),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_key_layout_loads_the_same_parts(layout: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    import torch

    from vlm_export.families import detect

    fixture, rename = LAYOUTS[layout]
    src = request.getfixturevalue(fixture)
    model_dir = _relayout(src, tmp_path / layout, rename)
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), framework="pt") as before, \
            safe_open(str(model_dir / "model.safetensors"), framework="pt") as after:
        assert len(set(after.keys())) == len(set(before.keys())) and set(after.keys()) != set(before.keys())
    reference = detect(src).load(src).model
    loaded = detect(model_dir).load(model_dir).model
    expected = {k: v for k, v in reference.state_dict().items() if not v.is_meta}
    got = {k: v for k, v in loaded.state_dict().items() if not v.is_meta}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_image_features_equal_the_full_models(llava_dir: Path, qwen_dir: Path) -> None:  # noqa: F811
    """The parity reference (`get_image_features`) of the part-loaded model, bit for bit."""
    import torch

    from vlm_export.families import detect
    from vlm_export.families.loading import load_pretrained

    llava_new = detect(llava_dir).load(llava_dir).model
    llava_old = load_pretrained(llava_dir, "LlavaForConditionalGeneration")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = llava_old.config

    def features(model: object) -> torch.Tensor:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))

    assert torch.equal(features(llava_new), features(llava_old))
    qwen_new = detect(qwen_dir).load(qwen_dir).model
    qwen_old = load_pretrained(qwen_dir, "Qwen2VLForConditionalGeneration")
    grid = torch.tensor([[1, 4, 6]])
    patches = torch.randn(24, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = qwen_new.get_image_features(patches, grid).pooler_output[0]
        b = qwen_old.get_image_features(patches, grid).pooler_output[0]
    assert a.abs().sum() > 0 and torch.equal(a, b)


def test_tied_embeddings_are_not_missing(tmp_path: Path) -> None:
    """Qwen2-VL-2B ties lm_head to the embeddings: the file has no lm_head.weight, rightly."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vlm_export.families.safetensors_parts import load_parts

    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=64),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                 "mrope_section": [4, 6, 6]}),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
    model = load_parts(tmp_path, "Qwen2VLForConditionalGeneration", ("model.visual",))
    assert not model.model.visual.merger.mlp[0].weight.is_meta and model.lm_head.weight.is_meta
    # With the language model among the parts, lm_head is the loaded embedding table itself.
    whole = load_parts(tmp_path, "Qwen2VLForConditionalGeneration", ("model.visual", "model.language_model", "lm_head"))
    embeddings = whole.model.language_model.embed_tokens.weight
    assert whole.lm_head.weight is embeddings and embeddings.abs().sum() > 0
    from safetensors.torch import load_file

    assert torch.equal(embeddings, load_file(str(tmp_path / "model.safetensors"))["model.embed_tokens.weight"])


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _refused(model: Path, tmp_path: Path, photos: Path) -> str:
    """Build `model`; assert exit 2, one `error:` line, no traceback, nothing written; return the line."""
    out = tmp_path / "out"
    argv = ["build", str(model), "-o", str(out), "--precision", "fp32", "--parity-images", str(photos), "--latency-runs", "1"]
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("out*")), list(tmp_path.glob("out*"))
    return errors[0]


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _index(model: Path) -> dict[str, str]:
    return json.loads((model / INDEX).read_text(encoding="utf-8"))["weight_map"]


def _vision_shard(model: Path) -> tuple[str, Path]:
    """A vision-tower key and the shard the index places it in."""
    key = next(k for k in _index(model) if k.startswith("vision_tower.") and k.endswith("fc1.weight"))
    return key, model / _index(model)[key]


def test_index_naming_a_missing_shard(sharded_llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model = _copy(sharded_llava_dir, tmp_path)
    _, shard = _vision_shard(model)
    shard.unlink()
    line = _refused(model, tmp_path, photo_dir)
    assert str(model / INDEX) in line and f"names shard '{shard}', which is missing" in line, line


def test_shard_header_disagreeing_with_the_index(sharded_llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _copy(sharded_llava_dir, tmp_path)
    key, shard = _vision_shard(model)
    tensors = load_file(str(shard))
    assert key in tensors
    save_file({k: v for k, v in tensors.items() if k != key}, str(shard), metadata={"format": "pt"})
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{shard}' lacks 1 tensor that '{model / INDEX}' places there ({key})" in line, line


def test_shard_holding_a_tensor_the_index_places_elsewhere(sharded_llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    """Two shards with the same key: which one would be read is not for a loader to guess."""
    from safetensors.torch import load_file, save_file

    model = _copy(sharded_llava_dir, tmp_path)
    key, shard = _vision_shard(model)
    other = next(model / name for name in sorted(set(_index(model).values())) if model / name != shard)
    tensors = load_file(str(other))
    save_file({**tensors, key: load_file(str(shard))[key]}, str(other), metadata={"format": "pt"})
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{other}' holds 1 tensor that '{model / INDEX}' places elsewhere or nowhere ({key})" in line, line


def test_component_key_absent_from_the_checkpoint(llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = _copy(llava_dir, tmp_path)
    path = model / "model.safetensors"
    key = "multi_modal_projector.linear_2.weight"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k != key}, str(path), metadata={"format": "pt"})
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{path}' does not match config.json: lacks 1 weight the config needs ({key})" in line, line


def test_qwen2_vl_visual_key_absent_from_a_sharded_checkpoint(qwen_dir: Path, photo_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import Qwen2VLForConditionalGeneration

    model = tmp_path / "model"
    Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir).save_pretrained(model, max_shard_size="40KB")
    shutil.copy(qwen_dir / "preprocessor_config.json", model)
    index = json.loads((model / INDEX).read_text(encoding="utf-8"))
    key = "visual.blocks.1.attn.qkv.weight"
    shard = model / index["weight_map"].pop(key)
    (model / INDEX).write_text(json.dumps(index), encoding="utf-8")
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(shard)).items() if k != key}, str(shard), metadata={"format": "pt"})
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{model / INDEX}' does not match config.json: lacks 1 weight the config needs ({key})" in line, line


def test_truncated_shard(sharded_llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model = _copy(sharded_llava_dir, tmp_path)
    _, shard = _vision_shard(model)
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{shard}' holds {size - 100} bytes but its header declares {size}" in line, line


def test_header_that_is_not_safetensors(llava_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    model = _copy(llava_dir, tmp_path)
    (model / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    line = _refused(model, tmp_path, photo_dir)
    assert f"'{model / 'model.safetensors'}' is not a readable safetensors file (header length {2**40}" in line, line


# ---------------------------------------------------------------- the 7B proof




def test_llava_7b_whose_language_model_exceeds_memory_builds_its_vision_bundle(photo_dir: Path, tmp_path: Path) -> None:
    """LLaVA-1.5-7B's real config (vision depth cut to CI_VISION_LAYERS); the 27 GB FP32
    language model is a sparse shard. Loading it whole would need more than this machine's
    24 GiB; the build must stay within BASE_RSS + RSS_PER_WEIGHT_BYTE × the FP32 vision weights."""
    import onnx

    facts = save_sparse_llava(tmp_path / "llava-7b", vision_layers=CI_VISION_LAYERS)
    lm = facts["lm_file"]
    assert lm.stat().st_size == facts["lm_bytes"] > 26 * 10**9  # 6.7 B parameters in FP32
    assert lm.stat().st_blocks * 512 < 10**6  # a hole: no disk, nothing real to read
    vision_bytes = 4 * facts["vision_params"]
    code, peak = build_peak_rss(tmp_path / "llava-7b", tmp_path / "out", photo_dir, tmp_path / "build.log")
    log = (tmp_path / "build.log").read_text(encoding="utf-8", errors="replace")
    assert code == 0, log[-3000:]
    bound = BASE_RSS + RSS_PER_WEIGHT_BYTE * vision_bytes
    print(f"peak RSS {peak / 2**30:.2f} GiB; bound {bound / 2**30:.2f} GiB; FP32 vision {vision_bytes / 2**30:.2f} GiB; "
          f"language model {facts['lm_bytes'] / 2**30:.1f} GiB")
    assert peak <= bound, f"peak RSS {peak / 2**30:.2f} GiB > bound {bound / 2**30:.2f} GiB"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    llm = manifest["llm"]
    assert (llm["hidden_size"], llm["tokens_per_image"], llm["image_token_id"]) == (4096, 576, 32000)
    graph = onnx.load(str(tmp_path / "out" / manifest["components"]["vision_projector"]["variants"]["fp32"]["onnx"]),
                      load_external_data=False)
    weights = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    # The tower and projector (less the layers after vision_feature_layer, which the export
    # drops), never a tensor of the language model (6.7 B).
    assert 0.5 * facts["vision_params"] < weights <= facts["vision_params"], (weights, facts["vision_params"])


def test_an_optional_key_the_file_lacks_gets_the_models_own_init(llava_dir: Path, tmp_path: Path) -> None:
    """As from_pretrained does for a key a family declares optional: initialized, not left on meta."""
    import torch
    from safetensors.torch import load_file, save_file

    from vlm_export.families.safetensors_parts import load_parts

    model_dir = _copy(llava_dir, tmp_path)
    path = model_dir / "model.safetensors"
    key = "vision_tower.post_layernorm.weight"  # the name transformers 5 saves it under
    tensors = load_file(str(path))
    assert key in tensors
    save_file({k: v for k, v in tensors.items() if k != key}, str(path), metadata={"format": "pt"})
    model = load_parts(model_dir, "LlavaForConditionalGeneration", ("model.vision_tower",), optional_keys=(r"post_layernorm",))
    layer_norm = model.model.vision_tower.post_layernorm
    assert torch.equal(layer_norm.weight, torch.ones(32)) and torch.equal(layer_norm.bias, tensors[key.replace("weight", "bias")])
