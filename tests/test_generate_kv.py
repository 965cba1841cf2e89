"""The KV cache between decode steps (runtime.kv_binding) and the weight-only INT8 variant.

One tiny LLaVA bundle built with `--precision int8`: FP32 and `int8-wo` language models
(MatMulNBits 8-bit, block 128) beside the INT8 vision tower. The I/O-bound loop must give
the ids of the numpy loop and of transformers' `generate`, allocate the same host bytes at
every step, and keep the cache within prompt + max_new_tokens.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _tiny_lm import save_tiny_llava
from test_generate import MAX_NEW, QUESTIONS, _hf_reference
from vlm_export.cli import app
from vlm_export.errors import InputError
from vlm_export.runtime.generate import Sampling, Trace, decode
from vlm_export.runtime.kv_binding import BoundStep, Device, binding_device

PROMPT = np.array([[1, 40, 42, 29, 30, 31]], dtype=np.int64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava-kv") / "model")


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "llava-int8"
    args = ["build", str(model_dir), "-o", str(out), "--calibration", str(photo_dir), "--parity-images", str(photo_dir),
            "--precision", "int8", "--latency-runs", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _side(bundle: Path, variant: str = "fp32") -> object:
    from vlm_export.runtime import load
    from vlm_export.runtime.generate_llava import LanguageSide

    model = load(bundle, variant=variant, components=["language_model"])
    return LanguageSide.from_manifest(model.manifest, model.runners["language_model"])


@pytest.mark.parametrize("providers, options, expected", [
    (["CPUExecutionProvider"], {}, Device("cpu", 0)),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], {"CUDAExecutionProvider": {"device_id": "1"}}, Device("cuda", 1)),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], {}, Device("cuda", 0)),
    (["CPUExecutionProvider", "CUDAExecutionProvider"], {}, Device("cpu", 0)),  # CPU first: the cache stays on the host
    (["CoreMLExecutionProvider", "CPUExecutionProvider"], {}, Device("cpu", 0)),
    ([], None, Device("cpu", 0)),
])
def test_binding_device_follows_the_first_provider(providers: list, options: dict, expected: Device) -> None:
    assert binding_device(providers, options) == expected


def test_bound_loop_equals_numpy_loop_and_model_generate(int8_bundle: Path, model_dir: Path, photo_dir: Path) -> None:
    from vlm_export.runtime import load

    model = load(int8_bundle, precision="fp32")
    image = sorted(photo_dir.iterdir())[0]
    for question in QUESTIONS:
        _, expected = _hf_reference(model_dir, image, question)
        model.generate(image, question, max_new_tokens=MAX_NEW)
        bound_ids = list(model.last_generation.ids)
        side = model._language
        assert isinstance(side.stepper(10), BoundStep)  # the default path is the I/O-bound one
        side.io_binding = False
        try:
            model.generate(image, question, max_new_tokens=MAX_NEW)
        finally:
            side.io_binding = True
        assert bound_ids == expected == model.last_generation.ids, question
        model.generate(image, question, max_new_tokens=MAX_NEW, use_cache=False)  # bound step, empty past each time
        assert model.last_generation.ids == expected


def test_per_step_host_allocations_do_not_grow(int8_bundle: Path) -> None:
    """Python allocates the same bytes at step 5 and step 95, and onnxruntime keeps one
    capacity-long buffer per layer's key and value, written in place: its size and address
    are the same at every step, never past prompt + max_new_tokens."""
    side = _side(int8_bundle)
    assert side.config.kv_share_buffer  # the GroupQueryAttention graph (families.gqa_attention)
    steps = 96
    prompt = np.random.default_rng(0).integers(3, 190, size=(1, 150))  # 150 + 96 of the model's 256 positions
    step = side.stepper(prompt.shape[1] + steps)
    tokens = decode(step, side.embed, side.positions, side.embed(prompt), (), Sampling(steps), Trace())
    addresses = []
    tracemalloc.start()
    try:
        peaks = []
        for _ in range(steps):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            next(tokens)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
            addresses.append(tuple(v.data_ptr() for v in step._shared.values.values()))
    finally:
        tracemalloc.stop()
    assert step.steps == steps and step._shared.length == prompt.shape[1] + steps - 1
    assert len(set(step.host_bytes)) == 1 and step.host_bytes[0] == 200 * 4  # the logits row, every step
    # the cache: layers × {key, value} × kv_heads × capacity × head_dim × 4 bytes, every step
    per_position = 2 * 2 * 2 * 16 * 4
    assert step.cache_bytes == [(prompt.shape[1] + steps) * per_position] * steps
    assert len(set(addresses)) == 1 and len(set(addresses[0])) == 4  # one buffer per past, bound once
    later = peaks[4:]
    # decode steps allocate the same host bytes whatever the cache length: the cache holds
    # 46 KB more at step 95 than at step 5 and the attention mask is 728 B longer; a per-step copy
    # of either would show here (numpy's small-block cache hides blocks under 1 KB)
    assert max(later) - min(later) < 256, peaks
    assert max(later) < per_position * 20, peaks


def test_the_loop_allocates_the_same_host_bytes_at_every_step() -> None:
    """decode() itself: at a 20 000-position prompt the attention mask alone is 160 KB and
    grows 8 B a step; it is a view of one buffer, so step 60 allocates what step 5 does."""
    hidden, vocab = 8, 50
    table = np.random.default_rng(0).normal(size=(vocab, hidden)).astype(np.float32)
    seen_masks: list[np.ndarray] = []

    def step(x: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: object) -> tuple[np.ndarray, object]:
        seen_masks.append(mask)
        assert mask.shape[1] == (past or 0) + x.shape[1] and positions.shape == (1, x.shape[1])
        return np.ones((1, vocab), dtype=np.float32), mask.shape[1]

    prompt = table[np.zeros((1, 20000), dtype=np.int64)]
    tokens = decode(step, lambda ids: table[ids], lambda a, n: np.arange(a, a + n)[None], prompt, (), Sampling(64), Trace())
    next(tokens)
    tracemalloc.start()
    try:
        peaks = []
        for _ in range(63):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            next(tokens)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert max(peaks[4:]) - min(peaks[4:]) < 256 and max(peaks) < 20000 * 8, peaks  # no 160 KB mask per step
    assert [m.shape[1] for m in seen_masks] == list(range(20000, 20064))
    assert len({m.__array_interface__["data"][0] for m in seen_masks}) == 1  # one buffer, viewed


def test_the_cache_is_bounded_by_prompt_and_max_new_tokens(int8_bundle: Path) -> None:
    side = _side(int8_bundle)
    config = side.config
    session = side.runner.session
    with pytest.raises(InputError, match="the model's context is 256") as err:
        BoundStep(session, config.num_layers, config.num_kv_heads, config.head_dim, config.max_positions + 1,
                  config.max_positions)
    assert "\n" not in str(err.value)
    step = side.stepper(PROMPT.shape[1] + 3)  # a request of 3 new tokens asks for room for 9 positions
    tokens = decode(step, side.embed, side.positions, side.embed(PROMPT), (), Sampling(6), Trace())
    assert len([next(tokens) for _ in range(4)]) == 4  # the 4th step's cache holds 9 positions: the bound
    with pytest.raises(InputError, match="would hold 10 positions, over this generation's bound of 9"):
        next(tokens)
    with pytest.raises(InputError, match="pass at most"):  # through generate: refused before any step
        side.check_room(250, 10)


def test_cuda_keeps_the_cache_on_the_device(int8_bundle: Path, photo_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("CUDAExecutionProvider is not in this onnxruntime (CPU wheel or no GPU); run on a CUDA machine")
    from vlm_export.runtime import load

    image = sorted(photo_dir.iterdir())[0]
    cpu = load(int8_bundle, precision="fp32")
    cpu.generate(image, QUESTIONS[0], max_new_tokens=MAX_NEW)
    gpu = load(int8_bundle, precision="fp32", provider="cuda")
    gpu.generate(image, QUESTIONS[0], max_new_tokens=MAX_NEW)
    assert gpu.last_generation.ids == cpu.last_generation.ids
    side = gpu._language
    step = side.stepper(PROMPT.shape[1] + 4)
    assert step.device == Device("cuda", 0)
    _, cache = step(side.embed(PROMPT), np.ones((1, 6), np.int64), side.positions(0, 6), None)
    assert {v.device_name() for v in cache.values.values()} == {"cuda"} and cache.length == 6


def test_int8_weight_only_holds_its_generation_tolerance(int8_bundle: Path, photo_dir: Path) -> None:
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    variants = manifest["components"]["language_model"]["variants"]
    assert variants["int8-wo"]["recipe"] == "matmulnbits-8bit-block128-rtn-sym-acc4"
    assert variants["int8-wo"]["providers"] == ["cpu", "cuda"] and variants["int8-wo"]["precision"] == "int8"
    assert variants["int8-wo"]["bytes"] < 0.6 * variants["fp32"]["bytes"]  # 8 bits + a scale per 128 weights
    parity = json.loads((int8_bundle / "parity.json").read_text())
    record = next(r for r in parity["end_to_end"] if r["name"] == "generate" and r["variant"] == "int8-wo")
    assert record["passed"], record["failures"]
    assert record["tolerance"] == {"step_logits_cosine_min": 0.995}
    assert 0.995 <= record["metrics"]["step_logits_cosine_min"] < 1.0  # quantized: close, not equal
    assert record["metrics"]["cache_equals_no_cache"] == 1.0
    # the runtime picks it for --precision int8 on CPU and answers through the bound loop
    from vlm_export.runtime import load

    model = load(int8_bundle, precision="int8")
    assert model.runners["language_model"].variant.key == "int8-wo"
    image = sorted(photo_dir.iterdir())[0]
    text = model.generate(image, QUESTIONS[0], max_new_tokens=8)
    assert len(model.last_generation.ids) == 8 and text
    bound = list(model.last_generation.ids)
    model._language.io_binding = False  # the numpy step over the same MatMulNBits session
    assert model.generate(image, QUESTIONS[0], max_new_tokens=8) == text and model.last_generation.ids == bound


def test_runners_without_an_onnxruntime_session_keep_the_numpy_step(int8_bundle: Path) -> None:
    """TensorRT plans (runtime.trt_runner) have no onnxruntime session: no binding, the plain step."""
    from vlm_export.runtime.kv_binding import bound_step

    side = _side(int8_bundle)
    assert bound_step(object(), side.config, 10) is None
    side.runner = type("PlanRunner", (), {"infer": side.runner.infer})()
    assert side.stepper(10) == side.step
