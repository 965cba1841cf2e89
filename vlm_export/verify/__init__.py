"""Parity: running (feeds, sessions), comparing (metrics, compare functions), judging
(one tolerance table) and recording (one record type for parity.json)."""

from vlm_export.verify.compare import CompareFunc, Comparator, check_variants
from vlm_export.verify.cpu_peak import CpuPeak, machine_peaks
from vlm_export.verify.feeds import batched_feeds, first_sample, is_ragged, run_batched
from vlm_export.verify.latency import measure
from vlm_export.verify.macs import MacCount, count_macs, vit_macs
from vlm_export.verify.metrics import compare, cosine_per_sample
from vlm_export.verify.parity import evaluate
from vlm_export.verify.records import Comparison, ParityRecord
from vlm_export.verify.tolerances import TOLERANCES, Bound, Check, bounds, default_tolerance, failures, judge

__all__ = [
    "TOLERANCES", "Bound", "Check", "CompareFunc", "Comparator", "Comparison", "CpuPeak", "MacCount", "ParityRecord",
    "batched_feeds", "count_macs", "machine_peaks", "vit_macs",
    "bounds", "check_variants", "compare", "cosine_per_sample", "default_tolerance", "evaluate", "failures",
    "first_sample", "is_ragged", "judge", "measure", "run_batched",
]
