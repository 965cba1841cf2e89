#!/usr/bin/env bash
# The GPU path checked on a real GPU (TensorRT engines, native runner, CUDA / TensorRT EPs):
#   benchmarks/gpu_check.sh [WORKDIR]
# Prints what is importable and from where, builds engines for a tiny ViT, a tiny DINOv2 and
# the built-in DINOv2-small, compares each against onnxruntime CPU FP32 (cosine, max abs) and
# runs `vlm-export bench`. Without TensorRT and without onnxruntime's CUDA provider it prints
# one line and exits 0. See benchmarks/gpu_check.py; results go in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
