"""The manifest schema (vlm_export.bundle.schema): one owner for the format.

A real bundle's manifest parses and writes back byte for byte (also without the fields
this version added, as older bundles have them); the TensorRT EP plans the build records
are exactly the planner's; every malformed new field is one line naming the manifest.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vlm_export.bundle.schema import BATCH, AxisKind, DimRange, DimSpec, Manifest
from vlm_export.engines import TARGETS, get_target, plan
from vlm_export.engines.plan import symbol_sizes
from vlm_export.errors import BundleError


def _text(bundle: Path) -> str:
    return (bundle / "manifest.json").read_text(encoding="utf-8")


def test_real_manifest_round_trips_byte_for_byte(vit_bundle: Path) -> None:
    text = _text(vit_bundle)
    assert Manifest.from_json(json.loads(text)).dumps() == text
    older = json.loads(text)  # as a bundle built before dims and EP plans were recorded
    for component in older["components"].values():
        del component["dims"]
        for variant in component["variants"].values():
            variant.pop("tensorrt_ep", None)
    older_text = json.dumps(older, indent=2) + "\n"
    assert Manifest.from_json(older).dumps() == older_text


def test_build_records_dims_and_every_targets_ep_plan(vit_bundle: Path) -> None:
    manifest = Manifest.from_json(json.loads(_text(vit_bundle)))
    vision = manifest.components["vision"]
    assert vision.dims == {"batch": BATCH}
    assert {k for k, v in vision.variants.items() if v.tensorrt_ep} == {"fp32", "fp16", "int8"}  # not int8-cpu
    for target in TARGETS.values():
        for p in plan(manifest, target):
            assert vision.variants[p.variant].tensorrt_ep[target.name] == p.ep_record()
    nano = vision.variants["fp16"].tensorrt_ep["jetson-orin-nano"]
    assert (nano.workspace_mib, nano.min_shapes, nano.max_shapes) == (1024, "pixel_values:1x3x32x32", "pixel_values:4x3x32x32")


@pytest.mark.parametrize(("where", "value", "message"), [
    ("dims", {"batch": {"kind": "frames"}}, "component 'vision' dim 'batch' that is not {kind: batch|patches|sequence"),
    ("dims", {"sequence": {"kind": "sequence", "min": 5, "opt": 2, "max": 9}}, "component 'vision' dim 'sequence' that is not"),
    ("dims", [], "component 'vision' 'dims' that is not an object"),
    ("tensorrt_ep", {"desktop-ada": {"workspace_mib": 0}}, "variant 'vision/fp16' TensorRT EP plan 'desktop-ada' that is malformed"),
    ("tensorrt_ep", {"desktop-ada": {"workspace_mib": 64, "min_shapes": 3}}, "TensorRT EP plan 'desktop-ada' that is malformed"),
    ("engines", {"x": {"path": "e.plan", "profile": [{"name": "p", "min": [1], "max": [1, 2]}]}}, "engine 'x' with a malformed profile"),
    ("fp32_fallback", 3, "component 'vision' 'fp32_fallback' that is not a list of strings"),
])
def test_malformed_new_fields_are_one_line(vit_bundle: Path, where: str, value: object, message: str) -> None:
    data = json.loads(_text(vit_bundle))
    target = data["components"]["vision"]
    (target if where in ("dims", "fp32_fallback") else target["variants"]["fp16"])[where] = value
    with pytest.raises(BundleError) as info:
        Manifest.from_json(copy.deepcopy(data), "OUT/manifest.json")
    assert str(info.value).startswith("'OUT/manifest.json' has ") and message in str(info.value)
    assert str(info.value).endswith("; rebuild the bundle") and "\n" not in str(info.value)


def test_format_version_is_checked_in_the_schema(vit_bundle: Path) -> None:
    data = json.loads(_text(vit_bundle))
    with pytest.raises(BundleError, match=r"^'m.json' is format 2, newer than this runtime understands \(1\); upgrade vlm-export$"):
        Manifest.from_json({**data, "format_version": 2}, "m.json")
    with pytest.raises(BundleError, match=r"^'m.json' has no valid format_version; rebuild the bundle$"):
        Manifest.from_json({**data, "format_version": True}, "m.json")


def test_components_must_declare_their_symbolic_dims() -> None:
    from vlm_export.families.base import ComponentSpec, TensorSpec

    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")),)
    with pytest.raises(ValueError, match="^component 'text' inputs use dimension\\(s\\) sequence that its dims do not declare$"):
        ComponentSpec("text", None, inputs, (), lambda b: {}, "x")  # type: ignore[arg-type]
    sequence = DimSpec(AxisKind.SEQUENCE, DimRange(1, 8, 16))
    spec = ComponentSpec("text", None, inputs, (), lambda b: {}, "x", dims={"batch": BATCH, "sequence": sequence})  # type: ignore[arg-type]
    assert spec.dims["sequence"].to_json() == {"kind": "sequence", "min": 1, "opt": 8, "max": 16}
    with pytest.raises(ValueError, match="0 <= min <= opt <= max"):
        DimRange(4, 2, 8)


def test_benchmark_sizes_come_from_the_declared_dims(vit_bundle: Path) -> None:
    vision = Manifest.from_json(json.loads(_text(vit_bundle))).components["vision"]
    assert symbol_sizes(vision) == {}  # batch: the caller's --batch
    assert symbol_sizes(vision, get_target("desktop-ada")) == {"batch": get_target("desktop-ada").batch.opt}
