"""The one record type of parity.json, for component and end-to-end checks alike.

Why one type: component parity and the families' end-to-end checks (zero-shot, captions,
the real `get_image_features`) used to build their result dicts by hand, each with its
own verdict. A record now comes from a `Comparison` (verify.compare); it knows its
verdict (`passed`: no failures) and the tolerance that would have passed
(`would_pass_at`), and writes the keys parity.json has always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm_export.recipes import Evaluation


@dataclass(frozen=True)
class Comparison:
    """What a compare function returns: metrics, the resolved tolerance and the verdict."""

    metrics: dict[str, float]
    tolerance: dict[str, float]
    failures: list[str]
    samples: int
    would_pass_at: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # check-specific keys written beside the metrics

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityRecord:
    """One verdict: a component's (`component` set) or an end-to-end check's (`name` set).

    Component records also carry per-output metrics, per-sample cosine/max_abs, how the
    variant was computed for the verdict (recipes.Evaluation) and metrics of other
    evaluation paths reported beside it, never judged (`beside`, e.g. "ort_cpu_kernels").
    """

    variant: str
    metrics: dict[str, float]
    tolerance: dict[str, float]
    failures: list[str]
    samples: int
    would_pass_at: dict[str, float] = field(default_factory=dict)
    component: str | None = None
    name: str | None = None
    precision: str | None = None
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)
    evaluation: str = Evaluation.ORT_CPU.value
    beside: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def subject(self) -> str:
        """The component or the end-to-end check this record judges."""
        return str(self.component if self.component is not None else self.name)

    @classmethod
    def end_to_end(cls, name: str, variant: str, result: Comparison, **details: Any) -> "ParityRecord":
        """An end-to-end record; `details` (and the comparison's) are written as top-level keys."""
        latency = details.pop("latency", {})
        return cls(variant=variant, metrics=result.metrics, tolerance=result.tolerance, failures=result.failures,
                   samples=result.samples, would_pass_at=result.would_pass_at, name=name, latency=latency,
                   details={**result.details, **details})

    def to_json(self) -> dict[str, Any]:
        verdict = {"metrics": self.metrics, "tolerance": self.tolerance, "passed": self.passed, "failures": self.failures}
        if self.component is None:
            latency = {"latency": self.latency} if self.latency else {}
            return {"name": self.name, "variant": self.variant, **verdict, "samples": self.samples, **self.details,
                    **latency, "would_pass_at": self.would_pass_at}
        return {
            "component": self.component, "variant": self.variant, "precision": self.precision, "samples": self.samples,
            "metrics": self.metrics, "outputs": self.outputs, "tolerance": self.tolerance, "passed": self.passed,
            "failures": self.failures, "latency": self.latency, "per_sample": self.per_sample,
            "evaluation": self.evaluation, "beside": self.beside, "would_pass_at": self.would_pass_at,
        }
