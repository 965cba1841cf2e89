"""PyTorch CUDA references for the DINOv2-small default (run on a lent GPU machine).

    python benchmarks/gpu_reference.py DIR OUT_JSON

DIR holds (made by `--prepare` here on the CPU): model/ (Dinov2Model, FP16 safetensors
so it fits the transfer limit), pixel_values.npy (the parity photos, preprocessed),
ref_fp32_cpu.npy (PyTorch FP32 CPU pooler output with the same FP16-rounded weights)
and ort_fp16_cpu.npy (our bundle's FP16 ONNX on the ORT CPU provider). On the GPU it
measures PyTorch CUDA FP32/FP16 eager latency at batch 1 and 8 and the cosine of CUDA
FP16 against both CPU outputs. Nothing here needs TensorRT or onnxruntime-gpu.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _cos(a: np.ndarray, b: np.ndarray) -> list[float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).tolist()


def prepare(bundle: Path, dest: Path) -> None:
    """On the CPU: FP16 weights, pixel values, CPU references."""
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    from vlm_export.calibration import default_parity_dir
    from vlm_export.runtime.images import iter_image_files
    from vlm_export.runtime.manifest import read_manifest
    from vlm_export.runtime.preprocess import ImagePreprocessConfig, ImagePreprocessor

    manifest = read_manifest(bundle)
    source = Path(manifest.data["source"]["path"])
    model = Dinov2Model.from_pretrained(source).eval().half()
    model.save_pretrained(dest / "model")
    pixel_values = ImagePreprocessor(ImagePreprocessConfig.from_dict(manifest.preprocess))(iter_image_files(default_parity_dir())[0])
    np.save(dest / "pixel_values.npy", pixel_values)
    with torch.no_grad():
        ref = model.float()(pixel_values=torch.from_numpy(pixel_values)).pooler_output.numpy()
    np.save(dest / "ref_fp32_cpu.npy", ref)
    fp16 = manifest.variants("vision")["fp16"].path
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    np.save(dest / "ort_fp16_cpu.npy", session.run(["pooler_output"], {"pixel_values": pixel_values})[0])


def _latency(model, x, runs: int = 50) -> dict[str, float]:  # noqa: ANN001
    import torch

    for _ in range(10):
        model(pixel_values=x)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(pixel_values=x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p90_ms": float(np.percentile(times, 90))}


def measure(src: Path, out_json: Path) -> None:
    import torch
    from transformers import Dinov2Model

    pixel_values = np.load(src / "pixel_values.npy")
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with torch.inference_mode():
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            model = Dinov2Model.from_pretrained(src / "model", dtype=dtype).eval().cuda()
            x = torch.from_numpy(pixel_values).to("cuda", dtype)
            out = model(pixel_values=x).pooler_output.float().cpu().numpy()
            result[f"cos_cuda_{name}_vs_cpu_fp32"] = _cos(out, np.load(src / "ref_fp32_cpu.npy"))
            result[f"cos_cuda_{name}_vs_ort_fp16_cpu"] = _cos(out, np.load(src / "ort_fp16_cpu.npy"))
            for batch in (1, 8):
                xb = x.repeat(2, 1, 1, 1)[:batch].contiguous()
                result[f"latency_{name}_b{batch}"] = _latency(model, xb)
    out_json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "--prepare":
        prepare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        measure(Path(sys.argv[1]), Path(sys.argv[2]))
