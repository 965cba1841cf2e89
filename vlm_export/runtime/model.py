"""The on-device model API: numpy in, numpy out, no torch, no transformers.

`load(OUT, precision=..., provider=...)` verifies the bundle (manifest, paths,
checksums), picks the variant built for that precision and provider, and returns a
model object whose family methods (`classify`, `embed`) wrap the generic `run`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vlm_export.errors import BundleError, InputError
from vlm_export.recipes import PRECISIONS
from vlm_export.runtime.manifest import Manifest, Variant, check_external_data, read_manifest, verify_file
from vlm_export.runtime.session import Provider, create_session

log = logging.getLogger("vlm_export.runtime")


def choose_variant(variants: dict[str, Variant], precision: str, provider: Provider) -> Variant:
    """The variant of `precision` meant for `provider`, else any of that precision.

    `precision` is a precision (fp32, fp16, int8) or, when it is none of them, an exact
    variant key such as "int8-cpu".
    """
    if precision not in PRECISIONS and precision in variants:
        return variants[precision]
    matching = [v for v in variants.values() if v.precision == precision]
    if not matching:
        known = sorted({v.precision for v in variants.values()} | set(variants))
        raise InputError(f"precision '{precision}' (--precision) is not in this bundle; it has: {', '.join(known)}")
    for variant in matching:
        if provider.value in variant.providers:
            return variant
    return matching[0]


class ComponentRunner:
    """One ORT session over one variant; thread-safe `infer`, timing of the last call."""

    def __init__(
        self, variant: Variant, provider: Provider, threads: int | None = None, trt_options: dict[str, Any] | None = None
    ) -> None:
        self.variant = variant
        # The CPU's optimised graph is cached outside the bundle (runtime.ort_cache); not for
        # variants with external data, which onnxruntime would have to re-split.
        cache_key = variant.sha256 if not variant.external_data else None
        self.session = create_session(variant.path, provider, threads, trt_options, cache_key=cache_key)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.last_inference_ms = 0.0
        self._lock = threading.Lock()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}; this component takes {', '.join(self.input_names)}")
        start = time.perf_counter()
        outputs = self.session.run(None, {n: feed[n] for n in self.input_names})
        with self._lock:
            self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return dict(zip(self.output_names, outputs))


class BundleModel:
    """A loaded bundle: `run(feed)` on a component, plus the manifest's facts."""

    def __init__(self, manifest: Manifest, runners: dict[str, ComponentRunner], provider: Provider) -> None:
        self.manifest = manifest
        self.runners = runners
        self.provider = provider

    @property
    def precision(self) -> str:
        return next(iter(self.runners.values())).variant.key

    def run(self, feed: dict[str, np.ndarray], component: str | None = None) -> dict[str, np.ndarray]:
        """Run one component (the only one when there is one) on a dict of numpy arrays."""
        if component is None:
            if len(self.runners) != 1:
                raise InputError(f"this bundle has components {', '.join(self.runners)}; name one")
            component = next(iter(self.runners))
        if component not in self.runners:
            raise InputError(f"unknown component '{component}'; this bundle has {', '.join(self.runners)}")
        return self.runners[component].infer(feed)

    def embed(self, images: Any) -> Any:
        """The image embedding; family classes that have one override this."""
        raise InputError(f"a {self.manifest.family} bundle has no image embedding; run a component with .run(feed, component)")

    def describe(self, image: Any, *, top_k: int = 5, labels: Sequence[str] | None = None) -> str:
        """One line about one image, what `vlm-export run` prints after "PATH: ".

        Why here: each family knows how its result reads, so the CLI need not guess.
        This default summarises the embedding (dim, L2 norm, first values); `labels`
        (zero-shot) is refused unless the class overrides it. Defaults to top_k=5, no labels.
        """
        self._refuse_labels(labels)
        return embedding_line(self.embed(image))

    def _refuse_labels(self, labels: Sequence[str] | None) -> None:
        if labels is not None:
            raise InputError(f"--labels needs a CLIP bundle; '{self.manifest.root}' is a {self.manifest.family} bundle")


def ranked_line(ranked: Sequence[tuple[str, float]]) -> str:
    """"cat 0.912, dog 0.051": (label, probability) pairs as `describe` prints them."""
    return ", ".join(f"{label} {p:.3f}" for label, p in ranked)


def embedding_line(emb: np.ndarray) -> str:
    """Dimension, L2 norm and the first four values of one embedding."""
    return (
        f"embedding dim {emb.shape[-1]}, L2 norm {float((emb ** 2).sum() ** 0.5):.4f}, "
        f"first values {', '.join(f'{v:+.4f}' for v in emb.ravel()[:4])}"
    )


class VisionModel(BundleModel):
    """ViT classifiers and backbones: preprocessing from the bundle, then the graph."""

    def __init__(self, manifest: Manifest, runners: dict[str, ComponentRunner], provider: Provider) -> None:
        from vlm_export.runtime.preprocess import ImagePreprocessor

        super().__init__(manifest, runners, provider)
        self.preprocessor = ImagePreprocessor.from_manifest(manifest)
        self.component = manifest.component("vision")

    def _outputs(self, images: Any) -> tuple[dict[str, np.ndarray], bool]:
        feed, single = self.preprocessor.feed(images)
        return self.run(feed, "vision"), single

    def embed(self, images: Any) -> np.ndarray:
        """The image embedding (pooler/CLS output, or logits for a classifier)."""
        outputs, single = self._outputs(images)
        emb = outputs[str(self.component.parity_output)]
        return emb[0] if single else emb

    def classify(self, images: Any, top_k: int = 5) -> Any:
        """Top-k (label, probability) per image for a classifier bundle."""
        if "logits" not in (o.name for o in self.component.outputs):
            raise InputError("this bundle is a backbone without a classifier head; use .embed(image)")
        outputs, single = self._outputs(images)
        logits = outputs["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels = self.manifest.labels or [str(i) for i in range(probs.shape[-1])]
        results = []
        for row in probs:
            order = np.argsort(-row)[: max(1, top_k)]
            results.append([(labels[i] if i < len(labels) else str(i), float(row[i])) for i in order])
        return results[0] if single else results

    def describe(self, image: Any, *, top_k: int = 5, labels: Sequence[str] | None = None) -> str:
        """Top-k labels for a classifier bundle, else the embedding summary. Defaults to top_k=5."""
        self._refuse_labels(labels)
        if "logits" in (o.name for o in self.component.outputs):
            return ranked_line(self.classify(image, top_k=top_k))
        return embedding_line(self.embed(image))


def _pick(
    variants: dict[str, Variant], precision: str, provider: Provider, exact: str | None, fp32_fallback: Sequence[str] = ()
) -> Variant:
    """`fp32_fallback`: variant keys the build skipped for this component (manifest), run as FP32."""
    if (exact or precision) in fp32_fallback and (exact or precision) not in variants:
        return choose_variant(variants, "fp32", provider)
    if exact is None:
        return choose_variant(variants, precision, provider)
    if exact not in variants:
        raise InputError(f"unknown variant '{exact}' (--variant); this bundle has: {', '.join(variants)}")
    return variants[exact]


def _runner(manifest: Manifest, name: str, chosen: Variant, prov: Provider, threads: int | None, target: str | None) -> Any:
    """ORT runner, or the native TensorRT runner over the engine built for this device."""
    entry = manifest.component(name).variants[chosen.key]
    where = f"variant {name}/{chosen.key}"
    if prov is Provider.TENSORRT:
        from vlm_export.runtime.trt_runner import create_runner

        return create_runner(manifest.root, entry, variant=chosen, where=where, target=target)
    options = None
    if prov is Provider.TENSORRT_EP and target is not None and entry.for_tensorrt:
        from vlm_export.runtime.tensorrt import recorded_ep_options

        options = recorded_ep_options(entry, target, manifest.typed.config_sha256, where)
    return ComponentRunner(chosen, prov, threads, options)


# family → "module:Class" of its runtime model, imported only when such a bundle loads.
_MODEL_CLASSES: dict[str, str] = {
    "vit": "vlm_export.runtime.model:VisionModel",
    "clip": "vlm_export.runtime.clip:ClipModel",
    "llava": "vlm_export.runtime.llava:LlavaModel",
    "blip": "vlm_export.runtime.blip:BlipModel",
    "qwen2_vl": "vlm_export.runtime.qwen2_vl:Qwen2VLModel",
}


def _model_class(family: str) -> type[BundleModel] | None:
    import importlib

    target = _MODEL_CLASSES.get(family)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


_WARNED: set[tuple[str, str, str]] = set()


def _warn_int8_cpu_once(manifest: Manifest, name: str, chosen: Variant) -> None:
    """One warning per (bundle, component, variant) when its verdict does not cover this CPU."""
    from vlm_export.runtime.cpu import cpu_info, int8_cpu_warning

    verdict_cpu = manifest.typed.parity.get("verdict_cpu")
    message = int8_cpu_warning(chosen.recipe, verdict_cpu if isinstance(verdict_cpu, dict) else None, cpu_info())
    key = (str(manifest.root.resolve()), name, chosen.key)
    if message and key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s/%s: %s", name, chosen.key, message)


def load(
    bundle: str | Path,
    precision: str = "fp32",
    provider: str | Provider = "cpu",
    threads: int | None = None,
    components: Sequence[str] | None = None,
    variant: str | None = None,
    target: str | None = None,
    component_variants: Mapping[str, str] | None = None,
) -> BundleModel:
    """Open bundle OUT on `provider` at `precision`, verifying paths and checksums.

    `variant` names an exact manifest variant (e.g. "int8", the TensorRT QDQ graph, on
    the CPU) and overrides the choice by precision and provider. `target` (a name from
    `vlm_export.engines.targets`) gives the TensorRT EP the profile shapes and flags the
    build recorded for it; the EP's caches go outside the bundle (`runtime.tensorrt`).
    `component_variants` names an exact variant per component, over `precision` and
    `variant`: what a VLM ships is an INT8 vision tower with a weight-only language model,
    `{"vision_projector": "int8-cpu", "language_model": "int4-cpu"}` (parity.json's
    "generate deployed" records judge such pairs). Defaults to FP32 on the CPU provider.
    """
    manifest = read_manifest(Path(bundle))
    model_class = _model_class(manifest.family)
    if model_class is None:
        raise BundleError(f"bundle family '{manifest.family}' is not known to this runtime; upgrade vlm-export")
    prov = Provider.parse(provider)
    names = list(components or manifest.components)
    per_component = dict(component_variants or {})
    runners = {}
    for name in [*names, *per_component]:
        if name not in manifest.components:
            raise InputError(f"unknown component '{name}'; the bundle has {', '.join(manifest.components)}")
    for name in names:
        exact = per_component.get(name, variant)
        chosen = _pick(manifest.variants(name), precision, prov, exact, manifest.component(name).fp32_fallback or ())
        verify_file(chosen)
        check_external_data(chosen)
        if chosen.parity_passed is False:
            log.warning("variant %s/%s failed parity at build time (see parity.json)", name, chosen.key)
        if prov is Provider.CPU and chosen.precision == "int8":
            _warn_int8_cpu_once(manifest, name, chosen)
        runners[name] = _runner(manifest, name, chosen, prov, threads, target)
    return model_class(manifest, runners, prov)
