"""`vlm-export build`: MODEL_DIR → verified bundle, one stage after another.

Each stage is a function from files to files (export, fp16, int8, parity, report); this
module only sequences them, stages the output and records everything in the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from vlm_export.bundle import BundleWriter
from vlm_export.bundle.schema import Component, ExternalData, Manifest, TensorEntry, VariantEntry
from vlm_export.build_parity import PARITY_RUN_BATCH
from vlm_export.calibration.stream import CalibrationStream
from vlm_export.engines.plan import record_ep_plans
from vlm_export.errors import InputError
from vlm_export.families import ComponentSpec, LoadedModel, detect
from vlm_export.families.base import EndToEndParity, end_to_end_outputs
from vlm_export.heap import release_freed_memory
from vlm_export.progress import Reporter, SilentReporter
from vlm_export.quantize import CalibrationMethod, FeedReader, Int8Config, to_fp16, to_int8_cpu, to_int8_qdq
from vlm_export.recipes import PRECISIONS, RECIPES, recipe
from vlm_export.verify import ParityRecord
from vlm_export.torch_offload import offloaded, others_offloaded
from vlm_export.verify.feeds import SampleStream
from vlm_export.verify.kept_outputs import VariantOutputs

def parse_precisions(text: str) -> tuple[str, ...]:
    """"fp16,int8" → ("fp32", "fp16", "int8"): fp32 is the source of the others, always built."""
    asked = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        raise InputError(f"unknown precision '{','.join(unknown) or text}' (--precision); known: {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p == "fp32" or p in asked)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `build` needs; defaults match the CLI's."""

    model_dir: Path
    out: Path
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")  # the CLI default; "int4" is asked for
    calibration_dir: Path | None = None  # None: the default set of package photos
    calibration_size: int = 128
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    parity_dir: Path | None = None  # None: the default parity photos
    allow_drift: bool = False
    int8_guard: bool = True
    force: bool = False
    latency_runs: int = 20
    latency_budget_s: float | None = 15.0  # timed seconds per (PyTorch, variant) pair; None: no bound
    seed: int = 0


@dataclass
class BuildResult:
    out: Path
    records: list[ParityRecord] = field(default_factory=list)
    guard: dict[str, Any] = field(default_factory=dict)  # component → variant → GuardResult JSON
    end_to_end: list[dict[str, Any]] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)  # component → calibration method comparison

    @property
    def failed(self) -> list[ParityRecord]:
        return [r for r in self.records if not r.passed]

    @property
    def failed_names(self) -> list[str]:
        names = [f"{r.component}/{r.variant}" for r in self.failed]
        return names + [f"{e['name']}/{e['variant']}" for e in self.end_to_end if not e["passed"]]

    def failure_summary(self) -> str:
        parts = [f"{r.component}/{r.variant}: {', '.join(r.failures)}" for r in self.failed]
        parts += [f"{e['name']}/{e['variant']}: {', '.join(e['failures'])}" for e in self.end_to_end if not e["passed"]]
        return "; ".join(parts)


def _config_hash(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()


def _images(folder: Path | None, flag: str, role: str, reporter: Reporter) -> list[tuple[str, Any]]:
    from vlm_export.calibration.folder import load_image_folder

    if folder is None:
        from vlm_export.calibration import default_calibration_dir, default_parity_dir

        folder = default_calibration_dir() if role == "calibration" else default_parity_dir()
    images = load_image_folder(Path(folder), flag, reporter.warn)
    for name, image in images:  # lets a family's image check name the file (PIL keeps `info` across convert)
        image.info.setdefault("filename", str(Path(folder) / name))
    return images


# Held-out crops (another seed) on which the INT8 guard checks the QDQ graph.
GUARD_SAMPLES = 8


@dataclass(frozen=True)
class CalibrationData:
    stream: CalibrationStream  # model inputs the ranges are calibrated on, made a batch at a time
    check: dict[str, np.ndarray]  # other crops of the same photos, for the INT8 guard

    @cached_property
    def samples(self) -> dict[str, Any]:
        """Every calibration sample at once (benchmarks); the build itself streams `stream`."""
        return self.stream.materialize()


def _calibration_data(
    opts: BuildOptions, family: Any, loaded: LoadedModel, reporter: Reporter, inputs: list[str] | None = None
) -> CalibrationData:
    """The calibration stream, and the guard's held-out crops made for `inputs` (those of
    the components quantized to INT8; None: every input)."""
    from vlm_export.calibration.augment import random_resized_crops

    photos = [img for _, img in _images(opts.calibration_dir, "--calibration", "calibration", reporter)]
    stream = CalibrationStream(photos, opts.calibration_size, partial(family.sample_inputs, loaded), seed=opts.seed)
    check = random_resized_crops(photos, GUARD_SAMPLES + len(photos), seed=opts.seed + 1)[len(photos):]
    return CalibrationData(stream, family.sample_inputs(loaded, check, inputs))


def _build_variants(
    spec: ComponentSpec, writer: BundleWriter, opts: BuildOptions, calib: CalibrationData | None, reporter: Reporter,
    guard: dict[str, Any], methods: dict[str, Any],
) -> dict[str, Path]:
    from vlm_export.export import check_against_torch, check_graph, export_component

    paths: dict[str, Path] = {}
    base = f"{spec.name}/{spec.name}"
    with reporter.task(f"[{spec.name}] export FP32 ONNX (torch.onnx dynamo)"):
        paths["fp32"] = export_component(spec, writer.path(f"{base}.fp32.onnx"))
        check_graph(spec, paths["fp32"])
        check_against_torch(spec, paths["fp32"])
    release_freed_memory()  # each stage's freed heap back to the OS before the next (vlm_export.heap)
    # The FP16/INT8 stages never run PyTorch: its weights wait on disk meanwhile, so
    # onnxruntime.quantization's model copies do not stack on them (vlm_export.torch_offload).
    with offloaded(spec.module):
        if "fp16" in opts.precisions:
            with reporter.task(f"[{spec.name}] FP16 (norms kept FP32)"):
                paths["fp16"] = to_fp16(paths["fp32"], writer.path(f"{base}.fp16.onnx"))
            release_freed_memory()
        if spec.weight_only:
            from vlm_export.quantize.weight_only import build_weight_only

            paths.update(build_weight_only(spec, paths["fp32"], writer, opts.precisions, reporter))
        if "int8" in opts.precisions and calib is not None and spec.int8:
            stream = calib.stream.for_inputs([t.name for t in spec.inputs])
            reader = FeedReader(stream)  # lazy: one batch of preprocessed samples alive at a time
            config = Int8Config(method=opts.calibration_method)
            if config.method is CalibrationMethod.AUTO:
                from vlm_export.quantize.method_choice import SUBSET, choose_method

                with reporter.task(f"[{spec.name}] comparing minmax / entropy / percentile calibration"):
                    choice = choose_method(paths["fp32"], stream.head(SUBSET), {t.name: calib.check[t.name] for t in spec.inputs}, spec.parity_output, config)
                methods[spec.name] = choice
                config = Int8Config(method=CalibrationMethod(choice["chosen"]))
                reporter.note(f"[{spec.name}] calibration method: {choice['chosen']} won")
            cache = writer.path(f"{spec.name}/calibration_cache.json")
            with reporter.task(f"[{spec.name}] INT8 QDQ calibration ({config.method.value}, {len(reader)} batches)"):
                paths["int8"] = to_int8_qdq(paths["fp32"], writer.path(f"{base}.int8.onnx"), reader, config, cache_path=cache)
            with reporter.task(f"[{spec.name}] INT8 for the CPU provider (fused GELU/attention, dynamic MatMul)"):
                paths["int8-cpu"] = to_int8_cpu(paths["fp32"], writer.path(f"{base}.int8-cpu.onnx"))
            guard[spec.name] = _guard_int8_variants(spec, paths, reader, config, cache, calib, opts, reporter)
    return paths


def _guard_int8_variants(
    spec: ComponentSpec, paths: dict[str, Path], reader: FeedReader, config: Int8Config, cache: Path,
    calib: CalibrationData, opts: BuildOptions, reporter: Reporter,
) -> dict[str, Any]:
    """Check each INT8 variant on held-out crops; keep the nodes where drift is born in float."""
    from dataclasses import replace

    from vlm_export.quantize.guard import GuardConfig, NodeRanking, count_candidates, guard_int8, run_output
    from vlm_export.verify.tolerances import default_tolerance

    target = default_tolerance("int8", spec.parity_kind, 1.0).cosine_min or 0.0
    check = {t.name: calib.check[t.name] for t in spec.inputs}
    total = count_candidates(paths["int8"], config.op_types)

    def requantize_qdq(excluded: tuple[str, ...]) -> None:
        reader.rewind()
        to_int8_qdq(paths["fp32"], paths["int8"], reader, replace(config, nodes_to_exclude=config.nodes_to_exclude + excluded), cache)

    def requantize_cpu(excluded: tuple[str, ...]) -> None:
        to_int8_cpu(paths["fp32"], paths["int8-cpu"], nodes_to_exclude=excluded)

    decisions = {}
    with reporter.task(f"[{spec.name}] INT8 guard (check on {GUARD_SAMPLES} held-out crops; rank {total} nodes if needed)", total=total) as task:
        reference = run_output(paths["fp32"], check, spec.parity_output)
        ranking = NodeRanking(paths["int8"], check, reference, spec.parity_output, config.op_types, task.advance)
        for key, requantize in (("int8", requantize_qdq), ("int8-cpu", requantize_cpu)):
            result = guard_int8(paths[key], check, reference, spec.parity_output, target, requantize, ranking,
                                GuardConfig(enabled=opts.int8_guard), recipe(key).evaluation)
            decisions[key] = result.to_json()
            if result.kept_float:
                reporter.note(f"[{spec.name}/{key}] INT8 guard kept {len(result.kept_float)} node(s) in float: "
                              f"check cosine_min {result.before['cosine_min']:.4f} → {result.after['cosine_min']:.4f}")
    return decisions


def _parity(
    spec: ComponentSpec, paths: dict[str, Path], stream: SampleStream, opts: BuildOptions, reporter: Reporter,
    conditions: dict[str, Any] | None = None, kept: VariantOutputs | None = None,
) -> list[ParityRecord]:
    """Verdicts per variant and batch-1 latency beside PyTorch, one variant's session at a
    time (build_parity); the measurement's machine state goes to `conditions[spec.name]`
    (parity.json "latency_conditions"), the outputs the end-to-end check reuses to `kept`."""
    from vlm_export.build_parity import component_parity

    return component_parity(spec, paths, stream, opts.latency_runs, reporter, conditions, opts.latency_budget_s, kept)


def _component_manifest(
    spec: ComponentSpec, paths: dict[str, Path], writer: BundleWriter, records: list[ParityRecord], precisions: tuple[str, ...]
) -> Component:
    from vlm_export.runtime.onnx_external import external_data_entries

    passed = {r.variant: r.passed for r in records}
    variants = {}
    for key, path in paths.items():
        made = recipe(key)
        rel = writer.relative(path)
        variants[key] = VariantEntry(
            precision=made.precision, recipe=made.recipe, evaluation=made.evaluation.value,
            providers=tuple(p for p in made.providers if p not in spec.unsupported_providers),
            onnx=rel, sha256=writer.checksum(rel), bytes=path.stat().st_size,
            external_data=tuple(ExternalData(**e) for e in external_data_entries(path, writer.staging)),
            parity_passed=passed.get(key),
        )
    return Component(
        variants=variants,
        inputs=tuple(TensorEntry(t.name, t.dtype, t.shape) for t in spec.inputs),
        outputs=tuple(TensorEntry(t.name, t.dtype, t.shape) for t in spec.outputs),
        dims=dict(spec.dims), parity_output=spec.parity_output, parity_kind=spec.parity_kind.value, opset=spec.opset,
        fp32_fallback=_fp32_fallback(spec, paths, precisions),
    )


def _fp32_fallback(spec: ComponentSpec, paths: dict[str, Path], precisions: tuple[str, ...]) -> tuple[str, ...] | None:
    """Variant keys asked for but not built for this component, which the runtime runs as FP32:
    INT8 of a component that opts out of it, INT4 (weight-only) of one that is not a language model."""
    from vlm_export.quantize.weight_only import CONFIGS

    built = {recipe(key).precision for key in paths}
    keys = []
    if not spec.int8 and "int8" in precisions and "int8" not in built:
        keys += [key for key, made in RECIPES.items() if made.precision == "int8" and key not in CONFIGS]
    if "int4" in precisions and "int4" not in built:
        keys += [key for key, made in RECIPES.items() if made.precision == "int4"]
    return tuple(keys) or None


def build(opts: BuildOptions, reporter: Reporter | None = None) -> BuildResult:
    """Run every stage and commit the bundle to `opts.out`; parity verdicts in the result."""
    from vlm_export.build_limits import check_build_ranges
    from vlm_export.report import write_reports

    reporter = reporter or SilentReporter()
    check_build_ranges(calibration_size=opts.calibration_size, latency_runs=opts.latency_runs)  # before minutes of loading
    family = detect(opts.model_dir)
    with BundleWriter(opts.out, force=opts.force, protected=(opts.model_dir, opts.calibration_dir, opts.parity_dir)) as writer:
        with reporter.task(f"Loading {family.name} model from {opts.model_dir}"):
            loaded = family.load(opts.model_dir)
        parity_images = _images(opts.parity_dir, "--parity-images", "parity", reporter)
        # parity inputs made a batch at a time, per component (verify.feeds.SampleStream)
        parity_stream = SampleStream([img for _, img in parity_images], partial(family.sample_inputs, loaded),
                                    run_batch=PARITY_RUN_BATCH)
        specs = family.components(loaded)
        # every image through the family's preprocessing, for the first component's inputs (each
        # family's image tower): a refused image is one line before minutes of export
        parity_stream.for_inputs([t.name for t in specs[0].inputs]).check()
        quantized = [t.name for spec in specs if spec.int8 for t in spec.inputs]
        calib = _calibration_data(opts, family, loaded, reporter, quantized) if "int8" in opts.precisions else None
        result = BuildResult(out=opts.out)
        components, all_paths, latency_conditions = {}, {}, {}
        kept = VariantOutputs(end_to_end_outputs(family))  # parity's judged outputs the end-to-end check reuses
        for spec in specs:
            # the other components' PyTorch weights wait on disk meanwhile (torch_offload)
            with others_offloaded(spec.module, [other.module for other in specs]):
                paths = all_paths[spec.name] = _build_variants(spec, writer, opts, calib, reporter, result.guard, result.methods)
                release_freed_memory()  # before parity's sessions (one variant at a time)
                records = _parity(spec, paths, parity_stream, opts, reporter, latency_conditions, kept)
            result.records.extend(records)
            components[spec.name] = _component_manifest(spec, paths, writer, records, opts.precisions)
        end_to_end = _end_to_end(family, loaded, all_paths, [img for _, img in parity_images], reporter, kept)
        result.end_to_end = end_to_end
        parity = {
            "machine": _machine(),
            "samples": [name for name, _ in parity_images],
            "records": [r.to_json() for r in result.records],
            "end_to_end": end_to_end,
            "int8_guard": result.guard,
            "calibration_methods": result.methods,
            "latency_conditions": latency_conditions,  # per component: machine state, threads, load, rounds
        }
        writer.write_json("parity.json", parity)
        manifest = record_ep_plans(Manifest(
            family=family.name,
            source={"path": str(opts.model_dir.absolute()), "config_sha256": _config_hash(opts.model_dir), "model_type": loaded.config["model_type"]},
            components=components,
            preprocess=dict(loaded.preprocess),
            labels=tuple(loaded.labels) if loaded.labels else None,
            files=_copy_bundle_files(loaded, writer),
            sections=dict(loaded.manifest_extra),
            parity={"passed": not result.failed_names, "failed": result.failed_names, "file": "parity.json",
                    "verdict_cpu": {k: parity["machine"][k] for k in ("model", "arch", "isa")}},
            build={"precisions": list(opts.precisions), "calibration_method": opts.calibration_method.value, "calibration_size": opts.calibration_size, "seed": opts.seed, "int8_guard": opts.int8_guard},
        ))
        write_reports(writer.staging, manifest, parity)
        writer.commit(manifest)
    return result


def _machine() -> dict[str, Any]:
    """The CPU and library versions the verdicts were computed on (parity.json "machine")."""
    import onnxruntime
    import torch

    from vlm_export.runtime.cpu import cpu_info

    return {**cpu_info(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def _end_to_end(
    family: Any, loaded: LoadedModel, paths: dict[str, dict[str, Path]], images: list[Any], reporter: Reporter,
    kept: VariantOutputs,
) -> list[dict[str, Any]]:
    """The family's end-to-end parity records (zero-shot argmax, captions) as JSON, when it
    has one; `kept` holds the component parity's judged outputs it asked for."""
    if not isinstance(family, EndToEndParity):
        return []
    with reporter.task(f"End-to-end parity ({family.name})"):
        return [record.to_json() for record in family.end_to_end_parity(loaded, paths, images, kept)]


def _copy_bundle_files(loaded: LoadedModel, writer: BundleWriter) -> dict[str, dict[str, Any]]:
    """Copy the family's side files (tokenizer.json, ...) and checksum them."""
    import shutil

    files = {}
    for relative, source in loaded.bundle_files.items():
        shutil.copyfile(source, writer.path(relative))
        files[relative] = {"sha256": writer.checksum(relative), "bytes": source.stat().st_size}
    return files
