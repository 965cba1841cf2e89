"""Chat templates on the device: the model's own Jinja template, rendered as transformers does.

Why jinja2 and not a hand-written "USER: … ASSISTANT:" string: each checkpoint ships its
own template (llava-1.5, Mistral-, Qwen2-based LLaVAs and Qwen2-VL all differ), and the
answer depends on the exact prompt. transformers renders it with a sandboxed jinja2
environment (trim_blocks, lstrip_blocks, the loop-controls extension, `tojson`,
`raise_exception`); this module sets up the same environment, so the text, and after
`tokenizers` the ids, equal `apply_chat_template`'s. jinja2 is imported only here, when a
template is rendered.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from vlm_export.errors import BackendUnavailableError, BundleError, InputError


def _environment() -> Any:
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BackendUnavailableError("the chat template needs jinja2: pip install 'vlm-export[chat]' (or jinja2), "
                                      "or pass raw=True (CLI: --raw) with the prompt in the model's format") from None

    def raise_exception(message: str) -> None:
        raise InputError(f"the chat template refused the conversation: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(template: str, messages: Sequence[Mapping[str, Any]], special_tokens: Mapping[str, str],
           add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` under `template`, special tokens (bos_token, …) in scope."""
    env = _environment()
    from jinja2 import TemplateError

    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise BundleError(f"the bundle's chat template does not parse ({exc}); rebuild the bundle") from None
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **dict(special_tokens))
    except TemplateError as exc:
        raise InputError(f"the chat template failed on this conversation ({str(exc)[:200]})") from None


def user_turn(prompt: str, image_token: str, style: str, images: int = 1) -> list[dict[str, Any]]:
    """One user message with `images` images and the question, in the content form the
    template reads: typed parts ("list", processor templates) or text with the image token
    written in ("string", tokenizer templates)."""
    if style == "list":
        return [{"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": prompt}]}]
    return [{"role": "user", "content": "".join(f"{image_token}\n" for _ in range(images)) + prompt}]
