"""BLIP's three export wrappers: `vision_encoder`, `cross_kv` and the `text_decoder` step.

Why one decoder graph, not optimum's pair or its `use_cache_branch` merge: optimum's
first-step graph differs from its with-past graph because it computes cross-attention
keys/values from the encoder output, and it merges the two behind an ONNX `If` only to
avoid storing the weights twice. With cross keys/values in their own graph both steps
take the same inputs; the first step feeds a past of length 0 (`past_sequence` = 0: a
Concat with an empty tensor, valid in ONNX and onnxruntime). So: one copy of the
weights (the pair stores two), no `If` subgraphs for ORT's quantizer, the FP16
converter or TensorRT to handle, and the build's export check runs the graph at batch 1
with an empty past against PyTorch (see `decoder_shape`).

The decoder wrapper calls the model's own Linear/LayerNorm/embedding modules and spells
out only the attention core and the cache concatenation, so the traced graph takes the
cache as plain tensors; the family's end-to-end check compares it with `model.generate`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

from vlm_export.runtime.blip import cross_names, past_names

# Decoder (sequence, past_sequence) per check batch: the export runs at batch 2; the ORT
# checks at batch 1 (a prompt step with an empty past) and 3 (one token after a past).
_DECODER_SHAPES = {1: (2, 0), 2: (3, 5), 3: (1, 7)}


def decoder_shape(batch: int) -> tuple[int, int]:
    return _DECODER_SHAPES.get(batch, (2, batch + 1))


def _positional(cls: type, names: Sequence[str]) -> type:
    """A subclass of `cls` whose forward declares one parameter per graph input.

    Why: torch.export binds dynamic shapes to forward's signature, and a `*cache`
    parameter would be one structured argument; the layer count is known only at load.
    """
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(self: Any, *args: Any) -> Any:
        return cls.forward(self, *args)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward})


def _split_heads(x: Any, heads: int, head_dim: int) -> Any:
    """(batch, tokens, heads * head_dim) → (batch, heads, tokens, head_dim)."""
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def _attend(q: Any, k: Any, v: Any, mask: Any | None) -> Any:
    """Eager attention as BlipTextSelfAttention computes it; (b, h, n, d) → (b, n, h * d)."""
    import torch

    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    return ctx.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _vision_encoder(model: Any) -> Any:
    import torch

    class VisionEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = model.vision_model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
            return (self.vision(pixel_values=pixel_values).last_hidden_state,)

    return VisionEncoder().eval()


def _cross_kv(model: Any) -> Any:
    """Only the cross-attention key/value projections of each layer, nothing else."""
    import torch

    attns = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]
    heads, head_dim = attns[0].num_attention_heads, attns[0].attention_head_size

    class CrossKV(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projections = torch.nn.ModuleList(p for a in attns for p in (a.key, a.value))

        def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(_split_heads(p(image_embeds), heads, head_dim) for p in self.projections)

    return CrossKV().eval()


def _decoder_step(model: Any) -> Any:
    """One decoder step over an explicit cache (possibly of length 0); last-position logits."""
    import torch

    text = model.text_decoder
    count, heads = len(text.bert.encoder.layer), int(text.config.num_attention_heads)

    class TextDecoderStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = text

        def forward(self, input_ids: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
            past, cross = cache[: 2 * count], cache[2 * count:]
            emb = self.text.bert.embeddings
            new, seen = input_ids.shape[1], past[0].shape[2]
            positions = torch.arange(new, device=input_ids.device) + seen
            hidden = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])
            columns = torch.arange(seen + new, device=input_ids.device)[None, :]
            mask = torch.where(columns > positions[:, None], torch.finfo(hidden.dtype).min, 0.0).to(hidden.dtype)
            presents = []
            for i, layer in enumerate(self.text.bert.encoder.layer):
                attn, xattn = layer.attention.self, layer.crossattention.self
                d = attn.attention_head_size
                key = torch.cat([past[2 * i], _split_heads(attn.key(hidden), heads, d)], dim=2)
                value = torch.cat([past[2 * i + 1], _split_heads(attn.value(hidden), heads, d)], dim=2)
                presents += [key, value]
                query = _split_heads(attn.query(hidden), heads, d)
                h1 = layer.attention.output(_attend(query, key, value, mask), hidden)
                query = _split_heads(xattn.query(h1), heads, d)
                h2 = layer.crossattention.output(_attend(query, cross[2 * i], cross[2 * i + 1], None), h1)
                hidden = layer.output(layer.intermediate(h2), h2)
            return (self.text.cls(hidden[:, -1]), *presents)

    step_cls = _positional(TextDecoderStep, ["input_ids", *past_names(count), *cross_names(count)])
    return step_cls().eval()


def export_modules(model: Any) -> dict[str, Any]:
    """The three export wrappers over the loaded model's own submodules."""
    return {"vision_encoder": _vision_encoder(model), "cross_kv": _cross_kv(model), "text_decoder": _decoder_step(model)}
