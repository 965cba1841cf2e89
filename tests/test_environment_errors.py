"""Environment errors (issue 12): one line, exit 2, staging cleaned.

`-o /`, a read-only folder or filesystem, a 240-character OUT name, a full disk, SIGTERM,
typer's own usage errors and out-of-range numeric flags. Tests run as root, where chmod
does not bite: read-only folders are simulated by making the OS calls fail as the kernel
would (EACCES / EROFS), and a real chmod case runs where the tests are not root.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_interrupted_build import _start, _wait_for_onnx
from test_output_safety import fake_bundle, leftovers, one_error, tag_of

from vlm_export.bundle import BundleWriter
from vlm_export.cli.errors import TERMINATED
from vlm_export.errors import InputError
from vlm_export.os_errors import environment_error


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlm_export.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_o_root_is_one_line(force: list[str], tiny_vit_dir: Path, photo_dir: Path) -> None:
    from conftest import _build

    result = _build(tiny_vit_dir, Path("/"), photo_dir, *force)
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: -o '/' is the filesystem root; name a bundle folder to create\n"


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Make creating anything directly in `folder` fail with `code`, as the kernel does
    for a read-only mount (EROFS) or a folder without write permission (EACCES)."""
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path: object) -> None:
        if Path(os.fsdecode(path)).absolute().parent == folder:
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def fake_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.mark.parametrize(("code", "needle"), [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_read_only_folder_is_one_line(code: int, needle: str, tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import _build

    folder = tmp_path / "ro"
    folder.mkdir()
    _read_only(monkeypatch, folder, code)
    one_error(_build(tiny_vit_dir, folder / "out", photo_dir), needle, str(folder))
    monkeypatch.undo()
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the simulated case above runs instead")
def test_real_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(InputError, match="permission denied"):
            BundleWriter(folder / "out")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_240_character_out_name_builds(vit_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / ("b" * 240)  # OUT.partial-<pid>-<token> would be ~260 bytes: over NAME_MAX
    fake_bundle(out, "first", vit_bundle)
    fake_bundle(out, "second", vit_bundle, force=True)  # the swap's old name and journal too
    assert tag_of(out) == "second" and leftovers(tmp_path) == []


def test_full_disk_while_writing_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no space left") as caught:
        with BundleWriter(out) as writer:
            staging = writer.staging
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writer.path("vision/vision.fp32.onnx")))
    assert str(tmp_path) in str(caught.value) and "-o" in str(caught.value)
    assert not staging.exists() and not out.exists() and leftovers(tmp_path) == []


def test_full_disk_reported_by_a_library_in_its_own_words() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("onnx export failed") from inner
    except RuntimeError as wrapped:
        assert "no space left" in str(environment_error(wrapped, Path("/data")))
    text_only = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write failed: No space left on device")
    assert "'/data' (-o)" in str(environment_error(text_only, Path("/data")))
    assert environment_error(ValueError("a bug, not the machine"), Path("/data")) is None


def test_full_disk_during_a_build_is_one_line(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import vlm_export.export as export
    from conftest import _build

    def disk_full(spec, path):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"half an onnx file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export, "export_component", disk_full)
    one_error(_build(tiny_vit_dir, tmp_path / "out", photo_dir), "no space left", str(tmp_path))
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_sigterm_cleans_up_like_ctrl_c(tiny_vit_dir: Path, photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    proc = _start(tiny_vit_dir, out, photo_dir)
    _wait_for_onnx(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [f"error: {TERMINATED}"]
    assert "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["build"], "Missing option '-o'"), (["build", "m", "-o", "x", "--bogus"], "--bogus"), (["bild"], "build")],
)
def test_typer_usage_errors_are_one_line(argv: list[str], needle: str) -> None:
    proc = _cli(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert "╭" not in proc.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--calibration-size", "1000000000"), ("--calibration-size", "0"), ("--latency-runs", "0"),
     ("--latency-runs", "-5"), ("--latency-runs", "1000000000")],
)
def test_numeric_build_flags_are_range_checked_before_anything_loads(flag: str, value: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlm_export.cli import app

    # The model folder does not even exist: the range check must come first.
    result = CliRunner().invoke(app, ["build", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), flag, value])
    one_error(result, flag, value)
    assert list(tmp_path.iterdir()) == []
