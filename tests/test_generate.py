"""A LLaVA bundle answers: runtime generation vs transformers' `model.generate`.

Tiny real-architecture checkpoint (tests/_tiny_lm.py): CLIP tower (16 image tokens) +
2-layer Llama with grouped-query attention, a word-level tokenizer and a processor chat
template. Random weights: token-id parity, never accuracy claims.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny_lm import IMAGE_TOKEN, save_tiny_llava
from vlm_export.cli import app
from vlm_export.errors import InputError

runner = CliRunner()
QUESTIONS = ("what is in this picture ?", "describe the image .")
MAX_NEW = 12


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava-lm") / "model")


@pytest.fixture(scope="module")
def lm_bundle(lm_dir: Path, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "llava-lm"
    args = ["build", str(lm_dir), "-o", str(out), "--calibration", str(photo_dir), "--parity-images", str(photo_dir),
            "--precision", "fp16,int4", "--latency-runs", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _hf_reference(model_dir: Path, image_path: Path, question: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) the transformers way: processor chat template + generate."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path).convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


def test_fp32_greedy_ids_equal_model_generate_with_and_without_cache(lm_bundle: Path, lm_dir: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    model = load(lm_bundle)
    checked = 0
    for image in sorted(photo_dir.iterdir())[:2]:
        for question in QUESTIONS:
            prompt, expected = _hf_reference(lm_dir, image, question)
            model.generate(image, question, max_new_tokens=MAX_NEW)
            assert model.last_generation.ids == expected, (image.name, question)
            model.generate(image, question, max_new_tokens=MAX_NEW, use_cache=False)
            assert model.last_generation.ids == expected, (image.name, question, "no cache")
            # our chat template (jinja2) + image-token expansion = the HF processor's ids
            side = model._language
            assert side.prompt_ids(side.prompt_text(question, False), 1)[0].tolist() == prompt
            assert prompt.count(IMAGE_TOKEN) == 16
            checked += 1
    assert checked == 4


def test_manifest_lists_the_language_side(lm_bundle: Path) -> None:
    manifest = json.loads((lm_bundle / "manifest.json").read_text())
    lm = manifest["components"]["language_model"]
    assert set(lm["variants"]) == {"fp32", "fp16", "int4-cpu", "int4", "int4-b128"}
    assert lm["variants"]["int4"]["recipe"] == "matmulnbits-4bit-block32-rtn-sym"
    assert lm["variants"]["int4-cpu"]["recipe"] == "matmulnbits-4bit-block32-rtn-sym-acc4"
    assert lm["variants"]["int4-cpu"]["providers"] == ["cpu"]
    assert [i["name"] for i in lm["inputs"][:3]] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert lm["inputs"][3] == {"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, "past_sequence", 16]}
    assert lm["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 200]}  # last position only
    assert manifest["components"]["vision_projector"]["fp32_fallback"] == ["int4", "int4-cpu", "int4-b128"]
    gen = manifest["generation"]
    assert (gen["num_layers"], gen["num_kv_heads"], gen["tokens_per_image"], gen["eos_token_ids"]) == (2, 2, 16, [2])
    assert set(manifest["files"]) == {"tokenizer.json", "embed_tokens.npy", "chat_template.jinja"}
    table = np.load(lm_bundle / "embed_tokens.npy")
    assert table.shape == (200, 64) and table.dtype == np.float32
    # INT4: 4 bits + one FP32 scale per block (block 32: 5 bits/weight, block 128: 4.25); at this
    # tiny width the graph's other bytes weigh in (benchmarks/bench_generate.py: the 7B shape)
    sizes = {k: v["bytes"] for k, v in lm["variants"].items()}
    assert sizes["int4"] < 0.4 * sizes["fp32"]  # (block 128 pads this model's 64-wide rows: larger here)


def test_parity_json_reports_generation_per_variant(lm_bundle: Path) -> None:
    parity = json.loads((lm_bundle / "parity.json").read_text())
    records = {r["variant"]: r for r in parity["end_to_end"] if r["name"] == "generate"}
    assert set(records) == {"fp32", "fp16", "int4-cpu", "int4", "int4-b128"}
    fp32 = records["fp32"]
    assert fp32["passed"] and fp32["metrics"]["exact_match"] == 1.0 and fp32["metrics"]["cache_equals_no_cache"] == 1.0
    assert fp32["metrics"]["step_logits_cosine_min"] > 0.99999
    for key in ("int4", "int4-cpu", "int4-b128"):
        rec = records[key]
        assert rec["passed"], rec["failures"]
        assert rec["tolerance"] == {"step_logits_cosine_min": 0.95}
        assert 0.95 <= rec["metrics"]["step_logits_cosine_min"] < 1.0  # quantized: close, not equal
        assert len(rec["first_divergence"]) == 3 and len(rec["step_logits_cosine"]) == 3 and len(rec["answers"]) == 3
    lm_rows = {r["variant"]: r for r in parity["records"] if r["component"] == "language_model"}
    assert lm_rows["int4"]["passed"] and lm_rows["int4"]["metrics"]["cosine_min"] < 1.0


def test_stream_sampling_and_stop(lm_bundle: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    model = load(lm_bundle, precision="int4")
    assert model.runners["language_model"].variant.key == "int4-cpu" and model.runners["vision_projector"].variant.key == "fp32"
    image = sorted(photo_dir.iterdir())[0]
    text = model.generate(image, QUESTIONS[0], max_new_tokens=10)
    pieces = list(model.generate(image, QUESTIONS[0], max_new_tokens=10, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == text
    one = model.generate(image, QUESTIONS[0], max_new_tokens=10, temperature=1.5, seed=7)
    assert model.generate(image, QUESTIONS[0], max_new_tokens=10, temperature=1.5, seed=7) == one
    others = {model.generate(image, QUESTIONS[0], max_new_tokens=10, temperature=1.5, seed=s) for s in range(4)}
    assert len(others) > 1  # the seed changes the draw
    words = text.split()
    stopped = model.generate(image, QUESTIONS[0], max_new_tokens=10, stop=words[2])
    assert stopped == text[: text.index(words[2])]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": 250}, "pass at most"),
    ({"prompt": "a " * 300}, "the model's context is 256"),
    ({"prompt": "what", "raw": True}, "0 image token(s)"),
    ({"prompt": "<image> <image> what", "raw": True}, "2 image token(s)"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
])
def test_bad_input_is_one_line(lm_bundle: Path, photo_dir: Path, kwargs: dict, message: str) -> None:
    from vlm_export.runtime import load

    model = load(lm_bundle)
    args = {"prompt": QUESTIONS[0], "max_new_tokens": 4} | kwargs
    with pytest.raises(InputError, match=None) as err:
        model.generate(sorted(photo_dir.iterdir())[0], args.pop("prompt"), **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_chat_template_needs_raw(lm_bundle: Path) -> None:
    from vlm_export.runtime import load

    model = load(lm_bundle)
    model.generate(np.zeros((32, 32, 3), dtype=np.uint8), QUESTIONS[0], max_new_tokens=1)
    model._language.template = None  # a tokenizer without a chat template
    with pytest.raises(InputError, match="no chat template; pass raw=True"):
        model.generate(np.zeros((32, 32, 3), dtype=np.uint8), QUESTIONS[0], max_new_tokens=1)
    assert len(model.generate(np.zeros((32, 32, 3), dtype=np.uint8), "USER: <image>\nwhat ? ASSISTANT:", max_new_tokens=3, raw=True)) > 0


def test_chat_cli_streams_and_refuses_bad_input(lm_bundle: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    image = sorted(photo_dir.iterdir())[0]
    expected = load(lm_bundle).generate(image, QUESTIONS[0], max_new_tokens=6)
    result = runner.invoke(app, ["chat", str(lm_bundle), str(image), QUESTIONS[0], "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == expected
    bad = runner.invoke(app, ["chat", str(lm_bundle), str(image), QUESTIONS[0], "--max-new-tokens", "0"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0 and "max_new_tokens" in bad.output


def test_weight_only_recipes_match_the_registry() -> None:
    """The quantizer's settings and the manifest's recipe names cannot drift apart."""
    from vlm_export.quantize.weight_only import CONFIGS, DEFAULT_KEYS
    from vlm_export.recipes import RECIPES

    assert set(DEFAULT_KEYS) == set(CONFIGS)
    for key, config in CONFIGS.items():
        assert RECIPES[key].recipe == config.recipe
        assert RECIPES[key].precision == f"int{config.bits}"


def test_genai_text_model_matches_our_loop(lm_bundle: Path, tmp_path: Path) -> None:
    """The genai folder's graph (token ids in, rank-3 logits out) gives the same greedy ids as
    our loop through plain onnxruntime; and, where onnxruntime-genai is installed, genai's
    own generator over genai_config.json does too."""
    import onnxruntime as ort

    from vlm_export.genai_text import write_genai_text_model
    from vlm_export.runtime import load

    out = write_genai_text_model(lm_bundle, tmp_path / "genai", "int4")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # GroupQueryAttention graph: genai binds one max_length buffer as past and present (its CPU path too)
    assert config["search"]["past_present_share_buffer"] is True
    model = load(lm_bundle, variant="int4", components=["language_model"])
    from vlm_export.runtime.generate_llava import LanguageSide

    side = LanguageSide.from_manifest(model.manifest, model.runners["language_model"])
    prompt = np.array([[1, 40, 42, 29, 30, 31]], dtype=np.int64)
    from vlm_export.runtime.generate import Sampling, Trace, decode

    ours = list(decode(side.step, side.embed, side.positions, side.embed(prompt), (2,), Sampling(10), Trace()))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ids, past, got = prompt, {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for k in ("key", "value")}, []
    seen = 0
    for _ in range(len(ours)):
        result = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, seen + ids.shape[1]), np.int64),
                                                     "position_ids": np.arange(seen, seen + ids.shape[1])[None], **past})))
        assert result["logits"].shape == (1, 1, 200)
        got.append(int(result["logits"][0, -1].argmax()))
        seen += ids.shape[1]
        ids = np.array([[got[-1]]])
        past = {f"past_key_values.{i}.{k}": result[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")}
        if got[-1] == 2:
            break
    assert got == ours
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install 'onnxruntime-genai==0.18.*')")
    params = og.GeneratorParams(og.Model(str(out)))
    params.set_search_options(max_length=prompt.shape[1] + 10, do_sample=False)
    generator = og.Generator(og.Model(str(out)), params)
    generator.append_tokens(prompt)
    genai_ids = []
    while not generator.is_done():
        generator.generate_next_token()
        genai_ids.append(int(generator.get_next_tokens()[0]))
    assert genai_ids[: len(ours)] == ours
