"""The language model's GroupQueryAttention graph is never offered to TensorRT.

TensorRT's ONNX parser has no com.microsoft ops, so a manifest that listed "tensorrt"
for the language model would plan engines that cannot build.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from _combo_bundle import llava_int8_int4_bundle
from vlm_export.engines.plan import plan
from vlm_export.engines.targets import get_target
from vlm_export.bundle.schema import Manifest


def read_manifest(bundle: Path) -> Manifest:
    return Manifest.from_json(json.loads((bundle / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    return llava_int8_int4_bundle(tmp_path_factory, photo_dir)


def test_language_model_variants_list_only_onnxruntime_providers(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    lm = manifest.components["language_model"]
    graph = onnx.load(str(bundle / lm.variants["fp32"].onnx), load_external_data=False)
    assert any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in graph.graph.node)
    assert {key: set(v.providers) for key, v in lm.variants.items()} == {
        "fp32": {"cpu", "cuda"}, "int4": {"cpu", "cuda"}, "int4-cpu": {"cpu"}, "int4-b128": {"cpu", "cuda"}, "int8-wo": {"cpu", "cuda"}}
    # the vision tower keeps its TensorRT variants
    assert "tensorrt" in manifest.components["vision_projector"].variants["int8"].providers


def test_engine_plan_covers_the_vision_tower_only(bundle: Path) -> None:
    plans = plan(read_manifest(bundle), get_target("desktop-ada"))
    assert {(p.component, p.variant) for p in plans} == {("vision_projector", "fp32"), ("vision_projector", "int8")}
