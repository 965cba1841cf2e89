"""The default calibration/parity photographs and the crops that multiply them.

Why these tests: parity measured on calibration images would flatter INT8, a file
without a licence must never travel with a bundle, and calibration must be
reproducible for a seed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_export.calibration import (
    available,
    DEFAULT_IMAGES,
    Role,
    default_calibration_dir,
    default_parity_dir,
    images_for_role,
    materialize,
    random_resized_crops,
    source_path,
)
from vlm_export.calibration import default_set
from vlm_export.errors import InputError

LICENCES = {"Public domain", "CC0", "CC0-1.0", "CC-BY-2.0", "No known copyright restrictions"}


def _table(folder: Path) -> dict[str, list[str]]:
    """SOURCES.md rows by file name: [file, name, package, licence, credit]."""
    rows = [line for line in (folder / "SOURCES.md").read_text().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]  # rows[0]: header
    return {c[0]: c for c in cells}


def test_roles_are_disjoint_and_cover_every_image() -> None:
    parity = {i.name for i in images_for_role(Role.PARITY)}
    calibration = {i.name for i in images_for_role("calibration")}
    assert parity and calibration and not parity & calibration
    assert parity | calibration == {i.name for i in DEFAULT_IMAGES}
    assert len({i.file_name for i in DEFAULT_IMAGES}) == len(DEFAULT_IMAGES)
    assert min(len(parity), len(calibration)) >= 0.35 * len(DEFAULT_IMAGES)


@pytest.mark.parametrize("image", DEFAULT_IMAGES, ids=lambda i: i.name)
def test_every_image_is_a_real_licensed_photo(image: default_set.SampleImage) -> None:
    assert image.licence in LICENCES and image.credit
    path = source_path(image)
    if path is None:
        pytest.skip(f"{default_set.DISTRIBUTIONS[image.package]} is not installed")
    with Image.open(path) as opened:
        rgb = np.asarray(opened.convert("RGB"), dtype=np.float32)
    assert min(rgb.shape[:2]) >= 150 and rgb.shape[2] == 3
    assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3)[::7], axis=0)) > 100  # not flat, not synthetic


@pytest.mark.parametrize("role", list(Role))
def test_each_role_holds_colour_photographs(role: Role) -> None:
    """INT8 ranges must see colour scenes, and parity must be measured on them."""
    colour = 0
    for image, path in available(role):
        with Image.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"), dtype=np.float32)
        colour += np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 2
    assert colour >= 5


@pytest.mark.parametrize("role", list(Role))
def test_materialize_lists_every_file_with_a_licence(tmp_path: Path, role: Role) -> None:
    folder = materialize(tmp_path / role.value, role)
    files = {p.name for p in folder.iterdir()} - {"SOURCES.md"}
    table = _table(folder)
    assert files == set(table) == {i.file_name for i in images_for_role(role)}
    assert all(row[3] in LICENCES and row[4] for row in table.values())
    assert materialize(folder, role) == folder  # a previous set is replaced in place
    assert not list(tmp_path.glob("*.partial-*")) and not list(tmp_path.glob("*.old-*"))


def test_materialize_refuses_foreign_folders_and_unknown_roles(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a materialized image set"):
        materialize(tmp_path, Role.PARITY)
    with pytest.raises(InputError, match="unknown image role 'train'; known: calibration, parity"):
        materialize(tmp_path / "x", "train")


def test_missing_packages_are_skipped_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(default_set.importlib.util, "find_spec", lambda n: None if n == "sklearn" else real(n))
    with pytest.warns(UserWarning, match="pip install scikit-learn"):
        folder = materialize(tmp_path / "p", Role.PARITY)
    assert "china.jpg" not in set(_table(folder)) and "astronaut.png" in set(_table(folder))
    monkeypatch.setattr(default_set.importlib.util, "find_spec", lambda n: None)
    with pytest.raises(InputError, match="pip install matplotlib scikit-image scikit-learn"):
        materialize(tmp_path / "q", Role.PARITY)


def test_default_dirs_live_in_the_cache_and_are_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(default_set.CACHE_ENV, str(tmp_path))
    parity, calibration = default_parity_dir(), default_calibration_dir()
    assert parity == tmp_path / "calibration" / "parity"
    assert calibration == tmp_path / "calibration" / "calibration"
    stamp = {p.name: p.stat().st_mtime_ns for p in parity.iterdir()}
    assert default_parity_dir() == parity
    assert {p.name: p.stat().st_mtime_ns for p in parity.iterdir()} == stamp


def _photos() -> list[Image.Image]:
    paths = [source_path(i) for i in images_for_role(Role.CALIBRATION)]
    return [Image.open(p) for p in paths if p is not None][:4]


def _pixels(images: list[Image.Image]) -> list[bytes]:
    return [im.tobytes() + repr(im.size).encode() for im in images]


def test_crops_are_deterministic_for_a_seed_and_count_n() -> None:
    photos = _photos()
    first = random_resized_crops(photos, 50, seed=3)
    assert len(first) == 50 and all(im.mode == "RGB" for im in first)
    assert _pixels(first) == _pixels(random_resized_crops(photos, 50, seed=3))
    other = random_resized_crops(photos, 50, seed=4)
    assert _pixels(first[: len(photos)]) == _pixels(other[: len(photos)])  # the originals come first
    assert _pixels(first[: len(photos)]) == _pixels([p.convert("RGB") for p in photos])
    assert sum(a != b for a, b in zip(_pixels(first), _pixels(other))) >= 40
    for crop in first[len(photos):]:
        assert crop.width >= 0.25 * min(p.width for p in photos) and crop.height >= 8


def test_crops_edge_cases() -> None:
    photos = _photos()
    assert random_resized_crops(photos, 0) == []
    assert len(random_resized_crops(photos, 2)) == 2
    assert len(random_resized_crops(photos[:1], 7, hflip=False)) == 7
    with pytest.raises(InputError, match="no images"):
        random_resized_crops([], 3)
    with pytest.raises(InputError, match="scale"):
        random_resized_crops(photos, 3, scale=(0.0, 1.0))
    with pytest.raises(InputError, match="n must be"):
        random_resized_crops(photos, -1)
