"""The GPU path on a real GPU, in one run: what is importable, engines built, outputs compared.

    benchmarks/gpu_check.sh [WORKDIR]     (a wrapper that runs this file)

Why: CI has no GPU, so the TensorRT builder, the native runner and onnxruntime's CUDA /
TensorRT providers are checked there only against fakes (tests/trt_fakes/). Where a GPU is
lent, this script runs the real thing once: it reports whether `tensorrt` and
onnxruntime-gpu import and from where, builds engines for a tiny ViT, a tiny DINOv2 and the
built-in DINOv2-small (`vlm-export build` with no model), compares every engine and CUDA/TensorRT
EP output with onnxruntime's CPU FP32 output of the same bundle (cosine, max abs), and runs
`vlm-export bench`. Where neither TensorRT nor a CUDA provider exists it says so in one
line and exits 0. Exit 1 if any comparison fails its floor (cosine >= 0.99 for FP16/INT8,
0.9999 for FP32).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

FLOORS = {"fp32": 0.9999, "fp16": 0.99, "int8": 0.99}


def probe() -> dict[str, Any]:
    """What is importable here, and from where (never raises)."""
    from vlm_export.runtime.tensorrt import _tensorrt_import_error

    info: dict[str, Any] = {"python": sys.version.split()[0]}
    error = _tensorrt_import_error()
    spec = importlib.util.find_spec("tensorrt")
    info["tensorrt"] = {"ok": error is None, "error": error, "where": getattr(spec, "origin", None)}
    if error is None:
        import tensorrt

        info["tensorrt"]["version"] = tensorrt.__version__
    import onnxruntime as ort

    providers = ort.get_available_providers()
    info["onnxruntime"] = {"version": ort.__version__, "where": ort.__file__, "providers": providers}
    info["cuda_ep"] = "CUDAExecutionProvider" in providers
    info["trt_ep"] = "TensorrtExecutionProvider" in providers
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        info["gpu"] = out.stdout.strip() or out.stderr.strip()
    return info


def _tiny(kind: str, folder: Path) -> Path:
    """The tests' tiny ViT / DINOv2 checkpoints (tests/conftest.py), random weights."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "vit":
        labels = {i: f"class_{i}" for i in range(10)}
        ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                                             patch_size=8, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()})).save_pretrained(folder)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=56, patch_size=14)).save_pretrained(folder)
        BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def _cli(*args: str) -> None:
    print("$ vlm-export " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "vlm_export.cli", *args], check=True)


def bundles(work: Path) -> dict[str, Path]:
    """Build the three bundles (fp32, fp16, int8); photos from scikit-image's samples."""
    import skimage

    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    made = {}
    for name in ("vit", "dinov2", "dinov2-small"):
        out = work / "bundles" / name
        model = [] if name == "dinov2-small" else [str(_tiny(name, work / "models" / name))]
        _cli("build", *model, "-o", str(out), "--precision", "fp16,int8", "--calibration", str(photos),
             "--parity-images", str(photos), "--calibration-size", "8", "--latency-runs", "3")
        made[name] = out
    return made


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def compare(bundle: Path, info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Engine / CUDA EP / TensorRT EP outputs of every TensorRT variant vs ORT CPU FP32."""
    import onnxruntime as ort

    from vlm_export.engines import TARGETS, build_engines, ort_trt_provider_options, plan
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.tensorrt import cuda_device
    from vlm_export.runtime.trt_runner import create_runner

    manifest = json.loads((bundle / "manifest.json").read_text())
    name, cc = cuda_device()
    target = next((t for t in TARGETS.values() if t.compute_capability == cc), None)
    if target is None:
        rows.append({"bundle": bundle.name, "error": f"no target for compute {cc} ({name})"})
        return
    plans = plan(manifest, target)
    if info["tensorrt"]["ok"]:
        build_engines(bundle, plans)
    typed = read_manifest(bundle).typed
    vision = next(iter(typed.components))
    fp32 = str(bundle / typed.components[vision].variants["fp32"].onnx)
    cpu = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
    for p in [p for p in plans if p.component == vision]:
        shape = (max(2, p.inputs[0].opt[0]),) + tuple(p.inputs[0].opt[1:]) if p.dla_core is None else p.inputs[0].opt
        x = {p.inputs[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        want = cpu.run(None, x)[0]
        runs = {}
        if info["tensorrt"]["ok"]:
            runner = create_runner(bundle, typed.components[vision].variants[p.variant], where=p.variant, target=target.name)
            runs["tensorrt"] = lambda: next(iter(runner.infer(x).values()))
        for ep, options in (("CUDAExecutionProvider", {}), ("TensorrtExecutionProvider", ort_trt_provider_options(p, bundle, bundle.parent / "ort-trt-cache"))):
            if ep in info["onnxruntime"]["providers"]:
                session = ort.InferenceSession(str(bundle / p.onnx), providers=[(ep, options), "CPUExecutionProvider"])
                if session.get_providers()[0] != ep:
                    rows.append({"bundle": bundle.name, "variant": p.variant, "path": ep, "error": f"fell back to {session.get_providers()[0]}"})
                    continue
                runs[ep] = lambda s=session: s.run(None, x)[0]
        for path, run in runs.items():
            try:
                got = run()
                cos = _cosine(got, want)
                rows.append({"bundle": bundle.name, "target": target.name, "variant": p.variant, "path": path, "batch": shape[0],
                             "cosine": round(cos, 6), "max_abs": float(np.abs(got.astype(np.float64) - want).max()), "ok": cos >= FLOORS[p.precision]})
            except Exception as exc:  # noqa: BLE001 - report every path, keep going
                rows.append({"bundle": bundle.name, "variant": p.variant, "path": path, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
    for provider in (["cuda"] if info["cuda_ep"] else []) + (["tensorrt-ep"] if info["trt_ep"] else []):
        _cli("bench", str(bundle), "--provider", provider, "--target", target.name, "--batch", "1,8", "--runs", "20",
             "--output", str(bundle.parent / f"bench-{bundle.name}-{provider}.json"))


def main() -> int:
    info = probe()
    if not info["tensorrt"]["ok"] and not info["cuda_ep"]:
        print(f"gpu_check: nothing to check here: tensorrt does not import ({info['tensorrt']['error']}) and onnxruntime "
              f"{info['onnxruntime']['version']} has no CUDA provider ({', '.join(info['onnxruntime']['providers'])}); exit 0")
        return 0
    print(json.dumps(info, indent=1))
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows: list[dict[str, Any]] = []
    for bundle in bundles(work).values():
        try:
            compare(bundle, info, rows)
        except Exception:  # noqa: BLE001 - one bundle's failure must not hide the others
            rows.append({"bundle": bundle.name, "error": traceback.format_exc().strip().splitlines()[-1]})
    for row in rows:
        print(json.dumps(row))
    (work / "gpu_check.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"gpu_check: {sum(r.get('ok', False) for r in rows)}/{len(rows)} comparisons pass; details in {work / 'gpu_check.json'}")
    return 0 if rows and all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
