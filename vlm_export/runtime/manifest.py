"""Reading a bundle's manifest.json, refusing anything untrusted.

Why strict: a bundle arrives on a device from elsewhere. Paths must stay inside the
bundle (no `..`, no absolute paths, no symlinks out), checksums must match, and a newer
format than this runtime understands is refused rather than half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.errors import BundleError
from vlm_export.runtime import manifest_schema as schema
from vlm_export.runtime.bundle_files import read_bundle_bytes, regular_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_relative(relative: Any, root: Path | str = "OUT") -> Path:
    """`relative` as a Path when it is a non-empty relative path without `..` or NUL.

    Why separate from `resolve_inside`: planners that print paths (trtexec lines) must
    refuse an escaping name before any file is touched, with the same rule.
    """
    text = relative if isinstance(relative, str) else ""
    rel = Path(text)
    if not text or rel.is_absolute() or ".." in rel.parts or "\x00" in text:
        raise BundleError(f"manifest path {relative!r} is not a plain relative path inside the bundle '{root}'")
    return rel


def resolve_inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing absolute paths, `..` and symlinks that leave `root`."""
    rel = plain_relative(relative, root)
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, names the OS refuses
        raise BundleError(f"manifest path {relative!r} cannot be resolved inside the bundle '{root}' ({exc})") from None
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"manifest path '{relative}' resolves outside the bundle '{root}' (symlink?)")
    return resolved


@dataclass(frozen=True)
class Variant:
    """One precision of one component: its file, checksum and intended providers."""

    key: str
    precision: str
    path: Path
    sha256: str
    providers: tuple[str, ...]
    recipe: str
    parity_passed: bool | None
    external_data: tuple["ExternalFile", ...] = ()


@dataclass(frozen=True)
class ExternalFile:
    """One ONNX external-data file of a variant, as the manifest lists it."""

    file: str  # relative to the bundle root
    path: Path  # resolved, inside the bundle
    sha256: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.data["family"])

    @property
    def components(self) -> dict[str, Any]:
        return self.data["components"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.data.get("preprocess", {})

    @property
    def labels(self) -> list[str] | None:
        return self.data.get("labels")

    def file(self, relative: str) -> Path:
        """A side file listed in manifest["files"] (e.g. tokenizer.json), checksum verified."""
        files = self.data.get("files")
        entry = files.get(relative) if isinstance(files, dict) else None
        if not isinstance(entry, dict):
            raise BundleError(f"'{relative}' is not listed in '{self.root / MANIFEST_NAME}'; rebuild the bundle")
        path = regular_file(resolve_inside(self.root, relative))
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"checksum mismatch for '{path}'; the bundle was modified after it was built")
        return path

    def variants(self, component: str) -> dict[str, Variant]:
        raw = self.components[component]["variants"]
        return {key: _variant(self.root, key, v) for key, v in raw.items()}


def _variant(root: Path, key: str, raw: dict[str, Any]) -> Variant:
    try:
        return Variant(
            key=key,
            precision=str(raw["precision"]),
            path=resolve_inside(root, str(raw["onnx"])),
            sha256=str(raw["sha256"]),
            providers=tuple(raw.get("providers", ())),
            recipe=str(raw.get("recipe", "")),
            parity_passed=raw.get("parity_passed"),
            external_data=tuple(
                ExternalFile(str(e["file"]), resolve_inside(root, str(e["file"])), str(e["sha256"])) for e in raw.get("external_data", ())
            ),
        )
    except KeyError as exc:
        raise BundleError(f"manifest variant '{key}' in '{root}' lacks {exc}; rebuild the bundle") from None
    except TypeError:  # a list or number where the writer puts an object or a list of strings
        raise BundleError(f"manifest variant '{key}' in '{root}' is malformed; rebuild the bundle") from None


def _check_components(path: Path, components: Any) -> None:
    """Each component is an object whose `variants` map keys to objects, with bounded
    inputs/outputs and well-typed variant fields."""
    if not isinstance(components, dict) or not components:
        raise BundleError(f"'{path}' lists no components; rebuild the bundle")
    for name, component in components.items():
        variants = component.get("variants") if isinstance(component, dict) else None
        if not isinstance(variants, dict):
            raise BundleError(f"'{path}' component '{name}' has no valid 'variants' object; rebuild the bundle")
        for key, variant in variants.items():
            if not isinstance(variant, dict):
                raise BundleError(f"'{path}' variant '{name}/{key}' is not an object; rebuild the bundle")
            schema.check_variant(str(path), name, key, variant)
        for key in ("inputs", "outputs"):
            if key in component:
                schema.check_tensors(str(path), name, key, component[key])


def read_manifest(root: Path) -> Manifest:
    """Parse and validate OUT/manifest.json (format version, family, components)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not os.path.lexists(path):
        raise BundleError(f"'{path}' not found: '{root}' is not a finished bundle (an interrupted build?); rebuild it")
    text = read_bundle_bytes(root, MANIFEST_NAME, schema.MAX_MANIFEST_BYTES)  # contained, regular, bounded
    schema.check_depth(text, str(path))
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"'{path}' is not valid JSON ({exc}); rebuild the bundle") from None
    if not isinstance(data, dict):
        raise BundleError(f"'{path}' is not a manifest object; rebuild the bundle")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"'{path}' has no valid format_version; rebuild the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"'{path}' is format {version}, newer than this runtime understands ({FORMAT_VERSION}); upgrade vlm-export"
        )
    for key in ("family", "components"):
        if key not in data:
            raise BundleError(f"'{path}' lacks '{key}'; rebuild the bundle")
    schema.check_top_level(str(path), data)
    _check_components(path, data["components"])
    schema.check_preprocess(str(path), data.get("preprocess"))
    return Manifest(root=root, data=data)


def verify_file(variant: Variant) -> None:
    """The file exists, is a regular file and its sha256 matches the manifest."""
    actual = sha256_file(regular_file(variant.path))
    if actual != variant.sha256:
        raise BundleError(f"checksum mismatch for '{variant.path}' (manifest {variant.sha256[:12]}…, file {actual[:12]}…)")


def check_external_data(variant: Variant) -> None:
    """Refuse ONNX files whose external-data files leave the bundle, are not listed in the
    manifest, or differ from their listed sha256.

    Why: onnxruntime follows `location` fields wherever they point, and those files hold
    the weights. Read with the runtime's own protobuf reader, so the check runs on the
    runtime-only install (no `onnx` package) too.
    """
    from vlm_export.runtime.onnx_external import external_locations, resolve_external

    listed = {entry.path for entry in variant.external_data}
    for location in external_locations(variant.path):
        # no `..` allowed, so inside the ONNX file's folder, which is inside the bundle
        if resolve_external(variant.path, location, variant.path.parent) not in listed:
            raise BundleError(f"'{variant.path}' uses external data '{location}' that the manifest does not list; rebuild the bundle")
    for entry in variant.external_data:
        if sha256_file(regular_file(entry.path, "external-data file")) != entry.sha256:
            raise BundleError(f"checksum mismatch for external-data file '{entry.path}'; the bundle was modified after it was built")
