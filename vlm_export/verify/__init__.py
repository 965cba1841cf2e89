"""Parity metrics, tolerances, latency and the per-variant verdicts."""

from vlm_export.verify.latency import measure
from vlm_export.verify.metrics import compare, cosine_per_sample
from vlm_export.verify.parity import ParityRecord, evaluate, run_in_batches
from vlm_export.verify.tolerances import default_tolerance, failures

__all__ = ["ParityRecord", "compare", "cosine_per_sample", "default_tolerance", "evaluate", "failures", "measure", "run_in_batches"]
