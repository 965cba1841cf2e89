"""Build memory (issue 16): parity inputs stream, one variant's session at a time, and a
time budget that bounds the latency stage on large models.

What is checked: parity holds one batch of model inputs whatever the number of parity
images (counted through the family's preprocessing hook, as the calibration stream's test
does), and its verdicts equal those on every input at once; at most one onnxruntime
session is alive during parity and latency (counted through create_session); the latency
budget turns a plan that would not fit into rounds of one call, never fewer than
MIN_ROUNDS, and leaves a plan that fits unchanged; the PyTorch weights parked on disk
during the FP16/INT8 stages come back equal (tied weights still tied), also when a family
runs the model meanwhile; the export's check against PyTorch runs PyTorch at every batch
before it makes its session, and that session (like every build-time CPU session) is made
with PyTorch's mapped pages handed back, so the two models' weights are never resident
together. Peak RSS itself is measured in benchmarks/probe_build_memory.py
(benchmarks/results/build_memory.txt), not here.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from vlm_export.verify.latency import MIN_ROUNDS, budgeted, interleaved

VARIANTS = ("fp32", "fp16", "int8", "int8-cpu")


@pytest.fixture(scope="module")
def tiny_vit(tiny_vit_dir: Path, photo_dir: Path):  # noqa: ANN201 - (family, loaded, spec, photos)
    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families import detect

    family = detect(tiny_vit_dir)
    loaded = family.load(tiny_vit_dir)
    photos = [img for _, img in load_image_folder(photo_dir, "--parity-images", lambda _: None)]
    return family, loaded, next(iter(family.components(loaded))), photos


def test_parity_streams_one_batch_and_one_session_at_a_time(tiny_vit, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For 6 and 26 parity images: at most one batch of preprocessed inputs and one
    onnxruntime session alive at any moment, and the records equal those computed on
    every input at once (the eager way)."""
    import vlm_export.runtime.session as runtime_session
    from vlm_export.build_parity import component_parity
    from vlm_export.export import torch_outputs
    from vlm_export.progress import SilentReporter
    from vlm_export.recipes import Evaluation, recipe
    from vlm_export.verify import evaluate, run_batched
    from vlm_export.verify.evaluation import verdict_session
    from vlm_export.verify.feeds import SampleStream

    family, loaded, spec, photos = tiny_vit
    paths = {key: vit_bundle / "vision" / f"vision.{key}.onnx" for key in VARIANTS}
    live_inputs: dict[int, int] = {}
    live_sessions = {"now": 0, "most": 0}
    original = runtime_session.create_session

    def counted_session(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - create_session's own signature
        session = original(*args, **kwargs)
        live_sessions["now"] += 1
        live_sessions["most"] = max(live_sessions["most"], live_sessions["now"])
        weakref.finalize(session, lambda: live_sessions.__setitem__("now", live_sessions["now"] - 1))
        return session

    monkeypatch.setattr(runtime_session, "create_session", counted_session)
    for count in (6, 26):
        images = [photos[i % len(photos)] for i in range(count)]
        arrays: list = []

        def preprocess(batch: list, inputs: tuple | None) -> dict:
            samples = family.sample_inputs(loaded, batch, inputs)
            arrays.append(weakref.ref(samples["pixel_values"]))
            live_inputs[count] = max(live_inputs.get(count, 0), sum(r() is not None for r in arrays))
            return samples

        stream = SampleStream(images, preprocess)
        conditions: dict = {}
        records = component_parity(spec, paths, stream, 2, SilentReporter(), conditions)
        # the latency sample (one image), then every image in batches of 8 on each walk: PyTorch,
        # each variant's CPU session, and the verdict session of each variant judged otherwise
        walks = 1 + len(VARIANTS) + sum(recipe(k).evaluation is not Evaluation.ORT_CPU for k in VARIANTS)
        assert len(arrays) == 1 + walks * -(-count // 8), len(arrays)
        # the eager way: every input at once, one session per variant
        feed = family.sample_inputs(loaded, images)
        reference = run_batched(lambda f: torch_outputs(spec, f), feed)
        for record in records:
            session = verdict_session(paths[record.variant], record.variant)
            names = [o.name for o in session.get_outputs()]
            judged = run_batched(lambda f: dict(zip(names, session.run(None, f))), feed)
            eager = evaluate(spec, record.variant, recipe(record.variant).precision, reference, judged,
                             evaluation=recipe(record.variant).evaluation)
            assert record.samples == count and record.per_sample == eager.per_sample and record.metrics == eager.metrics
            assert record.failures == eager.failures
            del session
        method = conditions["vision"]["method"]
        assert set(method["per_variant"]) == set(VARIANTS) and method["order"] == ["pytorch-eager-cpu", *VARIANTS]
    # one batch of inputs alive (plus none left over from the last), not the parity set
    assert live_inputs[6] <= 1 and live_inputs[26] <= 1, live_inputs
    # parity + latency open one session at a time (the eager check above opens one at a time too)
    assert live_sessions["most"] == 1, live_sessions


def test_build_records_each_variant_beside_its_own_pytorch_rounds(vit_bundle: Path) -> None:
    """parity.json: each record's PyTorch figures come from its own pair, with that pair's rounds."""
    parity = json.loads((vit_bundle / "parity.json").read_text())
    method = parity["latency_conditions"]["vision"]["method"]
    assert method["pairing"].startswith("pytorch-eager-cpu and one variant") and method["budget_s"] == 15.0
    for record in parity["records"]:
        pair = method["per_variant"][record["variant"]]
        cpu, torch_lat = record["latency"]["cpu"], record["latency"]["pytorch-eager-cpu"]
        assert cpu["runs"] == torch_lat["runs"] == pair["rounds"] * pair["runs_per_round"]
        assert cpu["vs_pytorch"]["rounds"] == pair["rounds"] and pair["applied"] is False  # the tiny model fits
        assert 0 < pair["seconds"] < 60 and pair["budget_s"] == 15.0


def test_budget_keeps_a_plan_that_fits_and_shrinks_one_that_does_not() -> None:
    assert budgeted(5, 4, 0.1, 15.0) == (5, 4)  # 20 calls x 0.1 s = 2 s
    assert budgeted(5, 4, 3.0, 15.0) == (MIN_ROUNDS, 1)  # ViT-L-like: 5 rounds of one call, over budget but the floor
    assert budgeted(5, 4, 1.0, 15.0) == (15, 1)  # 20 calls x 1 s do not fit: 15 single-call rounds do
    assert budgeted(10, 4, 0.5, 15.0) == (30, 1)
    assert budgeted(3, 1, 10.0, 1.0) == (3, 1)  # never more rounds than asked calls


def test_interleaved_under_a_budget_runs_single_call_rounds() -> None:
    def slow() -> None:
        time.sleep(0.02)

    def fast() -> None:
        time.sleep(0.005)

    start = time.perf_counter()
    result = interleaved({"slow": slow, "fast": fast}, rounds=5, runs_per_round=4, warmup=3, budget_s=0.3)
    took = time.perf_counter() - start
    assert result.runs_per_round == 1 and MIN_ROUNDS <= result.rounds < 20, (result.rounds, result.runs_per_round)
    assert result.stats["slow"]["runs"] == result.rounds and len(result.round_p50["fast"]) == result.rounds
    assert result.conditions["budget"]["applied"] is True and result.conditions["budget"]["planned_rounds"] == 5
    ratio = result.ratio("slow", "fast")
    assert ratio["rounds"] == result.rounds and 1.5 < ratio["median"] < 8 and ratio["q1"] <= ratio["median"] <= ratio["q3"]
    assert took < 1.5  # unbounded: 3 warm-up + 20 timed calls of each = 0.58 s of sleep alone, here about 0.3 + warm-up
    unbounded = interleaved({"fast": fast}, rounds=2, runs_per_round=2, warmup=1, budget_s=10.0)
    assert (unbounded.rounds, unbounded.runs_per_round) == (2, 2) and unbounded.conditions["budget"]["applied"] is False
    assert np.isfinite(unbounded.stats["fast"]["p50_ms"])


def test_offloaded_weights_come_back_equal_and_tied_and_on_first_forward() -> None:
    """Inside `offloaded` the weights are empty (the memory is given back); on leaving, or on
    the first forward of any submodule (a family that runs the model meanwhile), the same
    values come back, tied weights still one tensor."""
    import torch

    from vlm_export.torch_offload import offloaded

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 16))
    model[2].weight = model[0].weight  # tied, as a language model's head
    model.register_buffer("scale", torch.full((3,), 2.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.tensor([[1, 2, 3]])
    expected = model(tokens)
    with offloaded(model) as parked:
        assert all(p.numel() == 0 for p in model.parameters()) and model.scale.numel() == 0
        assert not parked.restored
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model[2].weight is model[0].weight and model[2].weight.data_ptr() == model[0].weight.data_ptr()
    with offloaded(model) as parked:
        got = model(tokens)  # the hook brings every weight back before the first submodule runs
        assert parked.restored and torch.equal(got, expected)
    assert torch.equal(model(tokens), expected)


def test_check_against_torch_runs_pytorch_before_making_its_session(tiny_vit, vit_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's outputs at every check batch, then PyTorch's mapped pages handed back, then
    the session: on ViT-B/16 the two models' weights side by side were the export stage's
    peak (1366 MiB of its 1456; benchmarks/results/build_memory.txt, session 9)."""
    import vlm_export.export.checks as checks
    import vlm_export.heap as heap
    import vlm_export.runtime.session as runtime_session

    _, _, spec, _ = tiny_vit
    events: list[str] = []

    def logged(name: str, function):  # noqa: ANN001, ANN202 - wraps any callable
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            events.append(name)
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(checks, "torch_outputs", logged("pytorch", checks.torch_outputs))
    monkeypatch.setattr(heap, "drop_mapped_pages", logged("pages handed back", heap.drop_mapped_pages))
    monkeypatch.setattr(heap, "trim_heap", logged("heap returned", heap.trim_heap))
    monkeypatch.setattr(runtime_session, "create_session", logged("session", runtime_session.create_session))
    worst = checks.check_against_torch(spec, vit_bundle / "vision" / "vision.fp32.onnx")
    assert events == ["pytorch"] * len(checks.CHECK_BATCHES) + ["pages handed back", "session", "heap returned"], events
    assert set(worst) == {f"batch{b}" for b in checks.CHECK_BATCHES}
    assert all(0.0 <= v < 1e-4 for v in worst.values()), worst  # the check still compares: FP32 graph vs PyTorch


def test_parity_stream_runs_one_sample_at_a_time_with_the_same_chunks(tiny_vit) -> None:
    """The build's parity stream (run_batch=PARITY_RUN_BATCH) still makes images 8 at a time
    (a family's per-chunk samples, such as CLIP's prompts, are not repeated), runs them one
    sample at a time, and gives the outputs of runs of 8 (to float rounding)."""
    from vlm_export.build_parity import PARITY_RUN_BATCH
    from vlm_export.export import torch_outputs
    from vlm_export.verify.feeds import SampleStream, run_stream

    family, loaded, spec, photos = tiny_vit
    images = [photos[i % len(photos)] for i in range(11)]
    chunks: list[int] = []

    def preprocess(batch: list, inputs: tuple | None) -> dict:
        chunks.append(len(batch))
        return family.sample_inputs(loaded, batch, inputs)

    runs: list[int] = []

    def run(feed: dict) -> dict:
        runs.append(len(feed["pixel_values"]))
        return torch_outputs(spec, feed)

    stream = SampleStream(images, preprocess, run_batch=PARITY_RUN_BATCH).for_inputs(["pixel_values"])
    one_at_a_time = run_stream(run, stream)
    assert PARITY_RUN_BATCH == 1 and chunks == [8, 3] and runs == [1] * 11, (chunks, runs)
    eights = run_stream(lambda f: torch_outputs(spec, f), SampleStream(images, preprocess).for_inputs(["pixel_values"]))
    assert one_at_a_time.keys() == eights.keys()
    for name, value in eights.items():
        assert one_at_a_time[name].shape == value.shape == (11, *value.shape[1:])
        np.testing.assert_allclose(one_at_a_time[name], value, rtol=1e-5, atol=1e-5)
