"""The `language_model` export wrapper for decoder-only LMs (Llama, Mistral, Qwen2, Qwen2-VL's).

Why one graph for prefill and decode (as BLIP's decoder, blip_decoder.py): the first step
feeds a past of length 0 (or, with a shared buffer, the buffer: the first-prompt path
reads none of it), so one copy of the weights serves the whole loop and the
quantizers never meet an `If` subgraph. The I/O names follow optimum and onnxruntime-genai:
`inputs_embeds`, `attention_mask` (batch, past + new), `position_ids`,
`past_key_values.N.key/value` in; `logits` and `present.N.key/value` out.

Why `logits` of the last position only: generation reads nothing else, and the full
(prompt × vocabulary) logits of a 600-token LLaVA prompt at a 32 000-word vocabulary are
77 MB per prefill for nothing.

The wrapper calls the model's own modules (projections, RMSNorm, MLP, rotary embedding,
its `apply_rotary_pos_emb`) and spells out only the attention core: in the exported graph
onnxruntime's GroupQueryAttention, whose past and present may share one max-length buffer
so that no copy grows per decode step (families/gqa_attention.py says why and how); in
PyTorch HF's eager attention with a Concat, the reference. The family's end-to-end check
compares the runtime's greedy tokens with `model.generate`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from vlm_export.families.blip_decoder import _positional
from vlm_export.families.gqa_attention import causal_mask, eager, group_query_attention, padding_bias

# (sequence, past_sequence) per check batch: the export traces batch 2; the ORT checks run
# batch 1 (a prompt with an empty past) and batch 3 (one token after a past).
_SHAPES = {1: (5, 0), 2: (3, 4), 3: (1, 6)}


def step_shape(batch: int) -> tuple[int, int]:
    """(new tokens, past length) of the example feed at `batch`."""
    return _SHAPES.get(batch, (2, batch + 1))


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class LmGeometry:
    """What the runtime and the specs need to know about the language model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    mrope: bool = False  # Qwen2-VL: position_ids (batch, 3, sequence), transposed to HF's (3, batch, sequence) inside
    # the graph's attention is GroupQueryAttention (families.gqa_attention): a caller may bind
    # one capacity-long buffer as both past and present (onnxruntime-genai's past_present_share_buffer)
    kv_share_buffer: bool = True

    @classmethod
    def from_text_config(cls, text: Any, mrope: bool = False) -> "LmGeometry":
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        return cls(int(text.num_hidden_layers), heads, int(getattr(text, "num_key_value_heads", None) or heads),
                   int(head_dim), int(text.hidden_size), int(text.vocab_size), int(text.max_position_embeddings), mrope)


def _rotary_apply(attention: Any, text_config: Any) -> Callable[[Any, Any, Any, Any], tuple[Any, Any]]:
    """The model's own `apply_rotary_pos_emb` (or Qwen2-VL's multimodal one)."""
    module = sys.modules[type(attention).__module__]
    multimodal = getattr(module, "apply_multimodal_rotary_pos_emb", None)
    section = (getattr(text_config, "rope_scaling", None) or {}).get("mrope_section") or \
        (getattr(text_config, "rope_parameters", None) or {}).get("mrope_section")
    if multimodal is not None and section:
        return lambda q, k, cos, sin: multimodal(q, k, cos, sin, section)
    return module.apply_rotary_pos_emb


def decoder_step(language_model: Any, lm_head: Any, geometry: LmGeometry, contrib_attention: bool = True) -> Any:
    """A torch module: (inputs_embeds, attention_mask, position_ids, *past) → (logits, *present).

    `contrib_attention=False` exports the attention as plain ONNX ops with a Concat-grown
    present (the graph before GroupQueryAttention; benchmarks compare the two), and its
    geometry must then say `kv_share_buffer=False`."""
    import torch

    layers = list(language_model.layers)
    apply_rotary = _rotary_apply(layers[0].self_attn, language_model.config)
    g = geometry
    groups = g.num_heads // g.num_kv_heads

    class LanguageModelStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = language_model
            self.head = lm_head

        def forward(self, inputs_embeds: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            hidden = inputs_embeds
            batch, new = hidden.shape[0], hidden.shape[1]
            seen = past[0].shape[2]
            if g.mrope:  # (batch, 3, sequence) in the graph: the sample axis first, as every input here
                position_ids = position_ids.transpose(0, 1)
            cos, sin = self.lm.rotary_emb(hidden, position_ids)
            # the graph gets the contrib op, PyTorch the eager reference
            exporting = contrib_attention and torch.onnx.is_in_onnx_export()
            if exporting:
                bias = padding_bias(attention_mask, new, hidden.dtype)
            else:
                mask = causal_mask(attention_mask, new, seen, hidden.dtype)
            presents = []
            for i, layer in enumerate(self.lm.layers):
                attn = layer.self_attn
                normed = layer.input_layernorm(hidden)
                q = attn.q_proj(normed).view(batch, new, g.num_heads, g.head_dim).transpose(1, 2)
                k = attn.k_proj(normed).view(batch, new, g.num_kv_heads, g.head_dim).transpose(1, 2)
                v = attn.v_proj(normed).view(batch, new, g.num_kv_heads, g.head_dim).transpose(1, 2)
                q, k = apply_rotary(q, k, cos, sin)
                if exporting:
                    ctx, k, v = group_query_attention(q, k, v, past[2 * i], past[2 * i + 1], attention_mask, bias,
                                                      attn.scaling, g.num_heads, g.num_kv_heads)
                else:
                    ctx, k, v = eager(q, k, v, past[2 * i], past[2 * i + 1], mask, attn.scaling, groups)
                presents += [k, v]
                hidden = hidden + attn.o_proj(ctx)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            # (batch, 1, hidden) keeps the head a MatMul (a 2-D input exports as Gemm, which the
            # block-wise quantizer skips: the head is 40% of a 2-layer 7B-shape graph's weights)
            logits = self.head(self.lm.norm(hidden[:, -1:]))[:, 0]
            return (logits.float(), *presents)

    names = ["inputs_embeds", "attention_mask", "position_ids", *past_names(g.num_layers)]
    return _positional(LanguageModelStep, names)().eval()
