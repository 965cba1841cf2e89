"""vlm-export deletes only what it created: one test per class of deletion.

Every deletion in the package goes through `vlm_export.cleanup` with a proof of
ownership supplied by the code that created the path. The classes:

1. temporary files/folders (name tag `TEMP_TAG`, or inside such a folder), among them
   the INT8 pre-pass's scratch copy of an inline graph (quantize.preprocess), made beside
   the prepared graph; and the graph writers that fill such folders
   (export.layout_stream) create files only, never replacing one; and every graph write's
   scratch folder (export.external.staged_output), which also removes the graph's own
   external-data file when the graph it replaces named it and the new one is inline;
2. staging folders of a build (their marker);
3. folders set aside during a `--force` swap (a `.partial-` sibling of OUT that is a
   bundle or a marked staging folder), and the swap's journal;
4. OUT's lock file (its suffix);
5. the report's plots (the file names the report writes);
6. caches the tool fills (the converted default model: its marker; the default image
   sets: their exact SOURCES.md).
7. scratch folders from `tempfile.TemporaryDirectory` in the system temp folder (parked
   PyTorch weights, the calibration's augmented graph, the inline export's data file, the
   tokenizer.json written at load, ...): the stdlib removes exactly the fresh folder it made;
   every site is listed and checked for a fresh folder in the system temp folder.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import vlm_export
from vlm_export.cleanup import TEMP_TAG, is_temp, remove_empty_dir, remove_file, remove_tree, temp_dir, temp_file
from test_blip import tiny_blip_dir  # noqa: F401
from test_clip import tiny_clip_dir  # noqa: F401
from vlm_export.errors import InputError

PACKAGE = Path(vlm_export.__file__).parent
DELETING_CALLS = {("shutil", "rmtree"), ("os", "unlink"), ("os", "remove"), ("os", "rmdir"), ("os", "removedirs")}
DELETING_METHODS = {"unlink", "rmdir"}


def _deleting_calls(source: str) -> list[int]:
    """Line numbers of calls that delete: shutil.rmtree / os.unlink / ... and `.unlink()` / `.rmdir()`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner, node.func.attr) in DELETING_CALLS or node.func.attr in DELETING_METHODS:
                lines.append(node.lineno)
    return lines


def test_only_the_cleanup_module_deletes() -> None:
    found = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py")
             if (lines := _deleting_calls(p.read_text(encoding="utf-8")))}
    assert set(found) == {"cleanup.py"}, found
    assert len(found["cleanup.py"]) == 3  # rmtree, unlink, rmdir: each behind its proof


def test_the_scan_sees_deletions() -> None:
    """The control: every spelling the scan must catch."""
    code = "import os, shutil\nshutil.rmtree(a)\nos.unlink(b)\nos.remove(c)\nPath(d).unlink()\nx.rmdir()\n"
    assert _deleting_calls(code) == [2, 3, 4, 5, 6]


# -- the primitives: no proof, no deletion ----------------------------------------------


def test_primitives_delete_nothing_without_proof(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"mine")
    link = tmp_path / "link"
    link.symlink_to(user)
    assert not remove_tree(user, lambda p: False) and (user / "photo.jpg").read_bytes() == b"mine"
    assert not remove_tree(link, lambda p: True) and link.is_symlink() and user.is_dir()  # a link is never followed
    assert not remove_file(user / "photo.jpg", lambda p: False) and (user / "photo.jpg").exists()
    assert not remove_file(user, lambda p: True) and user.is_dir()  # a folder is not a file
    assert not remove_empty_dir(user, lambda p: True) and user.is_dir()  # not empty: the OS refuses
    assert remove_tree(user, lambda p: True) and not user.exists()


# -- 1. temporary files and folders ------------------------------------------------------


def test_temp_proof_is_the_tag_the_tool_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd, made = temp_file(tmp_path, "report.md")
    os.close(fd)
    folder = temp_dir(tmp_path, "model")
    assert TEMP_TAG in made.name and is_temp(made) and is_temp(folder) and is_temp(folder / ".stage")
    monkeypatch.chdir(tmp_path)
    for foreign in (tmp_path, Path.cwd(), tmp_path / "report.md.tmp", tmp_path / ".report.md.x.tmp"):
        assert not is_temp(foreign), foreign
    assert remove_file(made, is_temp) and remove_tree(folder, is_temp) and list(tmp_path.iterdir()) == []


def test_a_failed_bundle_write_removes_only_its_temp_file(vit_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm_export.runtime import bundle_files
    from vlm_export.runtime.bundle_files import BundleWriteError, write_bundle_file

    bundle = tmp_path / "b"
    shutil.copytree(vit_bundle, bundle)
    before = sorted(p.name for p in bundle.iterdir())

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_files.os, "replace", refuse)
    with pytest.raises(BundleWriteError, match="disk full"):
        write_bundle_file(bundle, "report.md", b"new")
    assert sorted(p.name for p in bundle.iterdir()) == before  # the temp file went, nothing else


def _user_folder(folder: Path) -> dict[str, bytes]:
    """A folder as a user keeps it: a model, an image, notes, and a folder named like the
    tool's scratch (tag included) that this run did not make."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8")
    (folder / "notes.txt").write_text("mine")
    (folder / f".pre-process{TEMP_TAG}old").mkdir()
    (folder / f".pre-process{TEMP_TAG}old" / "keep.onnx").write_bytes(b"not this run's")
    return _snapshot(folder)


@pytest.mark.parametrize("fails", [False, True])
def test_inline_pre_pass_scratch_removes_only_its_own_folder(vit_bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """quantize.preprocess.lean_pre_process_inline splits the graph into a scratch folder
    beside the prepared graph (cleanup.temp_dir) and removes it by its tag: with that folder
    a user's, holding a tagged look-alike from an earlier run, only the folder this call
    made goes, on success and when the pass fails; the source graph is untouched."""
    from vlm_export.quantize import preprocess

    folder, source = tmp_path / "user", vit_bundle / "vision" / "vision.fp32.onnx"
    before, graph = _user_folder(folder), source.read_bytes()
    monkeypatch.chdir(folder)
    if fails:
        def broken(src: Path, out: Path, external: bool) -> Path:
            assert is_temp(src.parent) and src.parent.parent == folder and (src.parent / "source.onnx.data").is_file()
            raise RuntimeError("pass failed")

        monkeypatch.setattr(preprocess, "lean_pre_process", broken)
        with pytest.raises(RuntimeError, match="pass failed"):
            preprocess.lean_pre_process_inline(source, folder / "prepared.onnx")
        assert _snapshot(folder) == before
    else:
        preprocess.lean_pre_process_inline(source, folder / "prepared.onnx")
        after = _snapshot(folder)
        assert after.pop("prepared.onnx") and after == before
    assert source.read_bytes() == graph


def test_layout_writers_never_replace_a_file(vit_bundle: Path, tmp_path: Path) -> None:
    """export.layout_stream's writers create their files: pointed at a user's files they
    refuse before writing anything, and the files stay byte for byte."""
    import onnx

    from vlm_export.export.layout_stream import inline_copy, write_external, write_inline

    source = vit_bundle / "vision" / "vision.fp32.onnx"
    made = write_external(source, tmp_path / "g.onnx", "g.onnx.data")  # the tool's own, in its folder
    folder = tmp_path / "user"
    before = _user_folder(folder)
    with pytest.raises(FileExistsError):  # the graph's name taken: the data file is not made either
        write_external(source, folder / "notes.txt", "new.data")
    with pytest.raises(FileExistsError):  # the data file's name taken
        write_external(source, folder / "new.onnx", "photo.jpg")
    with pytest.raises(FileExistsError):
        write_inline(onnx.load(str(made), load_external_data=False), made.parent, folder / "photo.jpg")
    with pytest.raises(FileExistsError):
        inline_copy(made, folder / "model" / "model.safetensors")
    assert _snapshot(folder) == before
    assert write_inline(onnx.load(str(made), load_external_data=False), made.parent, folder / "new.onnx").is_file()  # control


@pytest.mark.parametrize("fails", [False, True])
def test_graph_writes_remove_only_their_scratch_folder_and_their_own_stale_data(
    vit_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """export.external.staged_output, behind every graph write (export, FP16, both INT8
    recipes, save_model), deletes in two places: its scratch folder beside the graph (class 1,
    by its tag) and, when a graph once written with external data is rewritten inline, that
    graph's own `NAME.onnx.data`. Since graphs over 128 MiB keep external data, the second
    happens on real models. In a user's folder holding look-alikes (another graph's data
    file, a data file named like ours but for another name, a tagged folder named for this
    graph from an earlier run), only the folder this write made and the graph's own stale
    data go; when the write fails, nothing is moved or deleted."""
    import onnx

    from vlm_export.export import external
    from vlm_export.export.external import save_model

    folder = tmp_path / "user"
    _user_folder(folder)
    (folder / "other.onnx.data").write_bytes(b"another graph's weights")
    (folder / "g.onnx.data.bak").write_bytes(b"a user's copy")
    (folder / f".g.onnx{TEMP_TAG}old").mkdir()
    (folder / f".g.onnx{TEMP_TAG}old" / "keep.onnx").write_bytes(b"not this run's")
    monkeypatch.chdir(folder)
    source = vit_bundle / "vision" / "vision.fp32.onnx"
    with monkeypatch.context() as m:
        m.setattr(external, "EXTERNAL_THRESHOLD", 1024)
        save_model(onnx.load(str(source)), folder / "g.onnx")  # the tool's first write: external data
    assert (folder / "g.onnx.data").is_file()
    before = _snapshot(folder)
    if fails:
        def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - onnx.save_model's signature
            raise RuntimeError("interrupted")

        monkeypatch.setattr(onnx, "save_model", broken)
        with pytest.raises(RuntimeError, match="interrupted"):
            save_model(onnx.load(str(source)), folder / "g.onnx")
        assert _snapshot(folder) == before
    else:
        save_model(onnx.load(str(source)), folder / "g.onnx")  # rewritten inline: its own data file is stale
        after = _snapshot(folder)
        assert after.pop("g.onnx") != before.pop("g.onnx") and "g.onnx.data" in before.keys() - after.keys()
        before.pop("g.onnx.data")
        assert after == before
        assert onnx.load(str(folder / "g.onnx")).graph.initializer  # whole, inline


# -- 2. staging folders ------------------------------------------------------------------


def test_sweep_deletes_marked_staging_only(tmp_path: Path) -> None:
    from vlm_export.bundle.staging import MARKER_NAME, create_staging, is_staging, remove_stale_partials

    out = tmp_path / "out"
    dead = create_staging(out)
    marker = json.loads((dead / MARKER_NAME).read_text())
    (dead / MARKER_NAME).write_text(json.dumps({**marker, "pid": 2**22 + 12345}))  # a pid no process has
    user = tmp_path / "out.partial-backup-2024"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    forged = tmp_path / "out.partial-1-deadbeef"
    forged.mkdir()
    (forged / MARKER_NAME).write_text('{"tool": "someone-else", "pid": 1}')
    (forged / "keep.txt").write_text("mine")
    assert is_staging(dead) and not is_staging(user) and not is_staging(forged)
    assert remove_stale_partials(out) == [dead]
    assert (user / "keep.txt").exists() and (forged / "keep.txt").exists()


# -- 3. the --force swap: set-aside folders and the journal --------------------------------


def test_recovery_never_deletes_a_folder_the_journal_merely_names(vit_bundle: Path, tmp_path: Path) -> None:
    from vlm_export.bundle.swap import journal_path, recover

    out = tmp_path / "out"
    shutil.copytree(vit_bundle, out)
    named = {"staging": tmp_path / "out.partial-7-aaaaaaaa", "old": tmp_path / "photos.partial-mine"}
    elsewhere = tmp_path / "elsewhere"
    for folder in (*named.values(), elsewhere):
        folder.mkdir()
        (folder / "keep.jpg").write_bytes(b"mine")
    journal_path(out).write_text(json.dumps({"out": str(out), "staging": str(named["staging"]), "old": str(elsewhere)}))
    assert recover(out) is True
    assert all((f / "keep.jpg").exists() for f in (*named.values(), elsewhere))  # not bundles, not marked: kept
    assert (out / "manifest.json").is_file() and not journal_path(out).exists()


def test_swap_removes_the_previous_bundle_it_set_aside(vit_bundle: Path, tmp_path: Path) -> None:
    from vlm_export.bundle.swap import _set_aside

    out = tmp_path / "out"
    shutil.copytree(vit_bundle, out)
    aside = tmp_path / "out.partial-9-old"
    shutil.copytree(vit_bundle, aside)
    stranger = tmp_path / "other.partial-9-old"
    shutil.copytree(vit_bundle, stranger)
    assert _set_aside(out, aside)
    assert not _set_aside(out, out)  # OUT itself, never
    assert not _set_aside(out, stranger)  # another bundle's .partial- folder, not named for this OUT
    assert not _set_aside(tmp_path / "x" / "out", aside)  # not a sibling of that OUT


# -- 4. the lock file --------------------------------------------------------------------


def test_lock_release_removes_only_its_lock_file(tmp_path: Path) -> None:
    from vlm_export.bundle.locks import LOCK_SUFFIX, OutputLock

    out = tmp_path / "out"
    lock = OutputLock(out).acquire()
    assert lock.path.name.endswith(LOCK_SUFFIX) and lock.path.exists()
    (tmp_path / "notes.txt").write_text("mine")
    lock.release()
    assert not lock.path.exists() and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# -- 5. the report's plots ---------------------------------------------------------------


def test_report_rewrite_keeps_a_users_png(vit_bundle: Path, tmp_path: Path) -> None:
    from vlm_export.report.plots import PLOT_FILES
    from vlm_export.report.write import refresh_reports

    bundle = tmp_path / "b"
    shutil.copytree(vit_bundle, bundle)
    (bundle / "plots" / "my-notes.png").write_bytes(b"mine")
    stale = bundle / "plots" / "latency_vs_batch.png"  # a plot name the report writes, with no data now
    stale.write_bytes(b"stale")
    refresh_reports(bundle)
    assert (bundle / "plots" / "my-notes.png").read_bytes() == b"mine"
    assert "latency_vs_batch.png" in PLOT_FILES and not stale.exists()


# -- 6. caches -------------------------------------------------------------------------------


def test_default_model_cache_replaces_only_its_own_conversion(tmp_path: Path) -> None:
    from vlm_export.defaults.dinov2_small import convert

    user = tmp_path / "my-model"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(InputError, match="not a vlm-export conversion"):
        convert(tmp_path / "unused.onnx", user, replace=True)
    assert (user / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["my-model"]  # no temp folder left either


def test_default_image_set_replaces_only_its_own_folder(tmp_path: Path) -> None:
    from vlm_export.calibration.default_set import SOURCES_FILE, materialize

    user = tmp_path / "photos"
    user.mkdir()
    (user / SOURCES_FILE).write_text("# my own notes\n")
    (user / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(InputError, match="not a materialized image set"):
        materialize(user, "calibration")
    assert (user / "holiday.jpg").read_bytes() == b"mine"
    ours = materialize(tmp_path / "set", "calibration")
    again = materialize(ours, "calibration")  # a set it wrote is replaced in place
    assert again == ours and (ours / SOURCES_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "set"]


def test_staged_output_removes_only_the_stale_data_file_of_its_own_graph(tmp_path: Path) -> None:
    """export.external.staged_output: rewriting NAME.onnx inline drops NAME.onnx.data (the data
    of its own earlier write) and nothing else beside it; a failed write moves and deletes nothing."""
    from vlm_export.export.external import staged_output

    out = tmp_path / "vision.fp32.onnx"
    out.write_bytes(b"old graph")
    (tmp_path / "vision.fp32.onnx.data").write_bytes(b"stale")
    users = [tmp_path / "vision.fp16.onnx.data", tmp_path / "notes.data", tmp_path / "photo.jpg"]
    for path in users:
        path.write_bytes(b"keep")
    with pytest.raises(RuntimeError):
        with staged_output(out) as staged:
            staged.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert out.read_bytes() == b"old graph" and (tmp_path / "vision.fp32.onnx.data").read_bytes() == b"stale"
    with staged_output(out) as staged:
        staged.write_bytes(b"new graph")
    assert out.read_bytes() == b"new graph" and not (tmp_path / "vision.fp32.onnx.data").exists()
    assert all(path.read_bytes() == b"keep" for path in users)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in users)])


def test_ort_cache_removes_only_its_temp_file_when_the_session_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """runtime.ort_cache: a session that fails to load leaves the cache folder as it was
    (a user's file in it included) and the bundle's graph untouched."""
    import onnxruntime as ort

    from vlm_export.runtime import ort_cache

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    graph = tmp_path / "bundle" / "vision.fp32.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"not an onnx graph")
    with pytest.raises(Exception):
        ort_cache.cached_session(graph, "0" * 64, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert graph.read_bytes() == b"not an onnx graph"
    cache_files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cache_files == []
    folder = next((p for p in (tmp_path / "cache").rglob("*") if p.is_dir()), tmp_path / "cache")
    (folder / "mine.txt").write_text("user")
    with pytest.raises(Exception):
        ort_cache.cached_session(graph, "0" * 64, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert (folder / "mine.txt").read_text() == "user"
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["mine.txt"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.rglob("*"))}


def test_scratch_folders_remove_only_the_fresh_folder_they_made(vit_bundle: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Class 7: `tempfile.TemporaryDirectory` scratch (weights parked by torch_offload, the
    calibration's augmented graph). With the system temp folder pointed at a folder that is
    also the current directory and holds a user's files and a model folder, each removes
    only the fresh folder it made: on success, and when the work inside fails."""
    import tempfile

    import torch

    from vlm_export.quantize.config import Int8Config
    from vlm_export.quantize.int8 import preprocess_for_quantization
    from vlm_export.quantize.int8_calibrate import calibrate_minmax
    from vlm_export.quantize.reader import FeedReader
    from vlm_export.torch_offload import offloaded, others_offloaded

    shared = tmp_path / "shared"
    (shared / "model").mkdir(parents=True)
    (shared / "model" / "model.safetensors").write_bytes(b"weights")
    (shared / "notes.txt").write_text("mine")
    (shared / "vlm-export-offload-lookalike").mkdir()  # a name like the scratch prefix, not made by this run
    before = _snapshot(shared)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.chdir(shared)

    module, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    seen = []
    with others_offloaded(module, [module, other]):
        seen += [p for p in shared.iterdir() if str(p) not in {str(shared / k) for k in before}]
    assert len(seen) == 1 and seen[0].name.startswith("vlm-export-offload-")  # its own folder, in the temp folder
    with pytest.raises(RuntimeError, match="boom"), offloaded(module):
        raise RuntimeError("boom")
    assert _snapshot(shared) == before

    prepared = preprocess_for_quantization(vit_bundle / "vision" / "vision.fp32.onnx", tmp_path / "prepared.onnx")
    feeds = [{"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}]
    calibrate_minmax(prepared, FeedReader(feeds), Int8Config().op_types, tmp_path / "ranges.json")
    assert (tmp_path / "ranges.json").is_file() and _snapshot(shared) == before
    with pytest.raises(Exception):  # a feed the graph refuses: the session fails mid-calibration
        calibrate_minmax(prepared, FeedReader([{"pixel_values": np.zeros((1, 5), np.float32)}]), Int8Config().op_types,
                         tmp_path / "bad.json")
    assert _snapshot(shared) == before


def _scratch_calls(source: str) -> list[tuple[int, dict[str, object]]]:
    """(line, keyword arguments) of every tempfile.TemporaryDirectory call (the one stdlib call
    that deletes: mkdtemp in cleanup.temp_dir only creates, class 1 removes it)."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "TemporaryDirectory":
            calls.append((node.lineno, {k.arg: ast.literal_eval(k.value) if isinstance(k.value, ast.Constant) else None
                                        for k in node.keywords}))
    return calls


def test_every_scratch_folder_is_fresh_in_the_system_temp_folder() -> None:
    """Class 7, every site: each scratch folder is a new one that the stdlib creates in the
    system temp folder (no `dir=`: never the model's, the images' or the current folder),
    named with the tool's prefix. The stdlib's cleanup removes exactly that folder."""
    found = {str(p.relative_to(PACKAGE)): calls for p in sorted(PACKAGE.rglob("*.py"))
             if (calls := _scratch_calls(p.read_text(encoding="utf-8")))}
    assert set(found) == {"torch_offload.py", "export/onnx_export.py", "quantize/int8_calibrate.py", "quantize/int8.py",
                          "quantize/method_choice.py", "families/blip.py", "families/clip.py",
                          "families/llava_language.py", "families/qwen2_vl_language.py"}, found
    for path, calls in found.items():
        for line, keywords in calls:
            assert set(keywords) == {"prefix"}, (path, line, keywords)
            assert str(keywords["prefix"]).startswith("vlm-export-"), (path, line)
    assert _scratch_calls("import tempfile\ntempfile.TemporaryDirectory(dir='.')\n") == [(2, {"dir": "."})]  # the control


@pytest.fixture()
def shared_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder pointed at a folder that is also the current directory and
    holds a user's file, a model folder and a look-alike of the scratch prefix."""
    import tempfile

    shared = tmp_path / "shared"
    (shared / "model").mkdir(parents=True)
    (shared / "model" / "model.safetensors").write_bytes(b"weights")
    (shared / "notes.txt").write_text("mine")
    (shared / "vlm-export-export-lookalike").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.chdir(shared)
    return shared


def test_export_scratch_removes_only_its_folder(tiny_vit_dir: Path, tmp_path: Path, shared_temp: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The inline export's scratch external-data file (export.onnx_export): its folder goes,
    on success and when reading it back fails; the graph lands where it was asked."""
    import onnx

    from vlm_export.export import onnx_export
    from vlm_export.families import detect

    before = _snapshot(shared_temp)
    family = detect(tiny_vit_dir)
    spec = family.components(family.load(tiny_vit_dir))[0]
    (tmp_path / "out").mkdir()
    graph = onnx_export.export_component(spec, tmp_path / "out" / "vision.fp32.onnx")
    assert graph.is_file() and _snapshot(shared_temp) == before

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("unreadable")

    monkeypatch.setattr(onnx, "load", refuse)
    with pytest.raises(OSError, match="unreadable"):
        onnx_export.export_component(spec, tmp_path / "out" / "again.onnx")
    assert _snapshot(shared_temp) == before and not (tmp_path / "out" / "again.onnx").exists()


def test_tokenizer_scratch_goes_with_the_loaded_model(tiny_blip_dir: Path, tiny_clip_dir: Path,  # noqa: F811
                                                      shared_temp: Path) -> None:
    """BLIP's and CLIP's tokenizer.json written at load (families.blip, families.clip) lives in
    a scratch folder that goes when the loaded model does, and nothing else with it."""
    import gc

    from vlm_export.families import detect

    before = _snapshot(shared_temp)
    for model_dir, prefix in ((tiny_blip_dir, "vlm-export-blip-"), (tiny_clip_dir, "vlm-export-tok-")):
        model_files = _snapshot(model_dir)
        loaded = detect(model_dir).load(model_dir)
        made = [p for p in shared_temp.iterdir() if p.name not in before and p.name.startswith(prefix)]
        assert len(made) == 1 and (made[0] / "tokenizer.json").is_file(), made
        del loaded
        gc.collect()
        assert _snapshot(shared_temp) == before and _snapshot(model_dir) == model_files
