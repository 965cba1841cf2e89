"""`vlm-export chat BUNDLE IMAGE "question"`: a VLM bundle answers, streamed token by token.

Device side: base install only (numpy, onnxruntime, pillow, tokenizers, jinja2 for the
chat template). Bad input (no language model in the bundle, a prompt over the context,
--max-new-tokens <= 0, no chat template without --raw) is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vlm_export.cli.errors import one_line_errors


@one_line_errors
def chat(
    bundle: Path = typer.Argument(..., help="A LLaVA bundle built from a checkpoint with its tokenizer."),
    image: Path = typer.Argument(..., help="The image the question is about."),
    question: str = typer.Argument(..., help='The question, e.g. "What is in this picture?".'),
    max_new_tokens: int = typer.Option(128, help="Most tokens of the answer (>= 1)."),
    precision: str = typer.Option("fp32", help="fp32, fp16, int8 (weight-only for the LM) or int4; or an exact variant key."),
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default); above 0 samples, seeded by --seed."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling cut-off in (0, 1]."),
    seed: int = typer.Option(0, help="Seed of the sampler."),
    raw: bool = typer.Option(False, "--raw", help="Use QUESTION as the whole prompt (no chat template); it must hold the image token."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop the answer before this text (repeatable)."),
    vision_variant: Optional[str] = typer.Option(None, help="The vision component's variant key (e.g. int8-cpu), over --precision."),
    lm_variant: Optional[str] = typer.Option(None, help="The language model's variant key (e.g. int4-cpu), over --precision."),
) -> None:
    """Answer a question about an image with a VLM bundle, printing the answer as it is generated."""
    from vlm_export.runtime import load

    model = load(bundle, precision=precision, provider=provider, component_variants=per_component(bundle, vision_variant, lm_variant))
    generate = getattr(model, "generate", None)
    if generate is None or "language_model" not in model.runners:
        from vlm_export.errors import InputError

        raise InputError(f"'{bundle}' is a {model.manifest.family} bundle without a language model; chat needs a LLaVA "
                         "bundle built from a checkpoint with its tokenizer")
    pieces = generate(image, question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      stop=stop or None, stream=True, raw=raw, seed=seed)
    for piece in pieces:
        typer.echo(piece, nl=False)
    typer.echo("")
    trace = model.last_generation
    steps = trace.step_ms[1:]
    rate = f", {1e3 * len(steps) / sum(steps):.1f} tok/s decode" if steps and sum(steps) > 0 else ""
    typer.echo(f"{len(trace.ids)} tokens, first after {trace.ttft_ms:.0f} ms{rate} "
               f"({', '.join(f'{n} {r.variant.key}' for n, r in model.runners.items())}, {model.provider.value})", err=True)


def per_component(bundle: Path, vision: str | None, lm: str | None) -> dict[str, str]:
    """--vision-variant / --lm-variant as `load`'s component_variants (the pair a user deploys:
    INT8 vision + weight-only LM, judged in parity.json's "generate deployed" records)."""
    from vlm_export.errors import InputError
    from vlm_export.runtime.manifest import read_manifest

    if vision is None and lm is None:
        return {}
    manifest = read_manifest(bundle)
    names = {"--lm-variant": "language_model", "--vision-variant": next((n for n in manifest.components if n != "language_model"), "")}
    chosen = {}
    for flag, key in (("--vision-variant", vision), ("--lm-variant", lm)):
        if key is None:
            continue
        name = names[flag]
        if name not in manifest.components:
            raise InputError(f"{flag}: '{bundle}' has no such component (it has {', '.join(manifest.components)})")
        if key not in manifest.variants(name):
            raise InputError(f"unknown variant '{key}' ({flag}); {name} has: {', '.join(manifest.variants(name))}")
        chosen[name] = key
    return chosen
