"""INT8 verdicts hold on every CPU (issue 13).

The QDQ variant's verdict is computed with Q/DQ in float (what TensorRT's explicit
quantization emulates), never with whichever integer kernels this machine's onnxruntime
picks; the CPU variant's weights are 7-bit, so its integer kernels are exact on AVX2
without VNNI as on AVX-512 VNNI. Where `qemu-x86_64` exists, the last tests run the same
graphs on an emulated Haswell (AVX2, no AVX-512, no VNNI) and compare with this CPU.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm_export.recipes import Evaluation, recipe
from vlm_export.runtime.cpu import cpu_info, has_int8_dot_product, int8_cpu_warning
from vlm_export.verify.evaluation import integer_kernel_session, verdict_session
from vlm_export.verify.metrics import compare
from vlm_export.families.base import ParityKind


def _records(bundle: Path) -> dict[str, dict]:
    parity = json.loads((bundle / "parity.json").read_text())
    return {r["variant"]: r for r in parity["records"]}


def _parity_feed(bundle: Path, photo_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The parity images and PyTorch logits exactly as the build computed them (family API)."""
    import torch

    from vlm_export.calibration.folder import load_image_folder
    from vlm_export.families import detect

    source = Path(json.loads((bundle / "manifest.json").read_text())["source"]["path"])
    family = detect(source)
    loaded = family.load(source)
    images = [img for _, img in load_image_folder(photo_dir, "--parity-images", print)]
    pixel_values = family.sample_inputs(loaded, images)["pixel_values"]
    (spec,) = family.components(loaded)
    with torch.no_grad():
        logits = spec.module(torch.from_numpy(pixel_values))
    return pixel_values, (logits[0] if isinstance(logits, tuple) else logits).numpy()


def test_qdq_verdict_comes_from_float_qdq_not_integer_kernels(vit_bundle: Path, photo_dir: Path) -> None:
    """Recompute the int8 record both ways: the recorded verdict metrics are the float ones."""
    record = _records(vit_bundle)["int8"]
    assert record["evaluation"] == Evaluation.FLOAT_QDQ.value
    path = vit_bundle / "vision" / "vision.int8.onnx"
    pixel_values, reference = _parity_feed(vit_bundle, photo_dir)
    float_qdq = verdict_session(path, "int8").run(["logits"], {"pixel_values": pixel_values})[0]
    kernels = integer_kernel_session(path).run(["logits"], {"pixel_values": pixel_values})[0]
    judged = compare(reference, float_qdq, ParityKind.LOGITS)
    beside = compare(reference, kernels, ParityKind.LOGITS)
    assert record["metrics"]["cosine_min"] == pytest.approx(judged["cosine_min"], abs=1e-7)
    assert record["beside"]["ort_cpu_kernels"]["cosine_min"] == pytest.approx(beside["cosine_min"], abs=1e-7)
    assert not np.array_equal(float_qdq, kernels)  # two different computations, and the verdict took the float one
    assert record["passed"] == (judged["cosine_min"] >= record["tolerance"]["cosine_min"])


def test_every_variant_records_how_it_was_judged(vit_bundle: Path) -> None:
    manifest = json.loads((vit_bundle / "manifest.json").read_text())
    for key, variant in manifest["components"]["vision"]["variants"].items():
        assert variant["evaluation"] == recipe(key).evaluation.value
        assert _records(vit_bundle)[key]["evaluation"] == variant["evaluation"]
    machine = json.loads((vit_bundle / "parity.json").read_text())["machine"]
    assert machine["model"] == cpu_info()["model"] and machine["isa"] == cpu_info()["isa"]
    assert manifest["parity"]["verdict_cpu"]["isa"] == machine["isa"]


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 weight initializers of the CPU variant's integer MatMuls."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
            tensor = inits.get(node.input[1])
            if tensor is not None:
                weights.append(numpy_helper.to_array(tensor))
    return weights


def test_cpu_variant_weights_cannot_saturate_avx2_pairs(vit_bundle: Path) -> None:
    """|w| ≤ 64 and u8 activations: 2·255·64 = 32640 fits the int16 that AVX2's vpmaddubsw adds into."""
    weights = _int8_weights(vit_bundle / "vision" / "vision.int8-cpu.onnx")
    assert weights and all(w.dtype == np.int8 for w in weights)
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert 32 < largest <= 64  # the 7-bit range is used, and never exceeded
    assert 2 * 255 * largest <= np.iinfo(np.int16).max


def test_cpu_info_reads_isa_flags(tmp_path: Path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma bmi2\n\n")
    info = cpu_info.__wrapped__(fake)
    assert info["model"] == "AMD EPYC 7B13" and info["isa"] == ["avx2"]
    assert not has_int8_dot_product(info["isa"], "x86_64")
    assert has_int8_dot_product(["avx2", "avx512_vnni"], "x86_64") and has_int8_dot_product([], "aarch64")


AVX2 = {"model": "AMD EPYC 7B13", "arch": "x86_64", "isa": ["avx2"]}
VNNI = {"model": "Intel Xeon 8375C", "arch": "x86_64", "isa": ["avx2", "avx512f", "avx512_vnni"]}


@pytest.mark.parametrize(("recipe_name", "verdict_cpu", "here", "warns"), [
    ("dynamic-matmul-reduce-range+ort-cpu-fusions", VNNI, AVX2, False),  # exact everywhere
    ("dynamic-matmul+ort-cpu-fusions", VNNI, AVX2, True),  # an older bundle's full-range weights
    ("dynamic-matmul+ort-cpu-fusions", AVX2, AVX2, False),  # verified on the same kind of CPU
    ("dynamic-matmul+ort-cpu-fusions", AVX2, VNNI, False),  # VNNI does not saturate
    ("qdq-static", VNNI, AVX2, True),  # the TensorRT graph on saturating CPU kernels
    ("qdq-static", VNNI, VNNI, False),
])
def test_int8_cpu_warning(recipe_name: str, verdict_cpu: dict, here: dict, warns: bool) -> None:
    message = int8_cpu_warning(recipe_name, verdict_cpu, here)
    assert (message is not None) == warns
    if warns:
        assert "AMD EPYC 7B13" in message and "saturate" in message


def test_runtime_warns_once_for_a_full_range_cpu_variant_on_avx2(vit_bundle: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import vlm_export.runtime.cpu as cpu
    from vlm_export.runtime import load
    from vlm_export.runtime.manifest import sha256_file

    bundle = tmp_path / "old"
    shutil.copytree(vit_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["components"]["vision"]["variants"]["int8-cpu"]["recipe"] = "dynamic-matmul+ort-cpu-fusions"
    manifest["parity"]["verdict_cpu"] = VNNI
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert sha256_file(bundle / "vision" / "vision.int8-cpu.onnx")  # the graph itself is untouched
    monkeypatch.setattr(cpu, "cpu_info", lambda: AVX2)
    with caplog.at_level("WARNING", logger="vlm_export.runtime"):
        load(bundle, precision="int8")
        load(bundle, precision="int8")
    warnings = [r.getMessage() for r in caplog.records if "saturate" in r.getMessage()]
    assert len(warnings) == 1 and "Intel Xeon 8375C" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm_export.runtime"):
        load(vit_bundle, precision="int8")  # the current recipe: nothing to warn about
    assert not [r for r in caplog.records if "saturate" in r.getMessage()]


# --- the same graphs on an emulated AVX2 CPU without VNNI -------------------------------

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason="qemu-x86_64 (Debian's qemu-user; .ci/run installs it) is needed to emulate an AVX2-only CPU on x86_64",
)

_RUN_GRAPHS = r"""
import sys, numpy as np, onnxruntime as ort
data = dict(np.load(sys.argv[1]))
out = {}
for i, (path, level) in enumerate(zip(sys.argv[2::2], sys.argv[3::2])):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out[f"y{i}"] = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
np.savez(sys.argv[1] + ".out.npz", **out)
"""


def _on_haswell(tmp_path: Path, x: np.ndarray, graphs: list[tuple[Path, str]]) -> list[np.ndarray]:
    """Run ONNX graphs (path, ORT optimisation level) under `qemu-x86_64 -cpu Haswell`."""
    feed = tmp_path / "feed.npz"
    np.savez(feed, x=x)
    args = [a for path, level in graphs for a in (str(path), level)]
    proc = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", _RUN_GRAPHS, str(feed), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(str(feed) + ".out.npz")
    return [out[f"y{i}"] for i in range(len(graphs))]


def _saturating_matmul(tmp_path: Path) -> Path:
    """u8 255 × s8 127 over K=64: exact 2,072,640; AVX2's int16 pair sums give 1,048,544."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((64, 4), 127, np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "sat",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])], [weight])
    path = tmp_path / "sat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@needs_qemu
def test_emulated_avx2_saturates_full_range_weights(tmp_path: Path) -> None:
    """The control: the emulated CPU really runs AVX2's saturating u8·s8 kernel."""
    (y,) = _on_haswell(tmp_path, np.full((1, 64), 255, np.uint8), [(_saturating_matmul(tmp_path), "ORT_ENABLE_ALL")])
    assert int(y[0, 0]) == 32 * 32767 != 64 * 255 * 127


@needs_qemu
def test_verdicts_are_the_same_on_avx2_without_vnni(vit_bundle: Path, photo_dir: Path, tmp_path: Path) -> None:
    """int8-cpu on CPU kernels and int8 with float Q/DQ give this CPU's numbers on Haswell;
    the QDQ graph on integer kernels is what differs (why it is never the verdict)."""
    x, _ = _parity_feed(vit_bundle, photo_dir)
    cpu_path, qdq_path = vit_bundle / "vision" / "vision.int8-cpu.onnx", vit_bundle / "vision" / "vision.int8.onnx"
    here_cpu = integer_kernel_session(cpu_path).run(None, {"pixel_values": x})[0]
    here_qdq = verdict_session(qdq_path, "int8").run(None, {"pixel_values": x})[0]
    avx2_cpu, avx2_qdq = _on_haswell(tmp_path, x, [(cpu_path, "ORT_ENABLE_ALL"), (qdq_path, "ORT_DISABLE_ALL")])
    scale = float(np.abs(here_cpu).max())
    assert np.abs(avx2_cpu - here_cpu).max() <= 1e-5 * scale
    assert np.abs(avx2_qdq - here_qdq).max() <= 1e-5 * scale


@needs_qemu
def test_weight_only_kernels_agree_on_avx2_without_vnni(tmp_path: Path) -> None:
    """The language model's MatMulNBits recipes (int4/int8-wo; "-acc4" quantizes activations
    to int8 inside the kernel) give this CPU's numbers on Haswell too, outliers included:
    4- and 8-bit weights times int8 activations never reach AVX2's int16 pair-sum limit."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vlm_export.quantize.weight_only import CONFIGS, to_weight_only

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((512, 256)) * 0.05).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "lm_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])], [weight])
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    x = (rng.standard_normal((4, 512)) * 3).astype(np.float32)
    x[0, :8] = 40.0  # an activation outlier, as LLM hidden states have
    graphs = [(to_weight_only(fp32, tmp_path / f"{key}.onnx", config), "ORT_ENABLE_ALL") for key, config in CONFIGS.items()]
    assert any(CONFIGS[key].accuracy_level == 4 for key in CONFIGS)  # the ISA-dependent path is covered
    here = [integer_kernel_session(path).run(None, {"x": x})[0] for path, _ in graphs]
    for key, ours, avx2 in zip(CONFIGS, here, _on_haswell(tmp_path, x, graphs)):
        assert np.abs(avx2 - ours).max() <= 1e-5 * float(np.abs(ours).max()), key
