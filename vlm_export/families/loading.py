"""Loading a local checkpoint through the model's real `from_pretrained`, safely.

Why one place: every family must load with `local_files_only=True`, safetensors only,
no remote code, and turn the library's deep exceptions into one-line errors that name
the file and say what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from vlm_export.errors import InputError

# How many key names one error line shows per kind of problem.
_SHOWN_KEYS = 3


def check_model_dir(model_dir: Path) -> Path:
    """MODEL_DIR exists, is a directory and holds a config.json."""
    if not model_dir.exists():
        raise InputError(f"MODEL_DIR '{model_dir}' does not exist; pass a local Hugging Face checkpoint directory")
    if not model_dir.is_dir():
        raise InputError(f"MODEL_DIR '{model_dir}' is not a directory; pass the folder that holds config.json")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"'{model_dir / 'config.json'}' is missing; MODEL_DIR must be a save_pretrained() folder")
    return model_dir


def read_config(model_dir: Path) -> dict[str, Any]:
    """Parse MODEL_DIR/config.json; a clear error when it is not JSON or lacks model_type."""
    path = check_model_dir(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"'{path}' is not valid JSON ({exc}); re-save the model with save_pretrained()") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"'{path}' has no 'model_type'; re-save the model with save_pretrained()")
    return config


def _weights_present(model_dir: Path) -> None:
    safetensors = list(model_dir.glob("*.safetensors"))
    if safetensors:
        return
    legacy = [p.name for p in model_dir.glob("*.bin")]
    hint = f" (found {', '.join(legacy)}: pickled weights are not loaded; convert them to safetensors)" if legacy else ""
    raise InputError(f"no *.safetensors weights in '{model_dir}'{hint}")


def quiet_transformers() -> None:
    """transformers' own progress bars and notices would interleave with ours."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pretrained(model_dir: Path, architecture: str, optional_keys: Sequence[str] = (), **kwargs: Any) -> Any:
    """Load `transformers.<architecture>` from MODEL_DIR in eval mode, FP32, eager attention.

    Why eager attention: SDPA exports to opset-dependent patterns; eager gives the plain
    MatMul/Softmax graph that ORT's quantizer and TensorRT both handle.

    Why the key check: `from_pretrained` fills every weight the checkpoint lacks with a
    random init and only logs it, and parity against PyTorch cannot notice (both sides
    hold the same random numbers). Any missing, unexpected or wrongly shaped key is an
    InputError here, except keys matching a regex in `optional_keys`, which a family
    declares for tensors it knows to be unused or legitimately absent.
    """
    import transformers

    quiet_transformers()
    _weights_present(model_dir)
    cls = getattr(transformers, architecture)
    try:
        model, info = cls.from_pretrained(
            str(model_dir),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",
            dtype="float32",
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # report shape mismatches in `info` instead of a bare RuntimeError
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the user's files (safetensors, config)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot load {architecture} from '{model_dir}': {first[:300]}; check the weights and config.json"
        ) from None
    check_loading_info(info, weights_file(model_dir), optional_keys, lambda key: checkpoint_key(model, key))
    return model.eval()


def weights_file(model_dir: Path) -> Path:
    """The file an error about the weights should name: the shard index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    return index if index.is_file() else model_dir / "model.safetensors"


def checkpoint_key(model: Any, key: str) -> str:
    """The name `key` (a model-side name) has in a checkpoint file, for messages.

    Why: transformers 5 renames legacy checkpoint keys while loading (a ViT file holds
    `vit.encoder.layer.0.attention.attention.query.weight`, the model calls it
    `vit.layers.0.attention.q_proj.weight`) and reports problems under the new names;
    the user looks into the file. Reverses the renaming the model was loaded with, one
    key at a time on a shapeless tensor; any surprise keeps the model-side name.
    """
    try:
        import torch
        from transformers.core_model_loading import revert_weight_conversion

        names = list(revert_weight_conversion(model, {key: torch.empty(0, device="meta")}))
    except Exception:  # noqa: BLE001 - naming only; a conversion that needs real tensors keeps the model's name
        return key
    return names[0] if len(names) == 1 else key


def check_loading_info(
    info: Mapping[str, Any], source: Path, optional_keys: Sequence[str] = (), name: Callable[[str], str] = str
) -> None:
    """Refuse a checkpoint whose keys or shapes differ from what config.json builds.

    `info` is what `from_pretrained(..., output_loading_info=True)` returns in
    transformers 5: sets `missing_keys` and `unexpected_keys` (model-side names, after
    transformers' own renames, tied weights and `_keys_to_ignore_on_load_*` are
    accounted for), `mismatched_keys` as (key, checkpoint shape, model shape) tuples
    (filled only with `ignore_mismatched_sizes=True`; otherwise a bare RuntimeError),
    and `error_msgs` (raised by transformers itself before it returns). `optional_keys`
    match the model-side names; `name` turns one into the name shown (the file's).
    """
    optional = re.compile("|".join(f"(?:{p})" for p in optional_keys)) if optional_keys else None

    def required(keys: Iterable[str]) -> list[str]:
        return sorted((k for k in keys if optional is None or not optional.search(k)), key=_natural)

    missing = required(info.get("missing_keys") or ())
    unexpected = required(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: _natural(item[0]))
    problems = []
    if missing:
        problems.append(f"lacks {_count(missing, 'weight')} the config needs ({_first(missing, name)})")
    if unexpected:
        problems.append(f"holds {_count(unexpected, 'weight')} the config has no place for ({_first(unexpected, name)})")
    if mismatched:
        shown = ", ".join(f"{name(key)} is {_shape(ckpt)} in the file but {_shape(model)} in the model"
                          for key, ckpt, model in mismatched[:_SHOWN_KEYS])
        more = f" and {len(mismatched) - _SHOWN_KEYS} more" if len(mismatched) > _SHOWN_KEYS else ""
        problems.append(f"has {_count(mismatched, 'tensor')} of the wrong shape ({shown}{more})")
    if problems:
        raise InputError(
            f"'{source}' does not match config.json: {'; '.join(problems)}; an export would be partly random or "
            "cut short, so nothing was built: use the config.json saved with these weights (save_pretrained())"
        )


def _count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _first(keys: Sequence[str], name: Callable[[str], str]) -> str:
    """The first few key names as `name` shows them, then an ellipsis when there are more."""
    return ", ".join(name(k) for k in keys[:_SHOWN_KEYS]) + (", …" if len(keys) > _SHOWN_KEYS else "")


def _natural(key: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10, so the first keys shown are the first layers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"
