"""Declarative descriptions of what a family exports.

Why: the exporter, quantizer and parity checker are generic; they learn everything about
a model from these frozen records, the way optimum's per-architecture OnnxConfigs
describe inputs and dynamic axes. Only the family modules build them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Protocol, Sequence, runtime_checkable

from vlm_export.bundle.records import BATCH, DimSpec

if TYPE_CHECKING:  # build-time types only; importing this module never imports torch
    import numpy as np
    import torch

    from vlm_export.verify.kept_outputs import VariantOutputs
    from vlm_export.verify.records import ParityRecord


Dim = int | str
"""A tensor dimension: a fixed size or a symbol such as "batch" (dynamic)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape with symbolic dims."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        """Axes given by a symbol, e.g. {0: "batch"}."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class ParityKind(str, enum.Enum):
    """What a component's output means, which decides the metrics that matter."""

    LOGITS = "logits"  # classifier: top-1 agreement and top-5 overlap on top of cosine
    EMBEDDING = "embedding"  # feature vector or token features: cosine and abs errors


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one variant; None means "not checked".

    Defaults follow ../shared/DESIGN.md: fp32 max_abs <= 1e-4 * scale, fp16 cosine >= 0.999,
    int8 cosine >= 0.99 and top-1 agreement >= 0.98 where a classifier exists.
    """

    max_abs: float | None = None
    cosine_min: float | None = None
    top1_agreement: float | None = None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class ComponentSpec:
    """One exportable graph of a model.

    `module` is a small torch wrapper whose forward takes the inputs in `inputs` order
    and returns the outputs in `outputs` order. `parity_output` names the output that
    the parity metrics compare (others are still checked for max_abs).
    """

    name: str
    module: "torch.nn.Module"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: Callable[[int], dict[str, "np.ndarray"]]  # batch size -> feed
    parity_output: str
    parity_kind: ParityKind = ParityKind.EMBEDDING
    opset: int = 18
    # Entered around the export only: patches that make the traced graph what we want
    # (optimum's `patch_model_for_export`), e.g. dropping an all-zero attention mask.
    patcher: Callable[[], AbstractContextManager[Any]] = nullcontext
    # False: no INT8 variants for this component (e.g. a decoder whose greedy output INT8
    # is not shown to keep); the manifest lists them under "fp32_fallback" and the runtime
    # runs FP32 for this component when INT8 is asked.
    int8: bool = True
    # Weight-only variant keys (recipes.py, e.g. "int4", "int8-wo") for a language model:
    # MatMul weights quantized block-wise (quantize/weight_only.py), activations float.
    weight_only: tuple[str, ...] = ()
    # Providers this graph cannot run on whatever its recipe says, e.g. a language model
    # built on onnxruntime's com.microsoft GroupQueryAttention: TensorRT's ONNX parser has
    # no contrib ops (LLMs on TensorRT are TensorRT-LLM's or Edge-LLM's job, not an ONNX
    # engine). Dropped from the manifest's providers, so no engine is planned for it.
    unsupported_providers: frozenset[str] = frozenset()
    # Every symbolic input dimension: which target range sizes it, the range the model
    # itself allows, and whether it is a KV-cache axis. Recorded in the manifest
    # (`components.<c>.dims`) for engine profiles and benchmark sizes. Defaults to a
    # batch axis only.
    dims: Mapping[str, DimSpec] = field(default_factory=lambda: {"batch": BATCH})

    def __post_init__(self) -> None:
        undeclared = sorted({d for t in self.inputs for d in t.shape if isinstance(d, str)} - set(self.dims))
        if undeclared:
            raise ValueError(f"component '{self.name}' inputs use dimension(s) {', '.join(undeclared)} that its dims do not declare")


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from MODEL_DIR plus what the bundle needs besides the graphs."""

    family: str
    model: "torch.nn.Module"
    model_dir: Path
    config: Mapping[str, Any]
    preprocess: Mapping[str, Any]  # the runtime's preprocessing config (see runtime.preprocess)
    labels: Sequence[str] | None = None  # class names of a classifier, index-aligned
    extra: Mapping[str, Any] = field(default_factory=dict)  # family-private state (processor, head)
    # Files copied into the bundle as they are (bundle-relative name → source), e.g.
    # tokenizer.json for the runtime's `tokenizers`; checksummed in manifest["files"].
    bundle_files: Mapping[str, Path] = field(default_factory=dict)
    # Extra top-level manifest sections the runtime needs (e.g. "tokenizer", "llm").
    manifest_extra: Mapping[str, Any] = field(default_factory=dict)


class Family(Protocol):
    """What every family module provides."""

    name: str
    model_types: tuple[str, ...]

    def load(self, model_dir: Path) -> LoadedModel:
        """Load through the real `from_pretrained(local_files_only=True)`."""
        ...

    def components(self, loaded: LoadedModel) -> list[ComponentSpec]:
        """The graphs to export, declared as data."""
        ...

    def sample_inputs(
        self, loaded: LoadedModel, images: Sequence[Any], inputs: Collection[str] | None = None
    ) -> dict[str, "np.ndarray | list[np.ndarray]"]:
        """Inputs of every component for a list of PIL images, keyed by input name.

        Built with the model's own processor (and tokenizer, with prompts the family
        chooses); each component takes the arrays named by its inputs, whose first axis
        is that component's sample axis. Used for calibration, the INT8 guard and parity.
        Ragged samples (each with its own length on a dynamic axis, e.g. Qwen2-VL's
        patches) come as a list of per-sample arrays instead: they run one feed per
        sample (`verify.feeds.is_ragged`), and parity compares the outputs
        zero-padded to one shape and stacked (`verify.feeds.run_batched`).

        `inputs` names the arrays the caller reads (None: all of them). A family skips
        the work that makes only the others (`families.common.needs_beyond`). Why: BLIP's
        decoder inputs come from a PyTorch run of the whole model, and LLaVA's and
        Qwen2-VL's language-model inputs from the vision tower and the LM itself; made for
        every batch of the vision encoder's calibration and parity, that run brought the
        parked weights back (torch_offload's restore hook) and cost its forward per batch.
        """
        ...


@runtime_checkable
class EndToEndParity(Protocol):
    """Optional family hook: parity of what the user sees (zero-shot argmax, captions).

    `variants[component][variant_key]` are the ONNX files written so far. Returns
    verify.ParityRecord end-to-end records (built with `verify.check_variants` from a
    reference function, a candidate function and a compare function), stored in
    parity.json under "end_to_end"; a failed one fails the build like a component record.

    `kept` (verify.kept_outputs.VariantOutputs), when given, holds the outputs the
    component parity's verdict sessions gave on the same images for the names the family
    lists in `end_to_end_outputs` ({component: (output, ...)}); a check that reuses them
    opens no session of its own for those (None: the check computes them itself).
    """

    end_to_end_outputs: Mapping[str, tuple[str, ...]]

    def end_to_end_parity(
        self, loaded: LoadedModel, variants: Mapping[str, Mapping[str, Path]], images: Sequence[Any],
        kept: "VariantOutputs | None" = None,
    ) -> "list[ParityRecord]": ...


def end_to_end_outputs(family: object) -> Mapping[str, tuple[str, ...]]:
    """The component outputs `family`'s end-to-end check reuses from parity ({} without one)."""
    return family.end_to_end_outputs if isinstance(family, EndToEndParity) else {}
