"""While one component is built, the other components' PyTorch weights wait on disk.

Why: CLIP's text tower (0.5 GB at ViT-L/14-336) sat beside the vision tower's parity, the
stage of that build's peak. A component that shares weights with the one being built
(BLIP's cross-attention K/V and its text decoder) must stay, or the built one would run on
emptied tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from test_blip import tiny_blip_dir  # noqa: F401
from test_clip import tiny_clip_dir  # noqa: F401
from vlm_export.families import detect
from vlm_export.torch_offload import others_offloaded


def _specs(model_dir: Path) -> dict:
    family = detect(model_dir)
    return {spec.name: spec for spec in family.components(family.load(model_dir))}


def _values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_clip_text_tower_is_parked_while_the_vision_tower_runs(tiny_clip_dir: Path) -> None:  # noqa: F811
    specs = _specs(tiny_clip_dir)
    vision, text = specs["vision"], specs["text"]
    before_text, before_vision = _values(text.module), _values(vision.module)
    pixels = torch.from_numpy(vision.example_inputs(1)["pixel_values"])
    with torch.no_grad():
        expected = vision.module(pixels)
    with others_offloaded(vision.module, [vision.module, text.module]) as parked:
        assert parked == [text.module]
        assert all(p.numel() == 0 for p in text.module.parameters())  # the memory is given back
        with torch.no_grad():
            got = vision.module(pixels)  # the component being built runs on its own weights
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(p.numel() == 0 for p in text.module.parameters())  # and does not bring the text tower back
    after = text.module.state_dict()
    assert after.keys() == before_text.keys() and all(torch.equal(after[k], before_text[k]) for k in before_text)
    assert all(torch.equal(vision.module.state_dict()[k], v) for k, v in before_vision.items())


def test_blip_components_sharing_weights_are_never_parked(tiny_blip_dir: Path) -> None:  # noqa: F811
    specs = _specs(tiny_blip_dir)
    modules = [spec.module for spec in specs.values()]
    with others_offloaded(specs["cross_kv"].module, modules) as parked:
        assert parked == [specs["vision_encoder"].module]  # the decoder owns the K/V projections too: it stays
        assert all(p.numel() > 0 for p in specs["text_decoder"].module.parameters())
    cross_kv = specs["cross_kv"]
    feed = {k: torch.from_numpy(v) for k, v in cross_kv.example_inputs(1).items()}
    with torch.no_grad():
        expected = cross_kv.module(**feed)
    with others_offloaded(specs["vision_encoder"].module, modules) as parked:
        assert parked == [cross_kv.module, specs["text_decoder"].module]
        assert all(p.numel() == 0 for p in specs["text_decoder"].module.parameters())
        with torch.no_grad():  # BLIP makes the decoder's calibration inputs meanwhile: the shared weights come back whole
            got = cross_kv.module(**feed)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(p.numel() > 0 for p in specs["text_decoder"].module.parameters())
    assert all(p.numel() > 0 for m in modules for p in m.parameters())


def test_clip_text_module_holds_the_text_tower_alone_and_gives_get_text_features(tiny_clip_dir: Path) -> None:  # noqa: F811
    """The text component's module is the text tower and its projection only (so the vision
    tower can be parked beside it), computing exactly `CLIPModel.get_text_features`."""
    family = detect(tiny_clip_dir)
    loaded = family.load(tiny_clip_dir)
    text = {spec.name: spec for spec in family.components(loaded)}["text"]
    feed = {k: torch.from_numpy(v) for k, v in text.example_inputs(2).items()}
    with torch.no_grad():
        (got,) = text.module(**feed)
        expected = loaded.model.get_text_features(**feed).pooler_output
    assert torch.equal(got, expected)
    owned = {p.data_ptr() for p in text.module.parameters()}
    assert owned.isdisjoint(p.data_ptr() for p in loaded.model.vision_model.parameters())
