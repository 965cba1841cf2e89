"""A component's samples are made for its own inputs: no PyTorch run for inputs nobody reads.

Why: BLIP's decoder inputs come from a PyTorch run of the whole model and LLaVA's and
Qwen2-VL's language-model inputs from the vision tower and the LM. They were made for every
batch of the vision encoder's calibration and parity, where only pixels are read: that run
brought the parked weights back (torch_offload's restore hook; BLIP-large's vision stages
reached 4.67x that encoder) and cost a whole forward per batch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_blip import tiny_blip_dir  # noqa: F401
from vlm_export.calibration.stream import CalibrationStream
from vlm_export.families import detect
from vlm_export.torch_offload import offloaded
from vlm_export.verify.feeds import SampleStream


def _images(photo_dir: Path, count: int = 3) -> list:
    return [Image.open(p).convert("RGB") for p in sorted(photo_dir.iterdir())[:count]]


def _forwards(model: torch.nn.Module) -> tuple[list[str], list]:
    """Names of the top-level submodules as they run, and the hooks (to remove)."""
    ran: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda *_, n=name: ran.append(n)) for name, m in model.named_children()]
    return ran, hooks


def test_blip_vision_encoder_samples_run_no_pytorch(tiny_blip_dir: Path, photo_dir: Path) -> None:  # noqa: F811
    family = detect(tiny_blip_dir)
    loaded = family.load(tiny_blip_dir)
    images = _images(photo_dir)
    everything = family.sample_inputs(loaded, images)
    assert {"pixel_values", "image_embeds", "input_ids"} < set(everything)  # the decoder's state too
    ran, hooks = _forwards(loaded.model)
    with offloaded(loaded.model) as parked:  # as during the vision encoder's stages
        pixels = family.sample_inputs(loaded, images, ("pixel_values",))
        assert not parked.restored and ran == []  # no PyTorch run: the parked weights stay on disk
        streamed = list(CalibrationStream(images, 3, partial(family.sample_inputs, loaded), batch=3).for_inputs(["pixel_values"]).chunks())
        parity = list(SampleStream(images, partial(family.sample_inputs, loaded), batch=3).for_inputs(["pixel_values"]).chunks())
        assert not parked.restored and ran == []
    assert set(pixels) == {"pixel_values"} and np.array_equal(pixels["pixel_values"], everything["pixel_values"])
    assert set(parity[0]) == {"pixel_values"} and np.array_equal(parity[0]["pixel_values"], everything["pixel_values"])
    assert set(streamed[0]) == {"pixel_values"} and streamed[0]["pixel_values"].shape == everything["pixel_values"].shape
    # the cross K/V graph reads the image embeddings: the vision encoder runs, the decoder does not
    embeds = family.sample_inputs(loaded, images, ("image_embeds",))
    assert ran == ["vision_model"]
    assert np.array_equal(embeds["image_embeds"], everything["image_embeds"])
    for hook in hooks:
        hook.remove()
    # the decoder's inputs are the same values whether asked alone or with everything
    decoder = [t.name for t in {s.name: s for s in family.components(loaded)}["text_decoder"].inputs]
    alone = family.sample_inputs(loaded, images, decoder)
    assert all(np.array_equal(alone[n], everything[n]) for n in decoder)


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_vlm_vision_samples_skip_the_language_model(architecture: str, tmp_path: Path, photo_dir: Path) -> None:
    from _tiny_lm import save_tiny_llava, save_tiny_qwen2_vl

    model_dir = (save_tiny_llava if architecture == "llava" else save_tiny_qwen2_vl)(tmp_path / "model")
    family = detect(model_dir)
    loaded = family.load(model_dir)
    specs = {s.name: s for s in family.components(loaded)}
    vision = [t.name for t in next(iter(specs.values())).inputs]
    lm = [t.name for t in specs["language_model"].inputs]
    images = _images(photo_dir, 2)
    everything = family.sample_inputs(loaded, images)
    steps = []
    hook = loaded.extra["lm_step"].register_forward_pre_hook(lambda *_: steps.append(1))
    asked = family.sample_inputs(loaded, images, vision)
    assert steps == [] and set(asked) == set(vision)  # the language model never ran
    for name in vision:
        got, want = asked[name], everything[name]
        assert all(np.array_equal(a, b) for a, b in zip(got, want)) if isinstance(want, list) else np.array_equal(got, want)
    language = family.sample_inputs(loaded, images, lm)
    assert steps and all(np.array_equal(language[n], everything[n]) for n in lm)
    hook.remove()
