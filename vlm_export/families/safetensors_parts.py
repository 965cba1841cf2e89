"""Load only the parts of a model that are exported; the rest stays shapes without data.

Why: a LLaVA-1.5-7B export needs its 0.3 B-parameter vision tower and projector, yet
`from_pretrained` builds and fills the whole model, language model included (~28 GB in
FP32), on a 24 GiB machine. Here the model is built the way `from_pretrained` builds it
(same class, same config, eager attention) but on the `meta` device, where a tensor has
a shape and no storage; the tensors under the family's `parts` (module paths such as
`model.vision_tower`) are then read from the safetensors one key at a time and put in
place. Everything else is never read: the language model stays on `meta`, and its shard
is opened only for its header (safetensors_index; not even mapped into memory).

Why the model keeps its full shape: the family's parity reference is the model's own
`get_image_features`, which touches only the parts; keeping the real class means that
reference is still transformers' code, not ours.

Why the whole checkpoint is still checked: the headers give every key and shape for
free, so a checkpoint that does not match its config.json is refused exactly as
`load_pretrained` refuses it (../shared/DESIGN.md: never exported half-random), under the
file's own key names (transformers' renaming from the file's names to the model's is
applied to header names, no data involved).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from vlm_export.errors import InputError, UnsupportedModelError
from vlm_export.families.loading import check_loading_info, checkpoint_key, quiet_transformers
from vlm_export.families.safetensors_index import CheckpointIndex, read_index, read_tensor


def load_parts(model_dir: Path, architecture: str, parts: Sequence[str], optional_keys: Sequence[str] = ()) -> Any:
    """`transformers.<architecture>` for MODEL_DIR with only the modules at `parts` holding weights.

    `parts` are module paths of the built model (`model.visual`); their parameters and
    persistent buffers come from the checkpoint in FP32, exactly as `from_pretrained(...,
    dtype="float32")` would set them; their non-persistent buffers (position ids, rotary
    frequencies) are computed by the model's own `_init_weights`. Every other tensor stays
    on the `meta` device. Raises InputError for a checkpoint that does not match the
    config (missing, unexpected or wrongly shaped keys, or a damaged shard/index).
    """
    import torch

    index = read_index(model_dir)
    model = _meta_model(model_dir, architecture)
    names = _model_names(model, index)
    state = model.state_dict()
    file_name = {model_key: file_key for file_key, model_key in names.items()}
    check_loading_info(_loading_info(model, index, names, state), index.source, optional_keys,
                       lambda key: file_name.get(key) or checkpoint_key(model, key))
    prefixes = tuple(part.rstrip(".") + "." for part in parts)
    wanted = sorted(key for key in state if key.startswith(prefixes))
    if not wanted:
        raise UnsupportedModelError(f"{architecture} has no module at {', '.join(parts)}; the family names the wrong parts")
    with torch.no_grad():
        for key, tensor in _read(index, [k for k in wanted if k in file_name], file_name):
            tensor._is_hf_initialized = True  # transformers' own mark: initialize_weights leaves it alone
            _put(model, key, tensor)
        # Tied weights (an lm_head the file leaves out) share their source, as from_pretrained ties them.
        model.tie_weights(missing_keys={k for k in state if k not in file_name}, recompute_mapping=False)
        tied = set(model.all_tied_weights_keys)
        # Non-persistent buffers, and keys the family declared optional that the file lacks,
        # get what from_pretrained gives them: the model's own initialization (below).
        unfilled = [(k, state[k]) for k in wanted if k not in file_name and k not in tied]
        unfilled += [(k, b) for k, b in model.named_non_persistent_buffers() if k.startswith(prefixes)]
        for key, placeholder in unfilled:
            _put(model, key, torch.empty_like(placeholder, device="cpu"))
    model.initialize_weights()  # initializes only unmarked tensors; meta ones stay meta
    left = [key for key, value in _tensors(model) if key.startswith(prefixes) and value.is_meta]
    if left:
        raise UnsupportedModelError(f"{architecture}: {', '.join(left[:3])} under {', '.join(parts)} was not loaded")
    return model.eval()


def _meta_model(model_dir: Path, architecture: str) -> Any:
    """The model as `from_pretrained` would build it (FP32, eager attention), every tensor on `meta`."""
    import torch
    import transformers
    from transformers import initialization

    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the user's config.json
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read '{model_dir / 'config.json'}': {first[:300]}; re-save it with save_pretrained()") from None
    cls = getattr(transformers, architecture)
    with torch.device("meta"), initialization.no_init_weights(), initialization.no_tie_weights():
        return cls._from_config(config, attn_implementation="eager", dtype=torch.float32)


def _model_names(model: Any, index: CheckpointIndex) -> dict[str, str]:
    """File key → model key, by the renamings transformers applies when it loads this class.

    A key that a conversion with arithmetic (concatenation, split …) would produce cannot
    be read one tensor at a time; no supported family has one, and if transformers adds
    one, the family is refused here rather than loaded wrong.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names = {}
    for file_key in index.tensors:
        model_key, converted = rename_source_key(file_key, renamings, converters, model.base_model_prefix, meta_state)
        if converted is not None:
            raise UnsupportedModelError(
                f"'{index.source}': tensor '{file_key}' needs transformers' weight conversion '{converted}', which "
                "part-loading does not apply; report it with the model's name"
            )
        names[file_key] = model_key
    return names


def _loading_info(model: Any, index: CheckpointIndex, names: Mapping[str, str], state: Mapping[str, Any]) -> dict[str, Any]:
    """What `from_pretrained(output_loading_info=True)` would report, from headers only."""
    loaded = set(names.values())
    ignore_missing = _pattern(model._keys_to_ignore_on_load_missing)
    ignore_unexpected = _pattern(model._keys_to_ignore_on_load_unexpected)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = {k for k in state if k not in loaded and k not in tied and not (ignore_missing and ignore_missing.search(k))}
    unexpected = {k for k in loaded if k not in state and not (ignore_unexpected and ignore_unexpected.search(k))}
    mismatched = set()
    for file_key, model_key in names.items():
        if model_key in state:
            have, want = index.tensors[file_key].shape, tuple(state[model_key].shape)
            if have != want:
                mismatched.add((model_key, have, want))
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}


def _pattern(patterns: Any) -> re.Pattern[str] | None:
    patterns = list(patterns or ())
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _read(index: CheckpointIndex, keys: Sequence[str], file_name: Mapping[str, str]) -> Iterator[tuple[str, Any]]:
    """(model key, FP32 tensor) for each of `keys`: one shard open at a time, one tensor's bytes read at a time."""
    import torch

    by_shard: dict[Path, list[str]] = {}
    for key in keys:
        by_shard.setdefault(index.entry(file_name[key]).shard, []).append(key)
    for shard, shard_keys in by_shard.items():
        try:
            with open(shard, "rb") as handle:
                for key in shard_keys:
                    tensor = read_tensor(handle, index.entry(file_name[key]))
                    yield key, tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        except OSError as exc:
            raise InputError(f"cannot read tensors from '{shard}' ({exc.strerror or exc}); check the file") from None


def _put(model: Any, key: str, tensor: Any) -> None:
    """Replace the parameter or buffer at `key` (a meta placeholder) with `tensor`."""
    import torch

    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        parameter = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        parameter._is_hf_initialized = getattr(tensor, "_is_hf_initialized", False)
        module._parameters[name] = parameter
    else:
        module._buffers[name] = tensor


def _tensors(model: Any) -> Iterator[tuple[str, Any]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
