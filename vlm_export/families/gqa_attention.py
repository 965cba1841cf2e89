"""The attention core of the `language_model` graph: onnxruntime's GroupQueryAttention at export.

Why GroupQueryAttention (com.microsoft, onnxruntime ≥ 1.18 CPU in FP32 and FP16): with a
Concat, every decode step writes a present of past + 1 rows per layer (at 2048 positions
on a 2-layer LLaVA-7B-shaped model, 11% of the step; 2 GiB per step for a 32-layer 7B in
FP32). GroupQueryAttention writes the new rows into `present` in place when `past` and
`present` are the same buffer (the caller binds one max-length OrtValue to both, as
onnxruntime-genai does with `past_present_share_buffer`), and behaves as the Concat did
when they are not (present = past + new): the graph has one meaning for both callers.
Measured with onnxruntime 1.32 on CPU (tests/test_kv_share.py): shared and unshared
outputs equal a numpy reference in FP32 and FP16, with and without a padding bias.

What it is fed:
- q, k, v after the model's own rotary embedding (`do_rotary=0`): Llama's RoPE and
  Qwen2-VL's M-RoPE both stay the model's code, not the kernel's 1-D rotary.
- `seqlens_k` = total − 1 and `total_sequence_length` = total, from `attention_mask`'s
  width: every row holds the same number of positions (our loop's convention), so the
  mask's zeros are padding, not shorter rows; they go in as `attention_bias` (0 or the
  dtype's minimum per column, HF's eager mask), and the kernel applies the causal part.
- `query_seqlens` = the step's length per row: onnxruntime needs it for a multi-token
  step over a past at batch > 1 (the export traces one).
- `kv_num_heads` the model's key/value heads (GQA models share keys across query heads
  inside the kernel: no repeat_interleave in the graph), `scale` the model's `scaling`.

Limits (not measured here, no GPU): onnxruntime's CUDA kernel of this op is registered
for FP16/BF16 only, so under the CUDA provider the FP32 graph runs these nodes on the CPU
with copies around them; the FP16 variant keeps FP32 cache I/O (quantize/fp16.py
`keep_io_types`), so its Casts copy the whole buffer per step and the in-place write is
lost there. TensorRT's ONNX parser has no com.microsoft ops: an LM engine plan needs the
Concat graph (`decoder_step(..., contrib_attention=False)`).

In PyTorch (the build's reference, its sample states) the module computes what HF's eager
attention computes, with a Concat: only the exported graph carries the contrib op.
"""

from __future__ import annotations

from typing import Any

DOMAIN_OP = "com.microsoft::GroupQueryAttention"


def padding_bias(attention_mask: Any, new: int, dtype: Any) -> Any:
    """(batch, 1, new, total): 0 where the mask keeps a column, the dtype's minimum where it
    is padding. Expanded to `new` rows: onnxruntime refuses a broadcast query axis."""
    import torch

    keep = attention_mask[:, None, None, :] > 0
    bias = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    return bias.expand(attention_mask.shape[0], 1, new, attention_mask.shape[1])


def causal_mask(attention_mask: Any, new: int, seen: Any, dtype: Any) -> Any:
    """HF's eager additive mask (batch, 1, new, total): causal and padding together."""
    import torch

    query_pos = torch.arange(new, device=attention_mask.device) + seen
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    allowed = (columns[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def eager(q: Any, k: Any, v: Any, past_key: Any, past_value: Any, mask: Any, scaling: float,
          groups: int) -> tuple[Any, Any, Any]:
    """HF's eager attention with the cache appended: (context (b, n, h·d), present k, present v)."""
    import torch

    key = torch.cat([past_key, k], dim=2)
    value = torch.cat([past_value, v], dim=2)
    kr, vr = (key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)) if groups > 1 else (key, value)
    scores = torch.matmul(q, kr.transpose(2, 3)) * scaling + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    ctx = torch.matmul(probs, vr).transpose(1, 2)
    return ctx.reshape(q.shape[0], q.shape[2], -1), key, value


def group_query_attention(q: Any, k: Any, v: Any, past_key: Any, past_value: Any, attention_mask: Any, bias: Any,
                          scaling: float, num_heads: int, kv_heads: int) -> tuple[Any, Any, Any]:
    """The contrib op as a symbolic node (export only): q (b, n, s, d), k/v (b, kv, s, d) rotated;
    returns (context (b, s, n·d), present key, present value)."""
    import torch

    batch, new, head_dim = q.shape[0], q.shape[2], q.shape[3]
    total = attention_mask.shape[1]
    query = q.transpose(1, 2).reshape(batch, new, num_heads * head_dim)
    key = k.transpose(1, 2).reshape(batch, new, kv_heads * head_dim)
    value = v.transpose(1, 2).reshape(batch, new, kv_heads * head_dim)
    row = torch.ones(batch, dtype=torch.int32, device=q.device)
    seqlens_k = row * (total - 1)
    total_length = (row[0] * total).reshape(())
    query_seqlens = row * new
    present_shape = [batch, kv_heads, past_key.shape[2] + new, head_dim]
    ctx, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        DOMAIN_OP,
        [query, key, value, past_key, past_value, seqlens_k, total_length, None, None, None, bias, None, None, None,
         None, None, query_seqlens],
        {"num_heads": num_heads, "kv_num_heads": kv_heads, "scale": float(scaling), "do_rotary": 0},
        dtypes=[q.dtype, past_key.dtype, past_value.dtype],
        shapes=[[batch, new, num_heads * head_dim], present_shape, present_shape],
        version=1,
    )
    return ctx, present_key, present_value
