"""The language-model graph and position ids beyond Llama: Qwen2-VL's 3-D M-RoPE, and
LLaVA over Mistral and Qwen2 language models.

- `runtime.mrope.rope_index` (numpy) equals `Qwen2VLModel.get_rope_index` on several
  image grids and prompts, and the decode positions equal the model's `rope_deltas` rule;
- the export wrapper (`families.llm_decoder`) with M-RoPE equals the Qwen2-VL text model's
  own forward, for a prompt and for a decode step over the cache;
- Mistral- and Qwen2-based LLaVA bundles build (FP32 only: the build's own end-to-end
  check requires the runtime's greedy ids to equal `model.generate`, with and without the
  cache) and answer through the runtime.
Random tiny weights: parity, never accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny_lm import save_tiny_llava
from vlm_export.cli import app

IMAGE, VISION_START = 290, 292


@pytest.fixture(scope="module")
def qwen2_vl() -> object:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=IMAGE, video_token_id=291, vision_start_token_id=VISION_START)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def _prompt(grids: list[list[int]], texts: list[int]) -> list[int]:
    """texts[i] text tokens, then image i (vision start + its merged tokens), ..., then the tail."""
    ids: list[int] = []
    for n, grid in zip(texts, grids):
        ids += list(range(10, 10 + n)) + [VISION_START] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4)
    return ids + list(range(20, 20 + texts[-1]))


CASES = [([[1, 4, 6]], [3, 5]), ([[1, 8, 4]], [0, 1]), ([[1, 4, 6], [1, 4, 4]], [2, 2, 4]),
         ([[1, 10, 2], [1, 2, 10], [1, 6, 6]], [1, 0, 3, 2]), ([[2, 4, 4]], [4, 4])]


@pytest.mark.parametrize("grids, texts", CASES)
def test_rope_index_equals_get_rope_index(qwen2_vl: object, grids: list, texts: list) -> None:
    import torch

    from vlm_export.runtime.mrope import rope_index

    ids = _prompt(grids, texts)
    tensor = torch.tensor([ids])
    expected, delta = qwen2_vl.model.get_rope_index(tensor, mm_token_type_ids=(tensor == IMAGE).int(), image_grid_thw=torch.tensor(grids))
    got, got_delta = rope_index(np.array(ids), IMAGE, np.array(grids), 2)
    np.testing.assert_array_equal(got, expected.numpy())
    assert got_delta == int(delta)


def test_rope_index_refuses_a_grid_that_does_not_match_the_tokens() -> None:
    from vlm_export.errors import InputError
    from vlm_export.runtime.mrope import rope_index

    with pytest.raises(InputError, match="has 6 merged tokens but the prompt holds 4"):
        rope_index(np.array(_prompt([[1, 4, 4]], [1, 1])), IMAGE, np.array([[1, 4, 6]]), 2)
    with pytest.raises(InputError, match="1 image"):
        rope_index(np.array(_prompt([[1, 4, 4]], [1, 1])), IMAGE, np.array([[1, 4, 4], [1, 4, 4]]), 2)


def test_mrope_step_equals_the_text_model_for_prompt_and_decode(qwen2_vl: object) -> None:
    import torch

    from vlm_export.families.llm_decoder import LmGeometry, decoder_step
    from vlm_export.runtime.mrope import decode_positions, rope_index

    grids = [[1, 4, 6], [1, 4, 4]]
    ids = _prompt(grids, [2, 3, 2])
    positions, delta = rope_index(np.array(ids), IMAGE, np.array(grids), 2)
    geometry = LmGeometry.from_text_config(qwen2_vl.config.text_config, mrope=True)
    step = decoder_step(qwen2_vl.model.language_model, qwen2_vl.lm_head, geometry)
    embeds = torch.randn(1, len(ids) + 1, 64, generator=torch.Generator().manual_seed(1))
    full = np.concatenate([positions, decode_positions(len(ids), 1, delta)], axis=2)
    with torch.no_grad():
        hidden = qwen2_vl.model.language_model(inputs_embeds=embeds, position_ids=torch.from_numpy(full)).last_hidden_state
        reference = qwen2_vl.lm_head(hidden[:, -2:])
        empty = [torch.zeros(1, 2, 0, 16) for _ in range(4)]
        # the graph takes (batch, 3, sequence): the sample axis first
        prompt_logits, *past = step(embeds[:, :-1], torch.ones(1, len(ids), dtype=torch.long),
                                    torch.from_numpy(positions.transpose(1, 0, 2).copy()), *empty)
        decode_logits, *_ = step(embeds[:, -1:], torch.ones(1, len(ids) + 1, dtype=torch.long),
                                 torch.from_numpy(decode_positions(len(ids), 1, delta).transpose(1, 0, 2).copy()), *past)
    assert float((prompt_logits - reference[:, 0]).abs().max()) < 1e-5
    assert float((decode_logits - reference[:, 1]).abs().max()) < 1e-5
    assert delta < 0  # the images' 2-D positions use fewer positions than tokens: a real offset was applied


@pytest.mark.parametrize("text", ["mistral", "qwen2"])
def test_llava_over_mistral_and_qwen2_answers_like_generate(text: str, photo_dir: Path, tmp_path: Path) -> None:
    from vlm_export.runtime import load

    model_dir = save_tiny_llava(tmp_path / "model", text=text)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", str(model_dir), "-o", str(out), "--calibration", str(photo_dir),
                                      "--parity-images", str(photo_dir), "--precision", "fp32", "--latency-runs", "1"])
    assert result.exit_code == 0, result.output
    records = [r for r in json.loads((out / "parity.json").read_text())["end_to_end"] if r["name"] == "generate"]
    assert [(r["variant"], r["passed"]) for r in records] == [("fp32", True)]
    assert records[0]["metrics"]["exact_match"] == 1.0 and records[0]["metrics"]["cache_equals_no_cache"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["llm"]["text_model_type"] == text
    answer = load(out).generate(sorted(photo_dir.iterdir())[0], "what is in this picture ?", max_new_tokens=5)
    assert isinstance(answer, str) and len(answer.split()) >= 1


def _hf_qwen_answer(model_dir: Path, image: object, question: str, max_new: int) -> list[int]:
    """transformers' way: the tokenizer's chat template, <|image_pad|> expanded to the grid's
    merged count (what Qwen2VLProcessor does), then `generate`."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer, processor = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = processor(images=[image], return_tensors="pt")
    count = int(pixels["image_grid_thw"].prod()) // 4
    ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * count), return_tensors="pt")["input_ids"]
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                             mm_token_type_ids=(ids == 199).int(), do_sample=False, max_new_tokens=max_new)
    return out[0, ids.shape[1]:].tolist()


def test_qwen2_vl_answers_like_generate_at_several_sizes(photo_dir: Path, tmp_path: Path) -> None:
    """Qwen2-VL bundle: runtime greedy ids (M-RoPE positions from numpy, per-size image rows)
    equal `model.generate` for images of different grids, with and without the cache."""
    from PIL import Image

    from _tiny_lm import save_tiny_qwen2_vl
    from vlm_export.runtime import load

    model_dir = save_tiny_qwen2_vl(tmp_path / "model")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["build", str(model_dir), "-o", str(out), "--calibration", str(photo_dir),
                                      "--parity-images", str(photo_dir), "--precision", "fp32", "--latency-runs", "1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["language_model"]["inputs"][2]["shape"] == ["batch", 3, "sequence"]
    records = [r for r in json.loads((out / "parity.json").read_text())["end_to_end"] if r["name"] == "generate"]
    assert [(r["variant"], r["passed"], r["metrics"]["exact_match"]) for r in records] == [("fp32", True, 1.0)]
    model = load(out)
    photo = Image.open(sorted(photo_dir.iterdir())[1]).convert("RGB")
    grids = set()
    for size in ((112, 112), (112, 56), (56, 112)):
        image = photo.resize(size)
        expected = _hf_qwen_answer(model_dir, image, "what is in this picture ?", 8)
        model.generate(image, "what is in this picture ?", max_new_tokens=8)
        assert model.last_generation.ids == expected, size
        model.generate(image, "what is in this picture ?", max_new_tokens=8, use_cache=False)
        assert model.last_generation.ids == expected, (size, "no cache")
        grids.add(size)
    assert len(grids) == 3
