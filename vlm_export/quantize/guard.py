"""The INT8 accuracy guard: find where the drift is born and keep those nodes in float.

Why: users find out on the device that INT8 broke the accuracy. After the static QDQ
graph is made, the guard checks it against the FP32 graph on held-out calibration
crops (never the parity images, which stay an honest test). When it misses the
tolerance it ranks the quantized nodes (guard_rank: one instrumented run finds where
quantization noise is born, then the few noisiest nodes are measured end to end, so
the number of sessions does not grow with the node count), then re-quantizes with the
worst 1, 2, 4, ... nodes in `nodes_to_exclude`, reusing the calibration cache, until
the check holds or the attempts are spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlm_export.quantize.guard_rank import SHORTLIST, activation_bypasses, rank_nodes
from vlm_export.recipes import Evaluation

__all__ = ["GuardConfig", "GuardResult", "NodeRanking", "count_candidates", "guard_int8", "rank_nodes", "run_output"]


@dataclass(frozen=True)
class GuardConfig:
    """Defaults: 4 re-quantizations at most, a 0.002 cosine margin over the tolerance.

    Why a margin: the guard repairs on held-out crops of the calibration photos, the
    verdict is taken on other photos, so the check must clear the tolerance by more than
    the spread between the two sets. Both now compute the variant the same way (float
    Q/DQ for the QDQ graph, exact integer kernels for int8-cpu); measured check → parity
    gaps (cosine_min): tiny BLIP/CLIP/LLaVA ≤ 0.0001, DINOv2-small +0.0040 (parity the
    higher). The 0.018 gap once seen on BLIP (check 0.9944, parity 0.9766, issue 13) was
    the parity run's AVX2 integer kernels, which no longer decide a verdict. A larger
    margin costs size and speed: on DINOv2-small a 0.005 margin kept 8
    MatMuls float instead of 1 (QDQ 31.3 MB instead of 24.2 MB).
    """

    enabled: bool = True
    max_attempts: int = 4
    margin: float = 0.002


@dataclass
class GuardResult:
    """What the guard decided, as written to parity.json under `int8_guard`."""

    before: dict[str, float]
    after: dict[str, float]
    goal: float = 0.0  # the check's cosine_min target: tolerance + margin
    evaluation: str = Evaluation.ORT_CPU.value  # how the check computed the variant (recipes.Evaluation)
    kept_float: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    ranking: list[dict[str, float | str]] = field(default_factory=list)
    size_bytes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    passed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cosines(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    from vlm_export.verify.metrics import cosine_per_sample

    cos = cosine_per_sample(ref, got)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def run_output(model: Any, feed: dict[str, Any], output: str, evaluation: Evaluation = Evaluation.ORT_CPU) -> np.ndarray:
    """One output of an ONNX file or ModelProto on the CPU provider, computed the way
    `evaluation` says (FLOAT_QDQ: Q/DQ in float, as the verdict is); a ragged feed runs
    sample by sample and its outputs are zero-padded and stacked."""
    from vlm_export.verify.evaluation import ort_cpu_session
    from vlm_export.verify.feeds import run_batched

    session = ort_cpu_session(model, evaluation)
    return run_batched(lambda f: {output: session.run([output], f)[0]}, feed, batch_size=None)[output]


def _latency_b1(path: Path, feed: dict[str, np.ndarray]) -> float:
    from vlm_export.verify.evaluation import ort_cpu_session
    from vlm_export.verify.feeds import first_sample
    from vlm_export.verify.latency import measure

    session = ort_cpu_session(path)  # latency as the CPU runtime runs it: all optimisations
    one = first_sample(feed)
    return measure(lambda: session.run(None, one), warmup=2, runs=5)["p50_ms"]


def count_candidates(qdq_path: Path, op_types: tuple[str, ...]) -> int:
    """How many nodes `rank_nodes` will measure end to end (for a progress bar): the
    shortlist, or fewer when the graph has fewer quantized nodes."""
    import onnx

    return min(SHORTLIST, len(activation_bypasses(onnx.load(str(qdq_path), load_external_data=False), op_types)))


class NodeRanking:
    """Ranks the nodes once per component and shares it between the INT8 variants.

    Why shared: the QDQ graph is where each node's activation quantization can be
    switched off cheaply; the same nodes are where the CPU variant's dynamic
    quantization loses accuracy, and its fused graph keeps their names.
    """

    def __init__(self, qdq_path: Path, check_feed: dict[str, np.ndarray], reference: np.ndarray, output: str,
                 op_types: tuple[str, ...], progress: Callable[[], None] | None = None) -> None:
        import onnx

        # A snapshot in memory: the guard may rewrite the QDQ file before the CPU variant asks.
        self._model = onnx.load(str(qdq_path))
        self._args = (check_feed, reference, output, op_types, progress)
        self._ranking: list[dict[str, float | str]] | None = None

    def __call__(self) -> list[dict[str, float | str]]:
        if self._ranking is None:
            ranking = rank_nodes(self._model, *self._args)
            self._ranking = [r for r in ranking if float(r["cosine_gain"]) > 0]
        return self._ranking


def guard_int8(
    variant_path: Path,
    check_feed: dict[str, np.ndarray],
    reference: np.ndarray,
    output: str,
    target_cosine_min: float,
    requantize: Callable[[tuple[str, ...]], None],
    ranking: Callable[[], list[dict[str, float | str]]],
    config: GuardConfig = GuardConfig(),
    evaluation: Evaluation = Evaluation.ORT_CPU,
) -> GuardResult:
    """Check an INT8 variant against the FP32 `reference`, computed as its verdict will be
    (`evaluation`); when it misses, re-quantize it in place with the worst-ranked 1, 2, 4,
    ... nodes kept float (`requantize(excluded)`)."""
    before = _cosines(reference, run_output(variant_path, check_feed, output, evaluation))
    goal = target_cosine_min + config.margin
    result = GuardResult(before=before, after=before, goal=goal, evaluation=evaluation.value,
                         size_bytes={"before": variant_path.stat().st_size})
    result.passed = before["cosine_min"] >= goal
    if result.passed or not config.enabled:
        result.size_bytes["after"] = result.size_bytes["before"]
        return result
    result.latency_ms["before"] = _latency_b1(variant_path, check_feed)
    result.ranking = ranking()
    for attempt in range(config.max_attempts):
        count = min(2**attempt, len(result.ranking))
        excluded = [str(r["node"]) for r in result.ranking[:count]]
        requantize(tuple(excluded))
        metrics = _cosines(reference, run_output(variant_path, check_feed, output, evaluation))
        passed = metrics["cosine_min"] >= goal
        result.attempts.append({"excluded": count, **metrics, "passed": passed})
        result.kept_float, result.after, result.passed = excluded, metrics, passed
        if passed or count == len(result.ranking):
            break
    result.size_bytes["after"] = variant_path.stat().st_size
    result.latency_ms["after"] = _latency_b1(variant_path, check_feed)
    return result
