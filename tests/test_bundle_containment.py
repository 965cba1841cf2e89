"""Every file read or written inside a bundle stays inside it; only regular files are
read; ONNX external data is contained and hashed without `onnx` (issue 12)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner, Result

from vlm_export.cli import app
from vlm_export.errors import BundleError
from vlm_export.runtime import load
from vlm_export.runtime.manifest import sha256_file
from vlm_export.runtime.onnx_external import external_data_entries, external_locations

SECRET = '{"records": [], "secret": "do-not-copy-me"}'
FP32_ONNX = "vision/vision.fp32.onnx"


@pytest.fixture()
def bundle_copy(vit_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(vit_bundle, dst)
    return dst


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.json"
    path.write_text(SECRET)
    return path


def _edit(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fp32(data: dict[str, Any]) -> dict[str, Any]:
    return data["components"]["vision"]["variants"]["fp32"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _bench(bundle: Path, *extra: str) -> Result:
    return _invoke("bench", str(bundle), "--runs", "1", "--batch", "1", "--variants", "fp32", *extra)


def _one_error(result: Result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# --- reads and writes of report files -------------------------------------------------


def test_parity_file_outside_the_bundle_is_refused(bundle_copy: Path, secret: Path, tmp_path: Path) -> None:
    _edit(bundle_copy, lambda d: d["parity"].update(file="../secret.json"))
    line = _one_error(_bench(bundle_copy))
    assert "'../secret.json' is not a plain relative path inside the bundle" in line
    assert "do-not-copy-me" not in (bundle_copy / "report.md").read_text()
    assert "../secret.json" in _one_error(_invoke("compare", str(bundle_copy), str(bundle_copy)))


def test_symlinked_report_is_replaced_not_followed(bundle_copy: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.md"
    victim.write_text("mine")
    (bundle_copy / "report.md").unlink()
    (bundle_copy / "report.md").symlink_to(victim)
    result = _bench(bundle_copy)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "mine"
    assert not (bundle_copy / "report.md").is_symlink()
    assert (bundle_copy / "report.md").read_text().startswith("# ")


def test_symlinked_plots_folder_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "my-plots"
    elsewhere.mkdir()
    (elsewhere / "holiday.png").write_bytes(b"\x89PNG keep me")
    shutil.rmtree(bundle_copy / "plots")
    (bundle_copy / "plots").symlink_to(elsewhere)
    assert _one_error(_bench(bundle_copy)) == (f"error: bundle folder '{bundle_copy / 'plots'}' is a symlink; "
                                               "the tool never writes through one (remove it)")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["holiday.png"]
    assert (elsewhere / "holiday.png").read_bytes() == b"\x89PNG keep me"


def test_symlinked_bench_json_is_not_copied(bundle_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "other-bench.json"
    outside.write_text(json.dumps({"format_version": 1, "providers": {"leak": {"results": [], "secret": "do-not-copy-me"}}}))
    before = outside.read_text()
    (bundle_copy / "bench.json").symlink_to(outside)
    result = _bench(bundle_copy)
    assert result.exit_code == 0, result.output
    assert outside.read_text() == before
    written = bundle_copy / "bench.json"
    assert not written.is_symlink() and "do-not-copy-me" not in written.read_text()
    assert list(json.loads(written.read_text())["providers"]) == ["cpu"]


def test_bench_on_a_read_only_bundle_prints_and_exits_0(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated with EROFS from the temp-file call (the tests run as root, where chmod does not bind)."""
    import vlm_export.runtime.bundle_files as bundle_files

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(bundle_files, "temp_file", refuse)  # where the bundle writer makes its temp file
    before = sorted(p.name for p in bundle_copy.iterdir())
    result = _bench(bundle_copy)
    assert result.exit_code == 0, result.output
    assert "vision" in result.output and "fp32" in result.output  # the table is printed
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: measurements not saved")]
    assert warnings == [f"warning: measurements not saved: cannot write '{bundle_copy / 'bench.json'}' (read-only filesystem); "
                        "pass --output FILE to save them elsewhere"]
    assert sorted(p.name for p in bundle_copy.iterdir()) == before


def test_bench_output_elsewhere_leaves_the_bundle_alone(bundle_copy: Path, tmp_path: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in bundle_copy.iterdir()}
    out = tmp_path / "results.json"
    result = _bench(bundle_copy, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["providers"]["cpu"]["results"][0]["variant"] == "fp32"
    assert {p.name: p.stat().st_mtime_ns for p in bundle_copy.iterdir()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threads", "100000"], "error: --threads must be 1.."),
        (["--threads", "0"], "error: --threads must be 1.."),
        (["--batch", "1000000"], "error: --batch '1000000' must be a comma list of positive integers up to 4096"),
        (["--runs", "0"], "error: --runs must be 1..100000 (got 0)"),
        (["--runs", "-5"], "error: --runs must be 1..100000 (got -5)"),
    ],
)
def test_bench_ranges_are_checked_up_front(vit_bundle: Path, args: list[str], message: str) -> None:
    result = _invoke("bench", str(vit_bundle), *args)
    assert _one_error(result).startswith(message)


# --- FIFOs: read only regular files ------------------------------------------------------


def _cli_subprocess(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process: a hang becomes a TimeoutExpired, not a stuck test run."""
    return subprocess.run([sys.executable, "-m", "vlm_export.cli", *argv], capture_output=True, text=True, timeout=120)


def test_fifo_as_run_image_is_one_line(vit_bundle: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "cat.png"
    os.mkfifo(fifo)
    proc = _cli_subprocess("run", str(vit_bundle), str(fifo))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot read image '{fifo}': not a regular file (a FIFO or device?); pass a JPEG/PNG/WebP file"
    ]


def test_fifo_as_parity_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "parity.json").unlink()
    os.mkfifo(bundle_copy / "parity.json")
    proc = _cli_subprocess("compare", str(bundle_copy), str(bundle_copy))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: bundle file '{(bundle_copy / 'parity.json').resolve()}' is not a regular file (a FIFO, device or folder?); "
        "rebuild or re-copy the bundle"
    ]


def test_fifo_inside_an_image_folder_is_skipped(photo_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    shutil.copytree(photo_dir, folder)
    os.mkfifo(folder / "zz-pipe.png")
    code = f"""
from pathlib import Path
from vlm_export.calibration.folder import load_image_folder
warnings = []
images = load_image_folder(Path({str(folder)!r}), "--calibration", warnings.append)
print(len(images), "|".join(warnings))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, warnings = proc.stdout.strip().split(" ", 1)
    assert int(count) == len(list(photo_dir.iterdir()))
    assert warnings == f"--calibration: skipped cannot read image '{folder / 'zz-pipe.png'}': not a regular file (a FIFO or device?); pass a JPEG/PNG/WebP file"


# --- engine, inspect and compare refuse what run refuses -------------------------------


def test_engine_dry_run_refuses_an_escaping_onnx_path(bundle_copy: Path) -> None:
    _edit(bundle_copy, lambda d: _fp32(d).update(onnx="../../etc/passwd"))
    result = _invoke("engine", str(bundle_copy), "--target", "desktop-ada", "--dry-run")
    assert "'../../etc/passwd' is not a plain relative path inside the bundle" in _one_error(result)
    assert "trtexec" not in result.output


def test_engine_dry_run_refuses_a_tampered_onnx(bundle_copy: Path) -> None:
    with (bundle_copy / FP32_ONNX).open("ab") as fh:
        fh.write(b"\0")
    result = _invoke("engine", str(bundle_copy), "--target", "desktop-ada", "--dry-run")
    assert "checksum mismatch" in _one_error(result) and "trtexec" not in result.output


def test_inspect_exits_1_when_a_check_fails(bundle_copy: Path) -> None:
    with (bundle_copy / FP32_ONNX).open("ab") as fh:
        fh.write(b"\0")
    result = _invoke("inspect", str(bundle_copy))
    assert "BAD" in result.output
    assert _one_error(result, 1) == f"error: 1 variant(s) of '{bundle_copy}' failed their checks: vision/fp32; rebuild or re-copy the bundle"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: (b / FP32_ONNX).open("ab").write(b"\0"), "checksum mismatch"),
        (lambda b: _edit(b, lambda d: d.update(family="clip")), "cannot compare a 'vit' bundle"),
        (lambda b: _edit(b, lambda d: d["components"].update(text=d["components"]["vision"])), "different components (vision vs text, vision)"),
    ],
)
def test_compare_refuses_tampered_or_unlike_bundles(vit_bundle: Path, bundle_copy: Path, edit: Callable[[Path], Any], message: str) -> None:
    edit(bundle_copy)
    assert message in _one_error(_invoke("compare", str(vit_bundle), str(bundle_copy)))


# --- ONNX external data ------------------------------------------------------------------


def _externalize(bundle: Path, list_it: bool = True) -> Path:
    """Re-save the fp32 graph with its weights in vision/weights.bin and fix the manifest."""
    import onnx

    path = bundle / FP32_ONNX
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="weights.bin")
    entries = external_data_entries(path, bundle) if list_it else []
    _edit(bundle, lambda d: _fp32(d).update(sha256=sha256_file(path), external_data=entries))
    return bundle / "vision" / "weights.bin"


def test_external_data_entries_for_the_build(bundle_copy: Path) -> None:
    data = _externalize(bundle_copy)
    assert external_data_entries(bundle_copy / FP32_ONNX, bundle_copy) == [
        {"file": "vision/weights.bin", "sha256": sha256_file(data), "bytes": data.stat().st_size}
    ]
    assert load(bundle_copy, precision="fp32").classify(bundle_copy / "plots" / "errors.png", top_k=1)[0][0].startswith("class_")


def test_tampered_external_data_is_refused(bundle_copy: Path) -> None:
    data = _externalize(bundle_copy)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="checksum mismatch for external-data file"):
        load(bundle_copy, precision="fp32")
    result = _invoke("inspect", str(bundle_copy))
    assert "BAD" in result.output and _one_error(result, 1).endswith("failed their checks: vision/fp32; rebuild or re-copy the bundle")


def test_unlisted_external_data_is_refused(bundle_copy: Path) -> None:
    _externalize(bundle_copy, list_it=False)
    with pytest.raises(BundleError, match="uses external data 'weights.bin' that the manifest does not list"):
        load(bundle_copy, precision="fp32")


@pytest.mark.parametrize("location", ["../x.bin", "/etc/passwd", "a/../../x.bin"])
def test_escaping_external_location_is_refused(bundle_copy: Path, location: str) -> None:
    import onnx

    _externalize(bundle_copy)
    path = bundle_copy / FP32_ONNX
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.external_data]
    for entry in external[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())
    _edit(bundle_copy, lambda d: _fp32(d).update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        load(bundle_copy, precision="fp32")
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        external_data_entries(path, bundle_copy)


def _graph_with_every_tensor_kind(folder: Path) -> Path:
    """Initializer, sparse initializer, Constant attribute and an If subgraph's
    initializer, all external: every place the reader must look."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    big = lambda name, seed: numpy_helper.from_array(np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32), name)  # noqa: E731
    then_graph = helper.make_graph([helper.make_node("Identity", ["t_w"], ["t_out"])], "then", [],
                                   [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [64, 64])], [big("t_w", 3)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["w"], ["e_out"])], "else", [],
                                   [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [64, 64])])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.arange(2000, dtype=np.float32), "sp"),
                                       numpy_helper.from_array(np.arange(2000, dtype=np.int64)), [64, 64])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=big("c_val", 2)),
        helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 64])], [big("w", 1)], sparse_initializer=[sparse])
    model = helper.make_model(graph)
    for tensor in (model.graph.sparse_initializer[0].values, model.graph.sparse_initializer[0].indices):
        # onnx never externalizes sparse tensors itself; mark them as a hostile file could
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", f"sparse-{tensor.name or 'indices'}.bin"
    path = folder / "every.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    return path


def test_reader_matches_onnx_and_runs_without_it(vit_bundle: Path, tmp_path: Path) -> None:
    """The reader finds exactly the locations onnx's own helper finds, on the bundle's
    real graphs and on a graph with every tensor kind, in an interpreter without onnx."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    graphs = [_graph_with_every_tensor_kind(tmp_path)]
    for precision in ("fp32", "fp16", "int8"):
        path = tmp_path / f"{precision}.onnx"
        onnx.save(onnx.load(str(vit_bundle / f"vision/vision.{precision}.onnx")), str(path), save_as_external_data=True,
                  all_tensors_to_one_file=precision != "fp16", location=f"{precision}.bin", size_threshold=256)
        graphs.append(path)
    expected = {}
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        sparse = [t for s in model.graph.sparse_initializer for t in (s.values, s.indices)]
        tensors = [*_get_all_tensors(model), *sparse]
        expected[str(path)] = sorted({e.value for t in tensors if uses_external_data(t) for e in t.external_data if e.key == "location"})
    assert expected[str(graphs[0])] == ["c_val", "sparse-indices.bin", "sparse-sp.bin", "t_w", "w"]
    assert expected[str(graphs[1])] == ["fp32.bin"] and len(expected[str(graphs[2])]) > 5
    code = f"""
import json, sys
sys.modules["onnx"] = None  # the runtime-only install
from vlm_export.runtime.onnx_external import external_locations
print(json.dumps({{p: sorted(external_locations(p)) for p in {[str(g) for g in graphs]!r}}}))
assert sys.modules.get("onnx") is None
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
    assert external_locations(vit_bundle / FP32_ONNX) == []


def test_reader_field_numbers_match_onnx_proto() -> None:
    import onnx

    from vlm_export.runtime.onnx_external import _MESSAGES

    protos = {"model": onnx.ModelProto, "function": onnx.FunctionProto, "graph": onnx.GraphProto, "node": onnx.NodeProto,
              "attribute": onnx.AttributeProto, "sparse": onnx.SparseTensorProto}
    for kind, fields in _MESSAGES.items():
        by_number = {f.number: f for f in protos[kind].DESCRIPTOR.fields}
        for number, child in fields.items():
            assert by_number[number].message_type.name == {**{k: v.DESCRIPTOR.name for k, v in protos.items()}, "tensor": "TensorProto"}[child]
    tensor = {f.name: f.number for f in onnx.TensorProto.DESCRIPTOR.fields}
    assert (tensor["external_data"], tensor["data_location"]) == (13, 14)


def test_truncated_onnx_is_one_bundle_error(tmp_path: Path, vit_bundle: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes((vit_bundle / FP32_ONNX).read_bytes()[:1000])
    with pytest.raises(BundleError, match="is not a valid ONNX file"):
        external_locations(path)
