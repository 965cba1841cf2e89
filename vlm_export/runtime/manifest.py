"""Reading a bundle's manifest.json on the device, refusing anything untrusted.

Why strict: a bundle arrives on a device from elsewhere. Paths must stay inside the
bundle (no `..`, no absolute paths, no symlinks out), checksums must match, and a newer
format than this runtime understands is refused rather than half-read. The format and
its checks belong to `vlm_export.bundle.schema`; this module adds what needs the bundle
on disk: bounded reading, containment of every path, checksums.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.bundle import checks
from vlm_export.bundle.paths import plain_relative, resolve_inside, sha256_file  # noqa: F401 - the runtime's reading API
from vlm_export.bundle.schema import FORMAT_VERSION, MANIFEST_NAME, Component, VariantEntry, decode  # noqa: F401 - re-exported
from vlm_export.bundle.schema import Manifest as ManifestData
from vlm_export.errors import BundleError
from vlm_export.runtime.bundle_files import read_bundle_bytes, regular_file


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
    entry: VariantEntry | None = None  # the manifest's record (engines, TensorRT EP plans)


@dataclass(frozen=True)
class ExternalFile:
    """One ONNX external-data file of a variant, as the manifest lists it."""

    file: str  # relative to the bundle root
    path: Path  # resolved, inside the bundle
    sha256: str
    bytes: int | None = None  # size at build time: a truncated copy is named before hashing gigabytes


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest on disk: `content` typed (`bundle.schema`), `data` the same
    JSON as parsed (for family sections read by their runtime classes), `root` the bundle."""

    root: Path
    data: dict[str, Any]
    content: ManifestData | None = None  # None: ONNX files the build checks before they are a bundle

    @property
    def family(self) -> str:
        return str(self.data["family"])

    @property
    def typed(self) -> ManifestData:
        if self.content is None:
            raise BundleError(f"'{self.root}' is not a finished bundle (no manifest.json was read); rebuild it")
        return self.content

    @property
    def components(self) -> dict[str, Any]:
        return self.data["components"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.data.get("preprocess", {})

    @property
    def labels(self) -> list[str] | None:
        return self.data.get("labels")

    def component(self, name: str) -> Component:
        return self.typed.components[name]

    def file(self, relative: str) -> Path:
        """A side file listed in manifest["files"] (e.g. tokenizer.json), checksum verified."""
        entry = self.typed.files.get(relative)
        if not isinstance(entry, dict):
            raise BundleError(f"'{relative}' is not listed in '{self.root / MANIFEST_NAME}'; rebuild the bundle")
        path = regular_file(resolve_inside(self.root, relative))
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"checksum mismatch for '{path}'; the bundle was modified after it was built")
        return path

    def variants(self, component: str) -> dict[str, Variant]:
        """The variants of `component`, their paths resolved inside the bundle."""
        return {key: _variant(self.root, key, v) for key, v in self.typed.components[component].variants.items()}


def _variant(root: Path, key: str, entry: VariantEntry) -> Variant:
    return Variant(
        key=key, precision=entry.precision, path=resolve_inside(root, entry.onnx), sha256=entry.sha256,
        providers=entry.providers, recipe=entry.recipe or "", parity_passed=entry.parity_passed,
        external_data=tuple(ExternalFile(e.file, resolve_inside(root, e.file), e.sha256, e.bytes) for e in entry.external_data),
        entry=entry,
    )


def read_manifest(root: Path) -> Manifest:
    """Parse and validate OUT/manifest.json (bounded, contained, then `bundle.schema`)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not os.path.lexists(path):
        raise BundleError(f"'{path}' not found: '{root}' is not a finished bundle (an interrupted build?); rebuild it")
    text = read_bundle_bytes(root, MANIFEST_NAME, checks.MAX_MANIFEST_BYTES)  # contained, regular, bounded
    data = decode(text, str(path))
    return Manifest(root=root, data=data, content=ManifestData.from_json(data, str(path)))


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
        size = regular_file(entry.path, "external-data file").stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise BundleError(f"external-data file '{entry.path}' is {size} bytes, the manifest lists {entry.bytes} "
                              "(truncated or replaced); re-copy the bundle")
        if sha256_file(entry.path) != entry.sha256:
            raise BundleError(f"checksum mismatch for external-data file '{entry.path}'; the bundle was modified after it was built")
