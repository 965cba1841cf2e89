"""The PyTorch model's weights parked on disk while the build works on ONNX files only.

Why: the build keeps the PyTorch FP32 model for parity (the reference outputs, the latency
baseline), but its FP16 and INT8 stages never run it. onnxruntime.quantization loads and
copies the ONNX model several times there (quant_pre_process, the QDQ quantizer's
save-and-reload with shape inference), and those copies stacked on top of the PyTorch
weights set the peak RSS of large components (ViT-L/16: one more FP32 copy, 1.2 GB;
benchmarks/results/build_memory.txt). `offloaded(module)` writes the weights to a temporary
file (safetensors, one entry per tensor object: tied weights come back tied), empties them, and loads them back, same values,
on leaving; parity then runs the same model.

Why a restore hook: a family may run the model while preparing another component's inputs
(BLIP's text decoder is calibrated on image embeddings from the vision encoder). Any forward
of a submodule that owns parked weights first brings every weight back, so such a family
gets correct results and simply keeps its memory.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlm_export.heap import drop_mapped_pages, release_freed_memory


class _Parked:
    """The module's weights on disk, and the hooks that bring them back on first use."""

    def __init__(self, module: Any, folder: Path) -> None:
        import torch

        from safetensors.torch import save_file

        self.module, self.path = module, folder / "weights.safetensors"
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        self.tensors = {name: tensor for name, tensor in named if tensor is not None}
        # One entry per tensor object (a tied weight appears under several names); safetensors,
        # not torch.save: the package never unpickles (tests/test_no_pickle.py).
        self.keys: dict[str, str] = {}
        unique: dict[int, str] = {}
        storages: set[int] = set()
        payload = {}
        for name, tensor in self.tensors.items():
            if id(tensor) not in unique:
                unique[id(tensor)] = str(len(unique))
                data = tensor.data
                shared = data.numel() and data.untyped_storage().data_ptr() in storages
                payload[unique[id(tensor)]] = data.clone() if shared or not data.is_contiguous() else data
                storages.add(data.untyped_storage().data_ptr())
            self.keys[name] = unique[id(tensor)]
        save_file(payload, str(self.path))
        del payload
        for tensor in self.tensors.values():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
        self.hooks = [m.register_forward_pre_hook(lambda *_: self.restore()) for m in owners]
        self.restored = False

    def restore(self) -> None:
        """Load the weights back (once) and drop the hooks."""
        from safetensors.torch import load_file

        if self.restored:
            return
        self.restored = True
        for hook in self.hooks:
            hook.remove()
        saved = load_file(str(self.path))
        for name, tensor in self.tensors.items():
            tensor.data = saved[self.keys[name]]


@contextlib.contextmanager
def offloaded(module: Any) -> Iterator[Any]:
    """Inside: `module`'s parameters and buffers are empty tensors, their values in a
    temporary file (restored on the module's first forward, or on leaving). Yields the
    parked state (`.restored` says whether a forward brought the weights back early)."""
    with tempfile.TemporaryDirectory(prefix="vlm-export-offload-") as tmp:
        parked = _Parked(module, Path(tmp))
        release_freed_memory()
        drop_mapped_pages()  # the checkpoint's map outlives the module's tensors (heap.drop_mapped_pages)
        try:
            yield parked
        finally:
            parked.restore()


@contextlib.contextmanager
def others_offloaded(module: Any, others: Sequence[Any]) -> Iterator[list[Any]]:
    """Inside: the modules of `others` that share no weight with `module` are parked together
    as by `offloaded` (one file, one restore: two of them may share weights, as BLIP's
    cross-attention K/V and its text decoder do). Yields the modules parked.

    Why: a family with several components (CLIP's towers, BLIP's encoder and decoder) keeps
    one PyTorch model; a component's weights, once read (exported, checked against PyTorch),
    stayed resident while the next component was built: CLIP ViT-L/14-336's vision tower
    (1.2 GB) through all the text tower's stages. A module sharing a weight with `module`
    stays, so `module` never runs on an emptied tensor; one that a family runs anyway
    (BLIP's decoder inputs made while its vision encoder is built) brings the parked group
    back through the restore hook."""
    import torch

    mine = _storages(module)
    parked = [m for m in others if m is not module and not _storages(m) & mine]
    if not parked:
        yield parked
        return
    with offloaded(torch.nn.ModuleList(parked)):
        yield parked


def _storages(module: Any) -> set[int]:
    """Where `module`'s weights live: each non-empty tensor's storage address (a tied or
    viewed weight shares its owner's), an empty one by identity."""
    return {t.untyped_storage().data_ptr() if t.numel() else id(t) for t in (*module.parameters(), *module.buffers())}

