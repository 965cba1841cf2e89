"""Export patches of the ViT family for the CPU (issue 18): DINOv2's position-embedding
resize folded (no `Resize` left in the graph, outputs unchanged, other sizes still
interpolate), and GELU written in the order onnxruntime fuses into BiasGelu."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def resized_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Dinov2Model whose 14×14 position grid (image_size 196) must be resized to the
    4×4 grid of its 56-px crops, as DINOv2-small's 37×37 is resized to 16×16. The grid holds
    more than the 8192 values the exporter's own constant folding takes (onnxscript's
    input size limit), so the unfolded export keeps its `Resize`, as DINOv2-small's does."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dinov2-resized")
    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=196, patch_size=14)
    model = Dinov2Model(config)
    with torch.no_grad():  # trained-looking (non-zero, varied) position embeddings
        model.embeddings.position_embeddings.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3).save_pretrained(folder)
    return folder


def _ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_folded_graph_has_no_resize_and_equal_outputs(resized_dinov2_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from vlm_export.export import export_component, torch_outputs
    from vlm_export.families import detect
    from vlm_export.families.vit import _no_attention_mask

    family = detect(resized_dinov2_dir)
    spec = family.components(family.load(resized_dinov2_dir))[0]
    unfolded_spec = dataclasses.replace(spec, patcher=_no_attention_mask("dinov2"))
    folded = export_component(spec, tmp_path / "folded.onnx")
    unfolded = export_component(unfolded_spec, tmp_path / "unfolded.onnx")
    assert "Resize" in _ops(unfolded)
    assert "Resize" not in _ops(folded)

    feed = spec.example_inputs(3)
    reference = torch_outputs(spec, feed)
    outs = {}
    for name, path in (("folded", folded), ("unfolded", unfolded)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[name] = session.run(None, feed)
    for got_folded, got_unfolded, ref in zip(outs["folded"], outs["unfolded"], [reference[t.name] for t in spec.outputs]):
        assert np.abs(got_folded - got_unfolded).max() < 1e-5
        assert np.abs(got_folded - np.asarray(ref)).max() < 1e-5

    # The patch is active only while exporting, and other sizes still interpolate.
    embeddings = spec.module.model.embeddings
    with spec.patcher():
        other = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 9, 48), 42, 42)
    assert other.shape == (1, 10, 48)
    assert torch.equal(other, embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 9, 48), 42, 42))


def test_gelu_is_fused_by_onnxruntime(resized_dinov2_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from vlm_export.export import export_component, torch_outputs
    from vlm_export.families import detect
    from vlm_export.families.vit import _no_attention_mask

    family = detect(resized_dinov2_dir)
    spec = family.components(family.load(resized_dinov2_dir))[0]
    fused, plain = {}, {}
    for name, patched in (("fused", spec), ("plain", dataclasses.replace(spec, patcher=_no_attention_mask("dinov2")))):
        path = export_component(patched, tmp_path / f"{name}.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (fused if name == "fused" else plain)["ops"] = _ops(tmp_path / f"{name}.opt.onnx")
        (fused if name == "fused" else plain)["out"] = session.run(None, spec.example_inputs(2))
    assert "BiasGelu" in fused["ops"] and "Erf" not in fused["ops"]
    from vlm_export.quantize.cpu_fusions import fuse_for_cpu  # the int8-cpu recipe's own GELU rule matches too

    assert fuse_for_cpu(tmp_path / "fused.onnx", tmp_path / "fused.cpu.onnx")["gelu"] == 2  # one per layer
    assert "Erf" in plain["ops"] and "BiasGelu" not in plain["ops"]  # what the exporter's own order gave
    reference = torch_outputs(spec, spec.example_inputs(2))
    for got, want in zip(fused["out"], [reference[t.name] for t in spec.outputs]):
        assert np.abs(got - want).max() < 1e-5
