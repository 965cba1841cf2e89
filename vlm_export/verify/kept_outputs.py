"""Outputs of the component parity's verdict sessions, kept for the family's end-to-end check.

Why: CLIP's zero-shot check needs each variant's image and text embeddings on the parity
images, and component parity has just computed exactly those, with each variant's verdict
session (verify.evaluation.verdict_session) on the same images, one sample a run. Opening
both towers' sessions again per variant to recompute them cost 79.5 s of CLIP
ViT-L/14-336's 911 s build (benchmarks/results/build_scale.txt, session 9). Only the
outputs a family names in its `end_to_end_outputs` are kept, so what stays in memory is a
few embedding rows per image, not a component's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass
class VariantOutputs:
    """`wanted[component]`: the output names to keep; `arrays[component][variant][name]`:
    the kept outputs (first axis: the parity samples, in the stream's order)."""

    wanted: Mapping[str, tuple[str, ...]]
    arrays: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)

    def keep(self, component: str, variant: str, outputs: Mapping[str, np.ndarray]) -> None:
        """Keep the wanted outputs of `component`'s `variant` (nothing when none is wanted)."""
        names = self.wanted.get(component, ())
        if names:
            self.arrays.setdefault(component, {})[variant] = {name: outputs[name] for name in names}

    def get(self, component: str, variant: str) -> Mapping[str, np.ndarray] | None:
        """The kept outputs of `component`'s `variant`, or None when they were not kept."""
        return self.arrays.get(component, {}).get(variant)
