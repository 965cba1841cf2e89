"""The `language_model` graph's GroupQueryAttention with one shared past/present buffer.

One tiny Llama (4 query heads over 2 key/value heads) exported through the build's own
path (families.llm_decoder → export.onnx_export): the graph must carry onnxruntime's
GroupQueryAttention, equal PyTorch's eager step where past and present are separate
(the Concat meaning), and equal it again where the runtime binds one capacity-long
buffer as both (runtime.kv_binding): written in place, never read past the valid rows
(the buffer starts as NaN), same address at every step. FP16 too (the kernel's other type).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlm_export.runtime.kv_binding import BoundStep

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 97


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, object]:
    """(the PyTorch step module, its exported FP32 graph, the geometry)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_export.export import export_component
    from vlm_export.families.llava_language import language_model_spec
    from vlm_export.families.llm_decoder import LmGeometry, decoder_step

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    geometry = LmGeometry.from_text_config(config)
    step = decoder_step(model.model, model.lm_head, geometry)
    path = export_component(language_model_spec(step, geometry), tmp_path_factory.mktemp("kv-share") / "lm.onnx")
    return step, path, geometry


def _torch_run(step: object, embeds: list[np.ndarray]) -> list[np.ndarray]:
    """Last-position logits of each step, PyTorch eager with a Concat-grown cache."""
    import torch

    past = [torch.zeros(1, KV_HEADS, 0, HEAD_DIM) for _ in range(2 * LAYERS)]
    seen, out = 0, []
    with torch.no_grad():
        for x in embeds:
            n = x.shape[1]
            logits, *past = step(torch.from_numpy(x), torch.ones(1, seen + n, dtype=torch.long),
                                 torch.arange(seen, seen + n)[None], *past)
            out.append(logits.numpy())
            seen += n
    return out


def _bound_run(session: object, embeds: list[np.ndarray], capacity: int, share: bool, poison: bool = False) -> tuple[list[np.ndarray], BoundStep, list]:
    step = BoundStep(session, LAYERS, KV_HEADS, HEAD_DIM, capacity, 64, share_buffer=share)
    if poison:  # rows past the valid length must never be read
        step._allocate(1)
        for value in step._shared.values.values():
            value.update_inplace(np.full(value.shape(), np.nan, dtype=step.kv_dtype))
    cache, out, addresses = None, [], []
    seen = 0
    for x in embeds:
        n = x.shape[1]
        logits, cache = step(x, np.ones((1, seen + n), np.int64), np.arange(seen, seen + n)[None], cache)
        out.append(logits)
        addresses.append(tuple(v.data_ptr() for v in cache.values.values()))
        seen += n
    return out, step, addresses


def _steps() -> list[np.ndarray]:
    """A 7-token prefill, four one-token steps and a 3-token step over the past."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, n, 64), dtype=np.float32) for n in (7, 1, 1, 1, 1, 3)]


def test_the_graph_carries_group_query_attention(tiny: tuple) -> None:
    import onnx

    _, path, geometry = tiny
    graph = onnx.load(str(path)).graph
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == LAYERS and {n.domain for n in nodes} == {"com.microsoft"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == KV_HEADS and attrs["do_rotary"] == 0
    assert abs(attrs["scale"] - HEAD_DIM ** -0.5) < 1e-7
    presents = {o.name for o in graph.output if o.name.startswith("present.")}
    assert not [n for n in graph.node if n.op_type == "Concat" and set(n.output) & presents]  # no Concat-grown cache
    assert geometry.kv_share_buffer


def test_shared_buffer_equals_pytorch_and_the_unshared_graph(tiny: tuple) -> None:
    import onnxruntime as ort

    step, path, _ = tiny
    embeds = _steps()
    capacity = sum(x.shape[1] for x in embeds) + 2  # slack rows that stay unwritten
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = _torch_run(step, embeds)
    unshared, plain, _ = _bound_run(session, embeds, capacity, share=False)
    shared, bound, addresses = _bound_run(session, embeds, capacity, share=True, poison=True)
    for ref, a, b in zip(reference, unshared, shared):
        assert np.abs(a - ref).max() < 1e-5 and np.abs(b - ref).max() < 1e-5
    assert np.isfinite(np.stack(shared)).all()
    # unshared: the present grows by the step's rows; shared: one capacity-long buffer, one address
    per_position = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    assert plain.cache_bytes == [per_position * n for n in (7, 8, 9, 10, 11, 14)]
    assert bound.cache_bytes == [per_position * capacity] * len(embeds)
    assert len(set(addresses)) == 1
    # the 14 written rows are finite, the 2 slack rows still the NaN they started as
    key = bound._shared.values["past_key_values.1.key"].numpy()
    assert bound._shared.length == 14
    assert np.isfinite(key[:, :, :14]).all() and np.isnan(key[:, :, 14:]).all()


def test_a_new_sequence_reuses_the_buffer_and_a_foreign_cache_is_refused(tiny: tuple) -> None:
    import onnxruntime as ort

    from vlm_export.errors import InputError

    _, path, _ = tiny
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds = _steps()
    first, step, _ = _bound_run(session, embeds[:3], 16, share=True)
    again = []
    cache, seen = None, 0  # past None: a new sequence over the same buffers (use_cache=False's loop)
    for x in embeds[:3]:
        logits, cache = step(x, np.ones((1, seen + x.shape[1]), np.int64), np.arange(seen, seen + x.shape[1])[None], cache)
        again.append(logits)
        seen += x.shape[1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and cache.length == 9
    other = _bound_run(session, embeds[:1], 16, share=True)[1]._shared
    with pytest.raises(InputError, match="shares one KV buffer per layer"):
        step(embeds[1], np.ones((1, 8), np.int64), np.array([[7]]), other)


def test_fp16_graph_shares_the_buffer_too(tiny: tuple, tmp_path: Path) -> None:
    import onnxruntime as ort

    from vlm_export.quantize import to_fp16

    step, path, _ = tiny
    fp16 = to_fp16(path, tmp_path / "lm.fp16.onnx")
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    embeds = _steps()
    reference = _torch_run(step, embeds)
    shared, _, addresses = _bound_run(session, embeds, 16, share=True, poison=True)
    unshared = _bound_run(session, embeds, 16, share=False)[0]
    for ref, a, b in zip(reference, shared, unshared):
        assert np.abs(a - b).max() < 1e-6  # the same FP16 graph either way
        assert np.abs(a - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())  # FP16 weights: close to PyTorch FP32
    assert len(set(addresses)) == 1
