"""Generation records of what a user ships: a vision variant and a language-model variant together.

Why a record of its own: the "generate" record of a weight-only LM variant runs it behind
the FP32 vision graph (the vision component has no "int4-cpu"), so it judges the LM alone.
A deployed VLM runs the INT8 vision tower *and* a quantized LM; their errors add up at the
splice (the image rows are a quarter of a short prompt). Each `Deployment` below is such a
pair, judged against the same `model.generate` FP32 reference with the row of
verify.tolerances keyed "<vision precision>+<LM precision>" (e.g. "int8+int4").
`vlm_export.runtime.load(..., component_variants={...})` loads exactly that pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from vlm_export.recipes import precision_of

if TYPE_CHECKING:
    from vlm_export.verify import Comparator, ParityRecord

DEPLOYED = "generate deployed"
"""The end-to-end record name of a deployed pair in parity.json."""

LM = "language_model"


@dataclass(frozen=True)
class Deployment:
    """A pair of variant keys meant to run together, and the machine it is meant for."""

    name: str
    vision: str
    language_model: str

    @property
    def key(self) -> str:
        """The record's "variant": "int8-cpu+int4-cpu"."""
        return f"{self.vision}+{self.language_model}"

    @property
    def precision(self) -> str:
        """The tolerance row: "int8+int4"."""
        return f"{precision_of(self.vision)}+{precision_of(self.language_model)}"


# CPU: the integer-kernel vision recipe with the accuracy-level-4 weight-only LMs (what
# `load` picks on the CPU provider); GPU: the TensorRT QDQ vision graph with the block-32
# INT4 LM meant for CUDA, and FP16 throughout. A pair is recorded when the bundle has both.
DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment("cpu-int4", "int8-cpu", "int4-cpu"),
    Deployment("cpu-int8", "int8-cpu", "int8-wo"),
    Deployment("gpu-int4", "int8", "int4"),
    Deployment("gpu-fp16", "fp16", "fp16"),
)

Answers = Callable[[str, str], dict[str, Any]]
"""(vision key, language-model key) → {"ids", "forced_logits", "cached", "uncached"}."""


def deployments_in(variants: Mapping[str, Mapping[str, Path]], vision: str) -> list[Deployment]:
    """The DEPLOYMENTS whose two variants this bundle has."""
    return [d for d in DEPLOYMENTS if d.vision in variants.get(vision, {}) and d.language_model in variants.get(LM, {})]


def generation_records(reference: Mapping[str, Any], answers: Answers, variants: Mapping[str, Mapping[str, Path]],
                       vision: str, compare: "Comparator") -> list["ParityRecord"]:
    """"generate" per LM variant (behind the vision variant of the same key, else FP32),
    then DEPLOYED per deployment; each pair of graphs runs once (a deployment equal to a
    per-variant pair, FP16 + FP16, reuses its answers). `compare`: generation_parity's
    `compare_answers` (passed in: that module imports this one)."""
    from vlm_export.verify import ParityRecord, check_variants

    deployed = deployments_in(variants, vision)
    reused = {(d.vision, d.language_model) for d in deployed}
    done: dict[tuple[str, str], dict[str, Any]] = {}  # only pairs a deployment reads again (logits: steps x vocab each)

    def run(vision_key: str, lm_key: str) -> dict[str, Any]:
        pair = (vision_key, lm_key)
        got = done.get(pair) or answers(vision_key, lm_key)
        if pair in reused:
            done[pair] = got
        return got

    def behind(key: str) -> str:
        return key if key in variants[vision] else "fp32"

    records = check_variants("generate", variants[LM], lambda: reference, lambda key: run(behind(key), key), compare,
                             lambda key, got: {"components": {vision: behind(key), LM: key}, "answers": got["ids"]})
    for d in deployed:
        got = run(d.vision, d.language_model)
        records.append(ParityRecord.end_to_end(DEPLOYED, d.key, compare(reference, got, d.precision), deployment=d.name,
                                               components={vision: d.vision, LM: d.language_model}, answers=got["ids"]))
    return records
