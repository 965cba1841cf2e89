"""Which external-data files an ONNX graph references, read without the `onnx` package.

Why our own reader: onnxruntime follows every tensor's `location` field wherever it
points, and the runtime-only install has no `onnx` to list them. Those files hold the
weights, so they must be checked like the graph itself: inside the bundle, listed in the
manifest and matching their sha256. The ONNX file is a protobuf; this module walks just
the messages that can hold tensors (field numbers from onnx.proto, checked against the
`onnx` package's descriptors in tests/test_bundle_containment.py) and skips every other
field by its length, so even a 2 GB graph is scanned through an mmap without copying.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

from vlm_export.errors import BundleError

# message type → {field number: nested message type} for the fields that can hold tensors.
_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "function": {7: "node"},  # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},  # t, g, tensors, graphs, sparse_tensor(s)
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_MAX_DEPTH = 64  # subgraphs nest (If inside Loop inside If …); a hostile file must not nest without bound


class WireReader:
    """Protobuf wire format over a buffer: varints, and the span of each field's value
    (export.layout_stream walks a graph with it too)."""

    def __init__(self, buf: Any, name: str) -> None:
        self.buf, self.name = buf, name

    def _bad(self, what: str) -> BundleError:
        return BundleError(f"'{self.name}' is not a valid ONNX file ({what}); rebuild or re-copy the bundle")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise self._bad("truncated varint")
            byte = self.buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields(self, start: int, end: int):  # -> Iterator[tuple[int, int, int | tuple[int, int]]]
        """(field number, wire type, varint value or (start, end) of a length-delimited value)."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self.varint(pos, end)
                yield number, wire, value
            elif wire == 2:
                length, pos = self.varint(pos, end)
                if pos + length > end:
                    raise self._bad(f"field {number} runs past its message")
                yield number, wire, (pos, pos + length)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:  # groups (3, 4) are not used by onnx.proto
                raise self._bad(f"unsupported wire type {wire}")
        if pos != end:
            raise self._bad("a field runs past its message")


def _tensor_location(reader: WireReader, start: int, end: int) -> str | None:
    """The `location` of an external tensor; None for a tensor with inline data.

    A `location` entry counts even without data_location=EXTERNAL: stricter than
    onnxruntime, so that no future reading of the flag can slip an unchecked path in.
    """
    external, location = False, None
    for number, wire, value in reader.fields(start, end):
        if number == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {n: bytes(reader.buf[v[0]:v[1]]) for n, w, v in reader.fields(*value) if w == 2 and n in (1, 2)}
            if entry.get(1) == b"location":
                try:
                    location = entry.get(2, b"").decode("utf-8")
                except UnicodeDecodeError:
                    raise reader._bad("external-data location is not UTF-8") from None
    if external and location is None:
        raise reader._bad("a tensor is marked external but names no location")
    return location


def _scan(reader: WireReader, end: int) -> list[str]:
    """Every external location under the ModelProto spanning [0, end), in file order."""
    found: list[str] = []
    stack: list[tuple[str, int, int, int]] = [("model", 0, end, 0)]  # explicit stack: no Python recursion
    while stack:
        kind, start, stop, depth = stack.pop()
        if kind == "tensor":
            location = _tensor_location(reader, start, stop)
            if location is not None:
                found.append(location)
            continue
        if depth > _MAX_DEPTH:
            raise reader._bad(f"subgraphs nested deeper than {_MAX_DEPTH}")
        children = [(_MESSAGES[kind][n], *v, depth + 1) for n, w, v in reader.fields(start, stop) if w == 2 and n in _MESSAGES[kind]]
        stack.extend(reversed(children))
    return found


def locations_in(buf: Any, name: str) -> list[str]:
    """The distinct external `location`s of the serialized ModelProto in `buf`, in order
    (`name` is the file it came from, for errors)."""
    return list(dict.fromkeys(_scan(WireReader(buf, name), len(buf))))


def external_locations(onnx_path: Path) -> list[str]:
    """The distinct `location` strings of every external tensor in `onnx_path`, in file
    order: initializers, sparse initializers, node attributes (Constant), subgraphs and
    functions. Reads only the file itself, never the data files."""
    path = Path(onnx_path)
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size == 0:
                raise BundleError(f"'{path}' is empty, not an ONNX file; rebuild or re-copy the bundle")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return locations_in(buf, str(path))
    except OSError as exc:
        raise BundleError(f"cannot read '{path}' ({exc.strerror or exc}); re-copy the bundle") from None


def external_data_entries(onnx_path: Path, bundle_root: Path) -> list[dict[str, Any]]:
    """Manifest entries for the external-data files of `onnx_path` inside `bundle_root`:
    [{"file": path relative to the bundle, "sha256": ..., "bytes": ...}], one per file.

    For the bundle writer (the variant's `external_data` list). Refuses a location that
    is absolute, has `..`, leaves the bundle or is not a regular file.
    """
    from vlm_export.runtime.bundle_files import regular_file
    from vlm_export.bundle.paths import sha256_file

    root = Path(bundle_root).resolve()
    entries = []
    for location in external_locations(onnx_path):
        path = regular_file(resolve_external(Path(onnx_path), location, root))
        entries.append({"file": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size})
    return entries


def resolve_external(onnx_path: Path, location: str, root: Path) -> Path:
    """`location` (relative to the ONNX file's folder, as onnxruntime reads it) resolved,
    refused unless it is a plain relative path that stays inside the bundle `root`."""
    from vlm_export.bundle.paths import resolve_inside

    try:
        path = resolve_inside(Path(onnx_path).parent, location)
    except BundleError:
        raise BundleError(f"'{onnx_path}' names external data {location!r}, not a plain relative path inside the bundle; rebuild it") from None
    if not path.is_relative_to(Path(root).resolve()):
        raise BundleError(f"'{onnx_path}' names external data {location!r}, which resolves outside the bundle '{root}'")
    return path
