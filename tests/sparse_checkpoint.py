"""A LLaVA-1.5-7B checkpoint whose language model is a sparse file: declared, never written.

Why: proving that an export reads only the vision tower and projector needs a checkpoint
whose other tensors could not be read on this machine at all. The language model's
shard here has a real safetensors header naming every Llama-7B tensor in FP32 (27 GB),
and the file is then `truncate`d to the size the header declares: the file system stores
a hole, so it takes no disk and no time, and reading any of it would pull 27 GB of zeros
through memory. The vision tower + projector live in a real shard (random FP16 weights),
the way llava-hf/llava-1.5-7b-hf stores them (legacy key names, sharded with an index).

Shared by tests/test_component_weights.py (reduced vision depth) and
benchmarks/bench_sparse_llava.py (the full 24-layer CLIP-L/14-336 tower).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

VISION_SHARD = "model-00001-of-00002.safetensors"
LM_SHARD = "model-00002-of-00002.safetensors"
# Bytes per element of the dtypes written here, by safetensors' dtype name.
_BYTES = {"F32": 4, "F16": 2}


def llava_7b_config(vision_layers: int = 24) -> Any:
    """LLaVA-1.5-7B's config (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336, 2-layer GELU
    projector to 4096, Llama-2-7B text model; `vision_layers` < 24 gives a shallower tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                       projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=576, tie_word_embeddings=False)


def file_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, under the names a saved LLaVA file uses, with its shape.

    The model is built on `meta` (no memory); transformers' own reverse renaming gives
    the file's names (`language_model.model.layers.0…`), and the tower's keys take the
    hub's `vision_tower.vision_model.` prefix, which transformers 5 maps back on load.
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    shapes = revert_weight_conversion(model, model.state_dict())
    return {_hub_name(key): tuple(t.shape) for key, t in shapes.items()}


def _hub_name(key: str) -> str:
    """llava-hf/llava-1.5-7b-hf's own name: its CLIP tower keys keep `vision_model.`."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def write_sparse_header_shard(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> int:
    """A safetensors file declaring `shapes` in `dtype` whose data is a hole; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        size = _BYTES[dtype]
        for dim in shapes[key]:
            size *= dim
        header[key] = {"dtype": dtype, "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)  # the data: a hole the file system does not store
    return 8 + len(raw) + offset


def save_sparse_llava(folder: Path, vision_layers: int = 24, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint into `folder`; returns the facts a test asserts against.

    `vision_params`: parameters of the vision tower + projector (what is exported);
    `lm_bytes`: the sparse shard's declared size; `vision_file`, `lm_file`: the shards.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil

    config = llava_7b_config(vision_layers)
    shapes = file_tensors(config)
    vision_keys = sorted(k for k in shapes if k.startswith(("vision_tower.", "multi_modal_projector.")))
    lm_shapes = {k: v for k, v in shapes.items() if not k.startswith(("vision_tower.", "multi_modal_projector."))}
    generator = torch.Generator().manual_seed(seed)
    vision = {}
    for key in vision_keys:
        tensor = torch.randn(shapes[key], generator=generator, dtype=torch.float32) * 0.02
        is_norm_scale = "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight")  # LayerNorm scales near 1
        vision[key] = (tensor + 1.0 if is_norm_scale else tensor).half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vision, str(folder / VISION_SHARD), metadata={"format": "pt"})
    vision_params = sum(t.numel() for t in vision.values())
    del vision
    lm_bytes = write_sparse_header_shard(folder / LM_SHARD, lm_shapes)
    weight_map = {**{k: VISION_SHARD for k in vision_keys}, **{k: LM_SHARD for k in lm_shapes}}
    lm_data = 4 * sum(math.prod(shape) for shape in lm_shapes.values())
    index = {"metadata": {"total_size": vision_params * 2 + lm_data}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    config.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)
    return {"vision_params": vision_params, "lm_bytes": lm_bytes,
            "vision_file": folder / VISION_SHARD, "lm_file": folder / LM_SHARD}


# The child reports its own high-water mark (VmHWM of the mm exec made), written at exit.
# Not the parent's wait4 rusage: Linux carries the spawning process's RSS high-water mark
# over exec into the child's ru_maxrss, so it would count pytest's own memory too.
_BUILD_REPORTING_PEAK = """
import atexit, sys
def _peak(report=sys.argv[1]):
    with open('/proc/self/status') as status, open(report, 'w') as sink:
        sink.write(next(line.split()[1] for line in status if line.startswith('VmHWM:')))
atexit.register(_peak)
sys.argv = ['vlm-export', *sys.argv[2:]]
from vlm_export.cli import app
app()
"""


def build_peak_rss(model: Path, out: Path, photos: Path, log: Path, precision: str = "fp32") -> tuple[int, int]:
    """`vlm-export build MODEL -o OUT --precision P` in its own process: (exit code, peak RSS bytes)."""
    peak = log.with_suffix(".vmhwm")
    argv = [sys.executable, "-c", _BUILD_REPORTING_PEAK, str(peak), "build", str(model), "-o", str(out),
            "--precision", precision, "--parity-images", str(photos), "--latency-runs", "1"]
    with open(log, "wb") as sink:
        code = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT).returncode
    return code, int(peak.read_text()) * 1024  # /proc reports kB
