"""Multiply-accumulates of an ONNX graph, counted from its tensor shapes.

Why: a latency alone does not say how far a variant runs from the machine's limit; MACs
per image divided by the time per image does (achieved GMAC/s, compared with the CPU's peak
in verify.cpu_peak; issue 18). The count comes from the graph the runtime runs, not from
the model's config, so it follows whatever the exporter and the quantizer produced.

How: the symbolic dims (batch and any other) are fixed to the sizes asked for, shapes are
inferred with onnxruntime's symbolic shape inference (it knows the com.microsoft ops that
onnxruntime's fusions and quantizer write: MultiHeadAttention, MatMulInteger,
MatMulNBits, …; onnx's own shape inference is the fallback), and each node that multiplies
matrices is counted from its input and output shapes:

- MatMul, MatMulInteger, FusedMatMul, QLinearMatMul: output elements × K (the shared dim);
- Gemm, QGemm: output elements × K;
- Conv, ConvInteger, QLinearConv, FusedConv: output elements × (C_in / group) × kernel area;
  ConvTranspose: input elements × (C_out / group) × kernel area;
- MatMulNBits: rows of A × K × N (its attributes);
- attention (com.microsoft MultiHeadAttention and Attention, ONNX Attention): Q·Kᵀ and
  attention·V, batch × queries × keys × (q width + v width), plus Attention's fused
  input projection.

Element-wise work (Add, Softmax, LayerNorm, Q/DQ) is not counted: it is memory-bound and
small beside the products. Nodes inside If/Loop/Scan subgraphs are not visited; op types
known to multiply matrices that this count does not model (Einsum, GroupQueryAttention,
those subgraphs) are listed in `skipped`, and nodes whose shapes stayed unknown in
`unresolved`, so a partial count never passes for a whole one.

Needs `onnx` and `onnxruntime`; never imports torch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

_SKIPPED_OPS = frozenset({"Einsum", "GroupQueryAttention", "If", "Loop", "Scan", "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"})


@dataclass(frozen=True)
class MacCount:
    """MACs of one graph run at `batch`, in total and per op type."""

    total: int
    batch: int
    by_op: dict[str, int] = field(default_factory=dict)
    unresolved: tuple[str, ...] = ()  # node names whose shapes inference could not give
    skipped: tuple[str, ...] = ()  # op types that multiply matrices but are not counted

    @property
    def per_image(self) -> float:
        """MACs per batch item (per image for an image tower)."""
        return self.total / max(1, self.batch)

    @property
    def complete(self) -> bool:
        """True when every node that multiplies matrices was counted."""
        return not self.unresolved and not self.skipped

    def to_json(self) -> dict[str, Any]:
        return {"per_image": self.per_image, "total": self.total, "batch": self.batch, "by_op": dict(self.by_op),
                "complete": self.complete, "unresolved": list(self.unresolved), "skipped": list(self.skipped)}


def count_macs(model: "str | Path | Any", batch: int = 1, sizes: Optional[Mapping[str, int]] = None) -> MacCount:
    """Count the MACs of `model` (a path or an onnx.ModelProto) for inputs of batch `batch`.

    `sizes` gives the other symbolic input dims (e.g. {"patches": 1024}); a symbolic dim
    with no size raises ValueError naming it. Weights are not loaded (external data stays
    on disk); only their shapes are read. Defaults to batch 1 and no other dims.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else _copy(model)
    _fix_input_dims(proto, {"batch": int(batch), **dict(sizes or {})})
    _weights_as_inputs(proto)
    shapes = _infer_shapes(proto)
    by_op: Counter[str] = Counter()
    unresolved: list[str] = []
    skipped: set[str] = set()
    for node in proto.graph.node:
        if node.op_type in _SKIPPED_OPS:
            skipped.add(node.op_type)
            continue
        rule = _RULES.get(node.op_type)
        if rule is None:
            continue
        macs = rule(node, shapes)
        if macs is None:
            unresolved.append(node.name or f"{node.op_type}:{node.output[0]}")
        else:
            by_op[node.op_type] += int(macs)
    return MacCount(total=sum(by_op.values()), batch=int(batch), by_op=dict(by_op), unresolved=tuple(unresolved),
                    skipped=tuple(sorted(skipped)))


def _copy(model: Any) -> Any:
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _fix_input_dims(proto: Any, sizes: Mapping[str, int]) -> None:
    """Replace each symbolic dim of the graph inputs by its size (in place)."""
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                continue
            if dim.dim_param not in sizes:
                raise ValueError(f"input '{value.name}' has symbolic dim '{dim.dim_param or '?'}' with no size; "
                                 f"pass it in sizes (known: {', '.join(sorted(sizes))})")
            dim.dim_value = int(sizes[dim.dim_param])


def _weights_as_inputs(proto: Any, keep: int = 1024) -> None:
    """Turn initializers of more than `keep` values into graph inputs of the same shape.

    Why: shape inference copies the model and reads only small constants (shapes, axes);
    without the weights' bytes DINOv2-small's 88 MB graph is counted in a fraction of the time.
    """
    from onnx import helper

    kept, listed = [], {value.name for value in proto.graph.input}
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) > keep:
            if tensor.name not in listed:  # IR < 4 graphs also list initializers as inputs
                proto.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    if len(kept) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)


def _infer_shapes(proto: Any) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor the inference could resolve (initializers included)."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # an op the symbolic inference does not know: onnx's own, partial
        inferred = None
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(int(d) for d in t.dims) for t in inferred.graph.initializer}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for node in graph.node:  # Constant nodes carry their tensors' dims
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _shape(node: Any, shapes: Mapping[str, tuple[int, ...]], index: int, outputs: bool = False) -> Optional[tuple[int, ...]]:
    names = node.output if outputs else node.input
    if index >= len(names) or not names[index]:
        return None
    return shapes.get(names[index])


def _matmul(a_index: int) -> Callable[[Any, Mapping[str, tuple[int, ...]]], Optional[int]]:
    """Output elements × K, K being A's last dim (second to last when FusedMatMul transposes A)."""

    def rule(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
        a, out = _shape(node, shapes, a_index), _shape(node, shapes, 0, outputs=True)
        if a is None or out is None:
            return None
        k = a[-2] if _attr(node, "transA", 0) and len(a) >= 2 else a[-1]
        return math.prod(out) * int(k)

    return rule


def _gemm(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    a, out = _shape(node, shapes, 0), _shape(node, shapes, 0, outputs=True)
    if a is None or out is None:
        return None
    return math.prod(out) * int(a[0] if _attr(node, "transA", 0) else a[1])


def _conv(w_index: int) -> Callable[[Any, Mapping[str, tuple[int, ...]]], Optional[int]]:
    """Output elements × (C_in / group) × kernel area: W is [C_out, C_in / group, *kernel]."""

    def rule(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
        w, out = _shape(node, shapes, w_index), _shape(node, shapes, 0, outputs=True)
        if w is None or out is None:
            return None
        return math.prod(out) * math.prod(w[1:])

    return rule


def _conv_transpose(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    """Input elements × (C_out / group) × kernel area: W is [C_in, C_out / group, *kernel]."""
    x, w = _shape(node, shapes, 0), _shape(node, shapes, 1)
    if x is None or w is None:
        return None
    return math.prod(x) * math.prod(w[1:])


def _matmul_nbits(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    a = _shape(node, shapes, 0)
    if a is None:
        return None
    return math.prod(a[:-1]) * int(_attr(node, "K")) * int(_attr(node, "N"))


def _multi_head_attention(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    """com.microsoft MultiHeadAttention: query [B,S,Dq] with key [B,L,Dq] or [B,N,L,H],
    or packed query [B,S,N,3,H] (no key); output [B,S,Dv]."""
    q, k, out = _shape(node, shapes, 0), _shape(node, shapes, 1), _shape(node, shapes, 0, outputs=True)
    if q is None or out is None:
        return None
    if len(q) == 5:
        width_q, keys = q[2] * q[4], q[1]
    elif k is None:
        return None
    else:
        width_q, keys = q[-1], (k[1] if len(k) == 3 else k[2])
    past = _shape(node, shapes, 6)  # past_key [B,N,P,H] adds P keys
    if past is not None and len(past) == 4:
        keys += past[2]
    return int(out[0] * out[1] * keys * (width_q + out[-1]))


def _contrib_attention(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    """com.microsoft Attention: the fused Q/K/V projection of input [B,S,E] by weights [E, Dq+Dk+Dv],
    then Q·Kᵀ and attention·V over the S tokens (no past)."""
    x, w = _shape(node, shapes, 0), _shape(node, shapes, 1)
    if x is None or w is None:
        return None
    sizes = _attr(node, "qkv_hidden_sizes") or [w[1] // 3] * 3
    batch, seq = x[0], x[1]
    return int(batch * seq * x[2] * w[1] + batch * seq * seq * (sizes[0] + sizes[2]))


def _onnx_attention(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> Optional[int]:
    """ONNX Attention (opset 23): 4-D Q [B,Nq,S,Hq], K [B,Nkv,L,Hq], V [B,Nkv,L,Hv], or 3-D
    [B,S,Nq·Hq] etc. with q_num_heads/kv_num_heads."""
    q, k, v = (_shape(node, shapes, i) for i in range(3))
    if q is None or k is None or v is None:
        return None
    if len(q) == 4:
        return int(q[0] * q[1] * q[2] * k[2] * (q[3] + v[3]))
    heads_q, heads_kv = int(_attr(node, "q_num_heads", 1)), int(_attr(node, "kv_num_heads", 1))
    return int(q[0] * q[1] * k[1] * (q[2] + heads_q * v[2] // max(1, heads_kv)))


_RULES: dict[str, Callable[[Any, Mapping[str, tuple[int, ...]]], Optional[int]]] = {
    "MatMul": _matmul(0),
    "MatMulInteger": _matmul(0),
    "FusedMatMul": _matmul(0),
    "QLinearMatMul": _matmul(0),
    "Gemm": _gemm,
    "QGemm": _gemm,
    "Conv": _conv(1),
    "ConvInteger": _conv(1),
    "FusedConv": _conv(1),
    "QLinearConv": _conv(3),
    "ConvTranspose": _conv_transpose,
    "MatMulNBits": _matmul_nbits,
    "MultiHeadAttention": _multi_head_attention,
    "Attention": lambda node, shapes: (_contrib_attention if node.domain == "com.microsoft" else _onnx_attention)(node, shapes),
}


def vit_macs(hidden: int, layers: int, intermediate: int, patch: int, image_hw: tuple[int, int], channels: int = 3,
             cls_tokens: int = 1, head_outputs: int = 0) -> int:
    """MACs per image of a ViT encoder from its config, the count a ViT graph should give.

    Patch embedding (a conv with stride = kernel = patch), per layer the Q/K/V and output
    projections (4·T·D²), attention (2·T²·D) and the MLP (2·T·D·I), and an optional linear
    head on one token (D × head_outputs). T = cls_tokens + patches. Why here: the check that
    the graph count is right on a real architecture, and a figure for a model not exported yet.
    """
    patches = (image_hw[0] // patch) * (image_hw[1] // patch)
    tokens = cls_tokens + patches
    embed = patches * hidden * channels * patch * patch
    per_layer = 4 * tokens * hidden * hidden + 2 * tokens * tokens * hidden + 2 * tokens * hidden * intermediate
    return embed + layers * per_layer + hidden * head_outputs
