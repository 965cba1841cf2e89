"""While one component is built, the other components' PyTorch weights wait on disk.

Why: CLIP's text tower (0.5 GB at ViT-L/14-336) sat beside the vision tower's parity, the
stage of that build's peak. A component that shares weights with the one being built
(BLIP's cross-attention K/V and its text decoder) must stay, or the built one would run on
emptied tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
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



def _resident_kb(path: "Path | str") -> int:
    """Resident kB of this process's maps of `path` (Linux /proc/self/smaps; a deleted
    file's maps are named "PATH (deleted)")."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and len(fields) >= 5:
            current = fields[5].strip() if len(fields) == 6 else None
        elif fields and fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's memory maps from Linux /proc")
@pytest.mark.parametrize("dropped", [True, False])
def test_parked_weights_leave_memory_though_a_view_keeps_the_checkpoint_mapped(
    dropped: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module loaded from a memory-mapped safetensors file, as transformers loads it, with
    one view of a weight kept elsewhere (torch.onnx's optimizer keeps some): parking used to
    leave every read page of the file resident (the control, `dropped=False`); now they are
    paged out, and the kept view still reads the right values (re-read from the file)."""
    import vlm_export.torch_offload as torch_offload
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    save_file({"weight": torch.randn(1024, 1024), "bias": torch.randn(1024)}, str(checkpoint))
    module = torch.nn.Linear(1024, 1024)
    loaded = load_file(str(checkpoint))
    module.weight.data, module.bias.data = loaded["weight"], loaded["bias"]
    kept_view = module.weight.data[:2]  # outlives the parking, as the exporter's do
    expected = kept_view.clone()
    float(module.weight.detach().sum())  # every page read, as export and parity read them
    assert _resident_kb(checkpoint) >= 4096  # the control: the 4 MiB weight is resident through the map
    if not dropped:
        monkeypatch.setattr(torch_offload, "drop_mapped_pages", lambda: 0)
    with torch_offload.offloaded(module):
        assert module.weight.numel() == 0
        resident = _resident_kb(checkpoint)
        assert (resident < 512) is dropped, resident
        assert torch.equal(kept_view, expected)
    assert module.weight.shape == (1024, 1024) and torch.equal(module.weight.data[:2], expected)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's memory maps from Linux /proc")
@pytest.mark.parametrize("named_without_mark", [True, False])
def test_pages_of_a_deleted_safetensors_file_are_handed_back(
    named_without_mark: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights restored by torch_offload are views of a safetensors file whose temporary
    folder is already gone; its maps are named "PATH (deleted)". drop_mapped_pages hands their
    pages back too (the control: matching the map's name with the mark left on, as before,
    leaves them resident), and the values read again from the file are the same."""
    import vlm_export.heap as heap
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "parked" / "weights.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(1)
    save_file({"weight": torch.randn(1024, 1024)}, str(weights))
    restored = load_file(str(weights))["weight"]  # a view of the file's map, as torch_offload's restore makes
    expected = float(restored.sum())  # every page read
    weights.unlink()
    weights.parent.rmdir()
    gone = f"{weights} (deleted)"
    assert _resident_kb(gone) >= 4096  # the 4 MiB weight is resident through the deleted file's map
    if not named_without_mark:
        monkeypatch.setattr(heap, "_mapped_name", lambda path: path.strip())
    heap.drop_mapped_pages()
    resident = _resident_kb(gone)
    assert (resident < 512) is named_without_mark, resident
    assert float(restored.sum()) == expected
