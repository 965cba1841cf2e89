"""What a user ships: INT8 vision + weight-only language model, answers vs `model.generate` FP32.

Tiny real-architecture checkpoints (tests/_tiny_lm.py), random weights: token-id parity and
logits cosines, never accuracy claims. LLaVA goes through `vlm-export build` (parity.json,
report, runtime); Qwen2-VL through its family's generation parity on graphs made here
(a whole Qwen2-VL build with INT8 takes minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _combo_bundle import PHOTOS, llava_int8_int4_bundle
from vlm_export.errors import InputError
from vlm_export.verify.tolerances import Check, bounds, resolve

DEPLOYED = "generate deployed"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    return llava_int8_int4_bundle(tmp_path_factory, photo_dir)


def _tolerance(pair: str) -> dict[str, float]:
    return resolve(bounds(Check.GENERATION, pair))


def test_llava_parity_json_records_each_deployed_pair(bundle: Path) -> None:
    records = json.loads((bundle / "parity.json").read_text())["end_to_end"]
    deployed = {r["variant"]: r for r in records if r["name"] == DEPLOYED}
    alone = {r["variant"]: r for r in records if r["name"] == "generate"}
    assert set(deployed) == {"int8-cpu+int4-cpu", "int8-cpu+int8-wo", "int8+int4"}  # no fp16 built: no fp16 pair
    expected = {"int8-cpu+int4-cpu": ("cpu-int4", "int8+int4"), "int8-cpu+int8-wo": ("cpu-int8", "int8+int8"),
                "int8+int4": ("gpu-int4", "int8+int4")}
    for key, (name, pair) in expected.items():
        rec = deployed[key]
        vision, lm = key.split("+")
        assert rec["deployment"] == name and rec["components"] == {"vision_projector": vision, "language_model": lm}
        assert rec["passed"], rec["failures"]
        assert rec["tolerance"] == _tolerance(pair) and rec["samples"] == PHOTOS
        assert len(rec["first_divergence"]) == PHOTOS and len(rec["answers"]) == PHOTOS
        cos = rec["metrics"]["step_logits_cosine_min"]
        assert _tolerance(pair)["step_logits_cosine_min"] <= cos < 1.0  # quantized twice: close, not equal
        # the INT8 vision tower is really in the loop: the same LM behind FP32 vision scores otherwise
        assert alone[lm]["components"]["vision_projector"] == "fp32"
        assert cos != alone[lm]["metrics"]["step_logits_cosine_min"]
    assert _tolerance("int8+int4") == {"step_logits_cosine_min": 0.95}
    assert _tolerance("int8+int8") == {"step_logits_cosine_min": 0.99}


def test_llava_report_shows_the_answers_table(bundle: Path) -> None:
    markdown = (bundle / "report.md").read_text()
    html = (bundle / "report.html").read_text()
    assert "## Answers vs model.generate" in markdown and "Answers vs model.generate" in html
    rec = next(r for r in json.loads((bundle / "parity.json").read_text())["end_to_end"]
               if r["name"] == DEPLOYED and r["variant"] == "int8-cpu+int4-cpu")
    firsts = ", ".join("same" if f < 0 else str(f) for f in rec["first_divergence"])
    row = next(line for line in markdown.splitlines() if line.startswith("| deployed cpu-int4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["deployed cpu-int4", "int8-cpu", "int4-cpu", "PASS", f"{round(rec['metrics']['exact_match'] * PHOTOS)}/{PHOTOS}"]
    assert cells[5] == firsts and cells[6] == f"{rec['metrics']['step_logits_cosine_min']:.6f} (≥ 0.95)"
    assert "deployed cpu-int4" in html
    assert not [line for line in markdown.splitlines() if line.startswith("| generate")]  # not repeated in the end-to-end table


def test_runtime_loads_the_deployed_pair_and_gives_its_answers(bundle: Path) -> None:
    """`component_variants` picks the vision and the LM variant apart; its greedy ids are the
    ones the deployed record holds (the runtime's numpy preprocessing vs the processor's)."""
    from vlm_export.families.generation_parity import PARITY_MAX_NEW_TOKENS, PARITY_PROMPT
    from vlm_export.runtime import load

    parity = json.loads((bundle / "parity.json").read_text())
    rec = next(r for r in parity["end_to_end"] if r["name"] == DEPLOYED and r["variant"] == "int8-cpu+int4-cpu")
    model = load(bundle, component_variants={"vision_projector": "int8-cpu", "language_model": "int4-cpu"})
    assert {n: r.variant.key for n, r in model.runners.items()} == {"vision_projector": "int8-cpu", "language_model": "int4-cpu"}
    for name, expected in zip(parity["samples"], rec["answers"]):
        model.generate(next(p for p in (bundle.parent / "photos").iterdir() if p.name == name), PARITY_PROMPT,
                       max_new_tokens=PARITY_MAX_NEW_TOKENS)
        assert model.last_generation.ids == expected, name
    # by precision alone the CPU gets INT8 + INT8-WO, and INT4 comes behind an FP32 tower
    assert {n: r.variant.key for n, r in load(bundle, precision="int8").runners.items()} == \
        {"vision_projector": "int8-cpu", "language_model": "int8-wo"}
    assert load(bundle, precision="int4").runners["vision_projector"].variant.key == "fp32"
    with pytest.raises(InputError, match="unknown component 'vision'"):
        load(bundle, component_variants={"vision": "int8-cpu"})
    with pytest.raises(InputError, match="unknown variant 'int8-cpu'.*int8-wo"):
        load(bundle, component_variants={"language_model": "int8-cpu"})


def test_qwen2_vl_deployed_pairs_hold_their_tolerance(tmp_path: Path, photo_dir: Path) -> None:
    from PIL import Image

    from _tiny_lm import save_tiny_qwen2_vl
    from vlm_export.export import export_component
    from vlm_export.families.qwen2_vl import Qwen2VLFamily
    from vlm_export.families.qwen2_vl_language import generation_parity
    from vlm_export.quantize.fp16 import to_fp16
    from vlm_export.quantize.int8 import to_int8_cpu
    from vlm_export.quantize.weight_only import CONFIGS, to_weight_only
    from vlm_export.recipes import precision_of

    family = Qwen2VLFamily()
    loaded = family.load(save_tiny_qwen2_vl(tmp_path / "model"))
    specs = {s.name: s for s in family.components(loaded)}
    paths = {name: {"fp32": export_component(specs[name], tmp_path / f"{name}.fp32.onnx")} for name in ("vision", "language_model")}
    for name in paths:
        paths[name]["fp16"] = to_fp16(paths[name]["fp32"], tmp_path / f"{name}.fp16.onnx")
    paths["vision"]["int8-cpu"] = to_int8_cpu(paths["vision"]["fp32"], tmp_path / "vision.int8-cpu.onnx")
    for key in ("int4-cpu", "int8-wo"):
        paths["language_model"][key] = to_weight_only(paths["language_model"]["fp32"], tmp_path / f"lm.{key}.onnx", CONFIGS[key])
    images = [Image.open(p).convert("RGB") for p in sorted(photo_dir.iterdir())[:PHOTOS]]
    records = {(r.name, r.variant): r for r in generation_parity(loaded, family, paths, images)}

    assert set(records) == {("generate", k) for k in ("fp32", "fp16", "int4-cpu", "int8-wo")} | \
        {(DEPLOYED, k) for k in ("int8-cpu+int4-cpu", "int8-cpu+int8-wo", "fp16+fp16")}
    for (name, key), rec in records.items():
        assert rec.passed, (name, key, rec.failures)
        if name == DEPLOYED:
            vision, lm = key.split("+")
            assert rec.details["components"] == {"vision": vision, "language_model": lm}
            assert rec.tolerance == _tolerance(f"{precision_of(vision)}+{precision_of(lm)}")
    assert records[("generate", "fp32")].metrics["exact_match"] == 1.0  # the FP32 reference path is exact
    for lm in ("int4-cpu", "int8-wo"):
        pair = records[(DEPLOYED, f"int8-cpu+{lm}")]
        alone = records[("generate", lm)]
        assert alone.details["components"] == {"vision": "fp32", "language_model": lm}
        assert pair.metrics["step_logits_cosine_min"] < 1.0
        assert pair.metrics["step_logits_cosine_min"] != alone.metrics["step_logits_cosine_min"]  # INT8 vision in the loop
    # FP16 + FP16 is the per-variant fp16 pair: the same answers, reused, judged on its own row
    fp16 = records[(DEPLOYED, "fp16+fp16")]
    assert fp16.details["answers"] == records[("generate", "fp16")].details["answers"]
    assert fp16.tolerance == {"step_logits_cosine_min": 0.999}


def test_chat_runs_the_deployed_pair(bundle: Path) -> None:
    from typer.testing import CliRunner

    from vlm_export.cli import app
    from vlm_export.runtime import load

    image = sorted((bundle.parent / "photos").iterdir())[0]
    question = "what is in this picture ?"
    expected = load(bundle, component_variants={"vision_projector": "int8-cpu", "language_model": "int4-cpu"}).generate(
        image, question, max_new_tokens=6)
    runner = CliRunner()
    result = runner.invoke(app, ["chat", str(bundle), str(image), question, "--max-new-tokens", "6",
                                 "--vision-variant", "int8-cpu", "--lm-variant", "int4-cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == expected
    assert "(vision_projector int8-cpu, language_model int4-cpu, cpu)" in result.stderr
    bad = runner.invoke(app, ["chat", str(bundle), str(image), question, "--lm-variant", "int8-cpu"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0
    assert "unknown variant 'int8-cpu' (--lm-variant); language_model has: fp32, int4-cpu" in bad.output
