"""Loading a local checkpoint through the model's real `from_pretrained`, safely.

Why one place: every family must load with `local_files_only=True`, safetensors only,
no remote code, and turn the library's deep exceptions into one-line errors that name
the file and say what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_export.errors import InputError


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


def load_pretrained(model_dir: Path, architecture: str, **kwargs: Any) -> Any:
    """Load `transformers.<architecture>` from MODEL_DIR in eval mode, FP32, eager attention.

    Why eager attention: SDPA exports to opset-dependent patterns; eager gives the plain
    MatMul/Softmax graph that ORT's quantizer and TensorRT both handle.
    """
    import transformers

    quiet_transformers()
    _weights_present(model_dir)
    cls = getattr(transformers, architecture)
    try:
        model = cls.from_pretrained(
            str(model_dir),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",
            dtype="float32",
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the user's files (safetensors, config)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot load {architecture} from '{model_dir}': {first[:300]}; check the weights and config.json"
        ) from None
    return model.eval()


def load_slow_image_processor(model_dir: Path) -> Any:
    """The model's own (slow, PIL-based) image processor from preprocessor_config.json."""
    from transformers import AutoImageProcessor

    quiet_transformers()
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        raise InputError(f"'{path}' is missing; save the model's image processor with save_pretrained() next to it")
    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the image processor from '{path}': {str(exc).splitlines()[0][:300]}") from None
