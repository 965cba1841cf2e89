"""Data loss (issue 12): what `-o`/`--force`, the leftover sweep and the commit may touch.

`--force` replaces only a bundle, never the inputs, `/`, the current or a home directory;
the sweep removes only staging folders this tool marked, never a live build's; a kill
between the two renames of the fallback swap is undone by the next writer; one build at
a time per OUT. Most cases run on BundleWriter directly or fail before the model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlm_export.bundle import swap
from vlm_export.bundle import BundleWriter
from vlm_export.bundle.schema import Manifest
from vlm_export.cli import app
from vlm_export.errors import InputError
from vlm_export.bundle.locks import lock_path
from vlm_export.bundle.staging import MARKER_NAME, _process_start


@pytest.fixture(scope="module")
def bundle_files(vit_bundle: Path) -> Path:
    """A real finished bundle to copy from (its manifest passes every reader's checks)."""
    return vit_bundle


def fake_bundle(out: Path, tag: str, source: Path, force: bool = False) -> Path:
    """Write a copy of the bundle `source` to OUT through BundleWriter, marked with `tag`."""
    manifest = json.loads((source / "manifest.json").read_text())
    with BundleWriter(out, force=force) as writer:
        for path in source.rglob("*"):
            if path.is_file() and path.name != "manifest.json":
                shutil.copyfile(path, writer.path(str(path.relative_to(source))))
        (writer.staging / "TAG").write_text(tag)
        writer.commit(Manifest.from_json(manifest))
    return out


def tag_of(out: Path) -> str:
    return (out / "TAG").read_text()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(result, *needles: str) -> str:
    """The CLI exited 2 with exactly one `error:` line holding every needle; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".vlm-export." in p.name)


# --- --force replaces only a bundle -------------------------------------------------

def test_force_never_replaces_the_model_dir_or_its_parent(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from conftest import _build

    parent = tmp_path / "work"
    model = parent / "model"
    shutil.copytree(tiny_vit_dir, model)
    (parent / "notes.txt").write_text("unrelated, precious")
    before = tree(parent)
    one_error(_build(model, model, photo_dir, "--force"), str(model))
    one_error(_build(model, parent, photo_dir, "--force"), str(parent))
    assert tree(parent) == before
    assert leftovers(tmp_path) == [] and leftovers(parent) == []


@pytest.mark.parametrize("role", ["model", "calibration", "parity"])
def test_force_never_replaces_a_bundle_that_holds_an_input(bundle_files: Path, role: str, tmp_path: Path) -> None:
    out = fake_bundle(tmp_path / "bundle", "old", bundle_files)
    inside = out / "inputs"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"not really")
    protected = {"model": (inside, None, None), "calibration": (None, inside, None), "parity": (None, None, inside)}[role]
    with pytest.raises(InputError, match="overlaps the input"):
        BundleWriter(out, force=True, protected=protected)
    with pytest.raises(InputError, match="overlaps the input"):  # and the other way round: OUT inside the input
        BundleWriter(out, force=True, protected=(tmp_path, None, None))
    assert tag_of(out) == "old" and (inside / "a.png").read_bytes() == b"not really"
    assert leftovers(tmp_path) == []


def test_empty_o_with_force_keeps_the_current_directory(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import _build

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(cwd)
    one_error(_build(tiny_vit_dir, Path(""), photo_dir, "--force"), "-o")
    assert tree(cwd) == {"thesis.tex": b"years of work"}
    assert leftovers(tmp_path) == []


def test_force_never_replaces_root_cwd_or_home_even_when_they_look_like_bundles(
    bundle_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InputError, match="filesystem root"):
        BundleWriter(Path("/"), force=True)
    cwd_bundle = fake_bundle(tmp_path / "here", "cwd", bundle_files)
    monkeypatch.chdir(cwd_bundle)
    with pytest.raises(InputError, match="current directory"):
        BundleWriter(cwd_bundle, force=True)
    monkeypatch.chdir(tmp_path)
    home = fake_bundle(tmp_path / "home", "home", bundle_files)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(InputError, match="home directory"):
        BundleWriter(home, force=True)
    assert tag_of(cwd_bundle) == "cwd" and tag_of(home) == "home"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("manifest", [None, '{"name": "my project"}', "not json"])
def test_force_refuses_a_folder_that_is_not_a_bundle(manifest: str | None, tmp_path: Path) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "data.csv").write_text("1,2,3")
    if manifest is not None:
        (out / "manifest.json").write_text(manifest)
    before = tree(out)
    with pytest.raises(InputError, match="not a vlm-export bundle"):
        BundleWriter(out, force=True)
    assert tree(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_o_naming_a_regular_file_is_refused(force: bool, tmp_path: Path) -> None:
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF")
    with pytest.raises(InputError, match="is a file"):
        BundleWriter(target, force=force)
    assert target.read_bytes() == b"%PDF"
    assert leftovers(tmp_path) == []


# --- the leftover sweep ---------------------------------------------------------------

def _marked(folder: Path, out: Path, pid: int) -> Path:
    folder.mkdir()
    (folder / "vision.onnx").write_bytes(b"half written")
    marker = {"tool": "vlm-export", "out": str(out), "pid": pid, "pid_start": _process_start(pid),
              "host": os.uname().nodename, "started": 0.0}
    (folder / MARKER_NAME).write_text(json.dumps(marker))
    return folder


def test_sweep_removes_only_marked_leftovers_of_dead_builds(tmp_path: Path) -> None:
    out = tmp_path / "uf"
    user = tmp_path / "uf.partial-backup-2024"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"irreplaceable")
    unmarked = tmp_path / "uf.partial-4242-0badf00d"  # our name shape, but not empty and no marker
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("x")
    empty = tmp_path / "uf.partial-4243-0badf00d"  # a kill between mkdir and the marker
    empty.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = _marked(tmp_path / "uf.partial-1-aaaaaaaa", out, int(dead.stdout))
    other_out = _marked(tmp_path / "uf2.partial-1-bbbbbbbb", tmp_path / "uf2", int(dead.stdout))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _marked(tmp_path / "uf.partial-2-cccccccc", out, sleeper.pid)
        with BundleWriter(out) as writer:
            assert writer.staging.name.startswith("uf.partial-")
            assert (writer.staging / MARKER_NAME).is_file()
        assert (user / "photo.jpg").read_bytes() == b"irreplaceable"
        assert (unmarked / "keep.txt").exists() and other_out.exists() and live.exists()
        assert not stale.exists() and not empty.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- a recoverable --force swap -------------------------------------------------------

def test_force_swap_uses_an_exchange_rename_where_the_os_has_it(bundle_files: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    probe_a, probe_b = tmp_path / "probe-a", tmp_path / "probe-b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not swap.renameat2(probe_a, probe_b, swap.RENAME_EXCHANGE):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this OS/filesystem: the journaled fallback is tested below")
    probe_a.rmdir()
    probe_b.rmdir()
    calls: list[int] = []
    real = swap.renameat2

    def spy(src: Path, dst: Path, flags: int) -> bool:
        calls.append(flags)
        return real(src, dst, flags)

    out = fake_bundle(tmp_path / "b", "old", bundle_files)
    monkeypatch.setattr(swap, "renameat2", spy)
    fake_bundle(out, "new", bundle_files, force=True)
    assert calls == [swap.RENAME_EXCHANGE]
    assert tag_of(out) == "new" and not (out / MARKER_NAME).exists()
    assert leftovers(tmp_path) == []


_KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from vlm_export.bundle import swap
    from vlm_export.bundle import BundleWriter
    sys.path.insert(0, {tests!r})
    from test_output_safety import fake_bundle

    swap.renameat2 = lambda src, dst, flags: False  # an OS without renameat2

    def killed(out, old, staging):
        os.rename(out, old)
        os._exit(9)  # SIGKILL-like: no cleanup runs

    swap.rename_two_steps = killed
    fake_bundle(Path({out!r}), "new", Path({source!r}), force=True)
""")


def test_kill_between_the_two_renames_is_undone_by_the_next_build(bundle_files: Path, tmp_path: Path) -> None:
    out = fake_bundle(tmp_path / "b", "old", bundle_files)
    script = _KILLED_BETWEEN_RENAMES.format(tests=str(Path(__file__).parent), out=str(out), source=str(bundle_files))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists()  # the moment the old code lost: OUT missing, both bundles under .partial-*
    assert any(name.endswith("-old") for name in leftovers(tmp_path)) and swap.journal_path(out).exists()
    with BundleWriter(out, force=True) as writer:  # the next build: restores first, sweeps after
        assert tag_of(out) == "old"
        staging = writer.staging
    assert not staging.exists() and tag_of(out) == "old"
    assert leftovers(tmp_path) == []


def test_failure_between_the_two_renames_restores_at_once(bundle_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_bundle(tmp_path / "b", "old", bundle_files)
    monkeypatch.setattr(swap, "renameat2", lambda src, dst, flags: False)

    def interrupted(out_: Path, old: Path, staging: Path) -> None:
        os.rename(out_, old)
        raise KeyboardInterrupt

    monkeypatch.setattr(swap, "rename_two_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fake_bundle(out, "new", bundle_files, force=True)
    assert tag_of(out) == "old" and leftovers(tmp_path) == []
    monkeypatch.undo()
    fake_bundle(out, "new", bundle_files, force=True)  # and the fallback itself replaces cleanly
    assert tag_of(out) == "new" and leftovers(tmp_path) == []


# --- one build per OUT ------------------------------------------------------------------

def test_second_writer_into_the_same_out_is_refused(bundle_files: Path, tmp_path: Path) -> None:
    out = fake_bundle(tmp_path / "b", "old", bundle_files)
    with BundleWriter(out, force=True) as first:
        assert lock_path(out).exists()
        with pytest.raises(InputError, match="another build holds"):
            BundleWriter(out, force=True)
        assert first.staging.exists() and tag_of(out) == "old"
    assert leftovers(tmp_path) == []  # lock file gone with the build


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vlm_export.bundle import BundleWriter
    with BundleWriter(Path({out!r}), force=True):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_concurrent_build_process_is_refused_in_one_line(bundle_files: Path, tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    from conftest import _build

    out = fake_bundle(tmp_path / "b", "old", bundle_files)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(out=str(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_error(_build(tiny_vit_dir, out, photo_dir, "--force"), "another build holds", str(out))
        assert tag_of(out) == "old"
    finally:
        holder.kill()
        holder.wait()
    with BundleWriter(out, force=True):  # a killed holder's lock dies with it
        pass
    assert tag_of(out) == "old"
