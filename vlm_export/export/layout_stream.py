"""An ONNX graph moved between its two layouts (weights inline, weights in an
external-data file) a tensor at a time.

Why: `onnx.load` + `onnx.save` of a graph under 2 GB holds the weights two to three times
at once (the file's bytes and the parsed message; the message and its serialization):
ViT-B/16's INT8 pre-pass peaked there at 1.0 GB over its start for 0.33 GB of weights
(benchmarks/results/build_memory.txt, session 8). Protobuf's encoding is a sequence of
(field number, length, bytes) records, so both directions can go field by field:
- `write_inline`: the graph's small parts serialized as usual, each initializer read from
  its data file, encoded and written before the next is read. The bytes are those
  `onnx.save` writes for the same model loaded with its data, data-location markers
  cleared: the file the model would be had its weights always been inline
  (python-protobuf writes known fields in field-number order).
- `write_external`: the inline file read through an mmap, each initializer parsed alone
  and its values appended to the data file; what `onnx.save_model(..., save_as_external_data
  =True, all_tensors_to_one_file=True, size_threshold=1024, convert_attribute=False)` keeps
  (the same tensors go out, the file's offsets may differ).
tests/test_layout_stream.py compares both with onnx's own. Both create their files (open
mode "x") and refuse a path that exists: they never replace anything (tests/test_deletions.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _copy(message: Any) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _fields(message: Any, keep: Any) -> bytes:
    """`message` serialized with only the fields whose number satisfies `keep`."""
    part = _copy(message)
    for field, _ in message.ListFields():
        if not keep(field.number):
            part.ClearField(field.name)
    return part.SerializeToString()


class _ExternalTensor:
    """An initializer whose values lie in a data file: its encoding without the values,
    split around where raw_data goes, and where to read them."""

    def __init__(self, tensor: Any, base_dir: Path) -> None:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        self.path = base_dir / entries["location"]
        self.offset, self.length = int(entries.get("offset", 0)), int(entries.get("length", -1))
        if self.length < 0:
            self.length = self.path.stat().st_size - self.offset
        bare = _copy(tensor)
        bare.ClearField("external_data")
        bare.ClearField("data_location")
        self.before, self.after = _fields(bare, lambda n: n < _RAW_DATA), _fields(bare, lambda n: n > _RAW_DATA)
        self.size = len(self.before) + len(_key(_RAW_DATA)) + len(_varint(self.length)) + self.length + len(self.after)

    def write(self, out: BinaryIO) -> None:
        with self.path.open("rb") as data:
            data.seek(self.offset)
            values = data.read(self.length)
        if len(values) != self.length:
            raise ValueError(f"'{self.path}' holds {len(values)} of the {self.length} bytes a tensor names")
        out.write(self.before + _key(_RAW_DATA) + _varint(self.length))
        out.write(values)
        out.write(self.after)


class _InlineTensor:
    """An initializer whose values are in the graph: written as it is, without a marker."""

    def __init__(self, tensor: Any) -> None:
        if tensor.HasField("data_location"):
            tensor = _copy(tensor)
            tensor.ClearField("data_location")
        self.encoded = tensor.SerializeToString()
        self.size = len(self.encoded)

    def write(self, out: BinaryIO) -> None:
        out.write(self.encoded)


def streamable(model: Any) -> bool:
    """True when only top-level initializers are external: the case `write_inline` handles.
    (Constants in node attributes, sparse initializers, subgraphs and functions stay in the
    graph message; a model with such external tensors goes through onnx.load/save.)"""
    from vlm_export.runtime.onnx_external import locations_in

    rest = _copy(model)
    rest.graph.ClearField("initializer")
    return not locations_in(rest.SerializeToString(), "the graph without its initializers")


def write_external(inline_path: Path, out_path: Path, location: str, size_threshold: int = 1024) -> Path:
    """Write the inline graph `inline_path` as `out_path` plus the data file `location`
    beside it (initializers of at least `size_threshold` bytes, by onnx's measure, go
    there), parsing one initializer at a time from an mmap of the source. Both files are
    written in place: callers write into a scratch folder."""
    import mmap
    import sys

    import onnx
    from onnx.external_data_helper import set_external_data

    from vlm_export.runtime.onnx_external import WireReader

    source, out_path = Path(inline_path), Path(out_path)
    _refuse_existing(out_path)  # before the data file is made: nothing of ours is left on refusal
    model, graph = onnx.ModelProto(), onnx.GraphProto()
    with source.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf, \
            (out_path.parent / location).open("xb") as data:
        reader = WireReader(buf, str(source))
        for number, wire, value in reader.fields(0, len(buf)):
            if number != _GRAPH or wire != _LENGTH_DELIMITED:
                model.MergeFromString(_record(buf, number, wire, value))
                continue
            for inner, inner_wire, span in reader.fields(*value):
                if inner != _INITIALIZER or inner_wire != _LENGTH_DELIMITED:
                    graph.MergeFromString(_record(buf, inner, inner_wire, span))
                    continue
                tensor = onnx.TensorProto.FromString(buf[span[0]:span[1]])
                if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= size_threshold:
                    offset = data.tell()
                    data.write(tensor.raw_data)
                    set_external_data(tensor, location, offset, len(tensor.raw_data))
                    tensor.ClearField("raw_data")
                graph.initializer.append(tensor)
                _drop(buf, span)
    model.graph.CopyFrom(graph)
    with out_path.open("xb") as out:  # what onnx.save writes for a model whose tensors are all written out
        out.write(model.SerializeToString())
    return out_path


def _refuse_existing(path: Path) -> None:
    """Both writers create their files and never replace one: they write into scratch or
    staging folders the caller made, so an existing file is someone else's (a user's model,
    an image) and is left as it is."""
    if os.path.lexists(path):
        raise FileExistsError(f"'{path}' exists; layout_stream writes new files only")


def _drop(buf: Any, span: tuple[int, int]) -> None:
    """Hand back the mapped pages of a span already read: they are the file's, clean, and
    would otherwise stay resident until the map closes (all of the weights at the end)."""
    import mmap

    start = span[0] - span[0] % mmap.PAGESIZE
    if hasattr(buf, "madvise") and span[1] > start:
        buf.madvise(mmap.MADV_DONTNEED, start, span[1] - start)


def _record(buf: Any, number: int, wire: int, value: Any) -> bytes:
    """One field's record (key and value) re-encoded from the reader's parse: a varint or
    a length-delimited span (ModelProto and GraphProto use no fixed-width fields)."""
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(value)
    return key + _varint(value[1] - value[0]) + bytes(buf[value[0]:value[1]])


def write_inline(model: Any, base_dir: Path, out_path: Path) -> Path:
    """Write `model` (an onnx.ModelProto loaded without its external data, whose external
    tensors name files relative to `base_dir`) to `out_path` as one self-contained file,
    holding one tensor's values in memory at a time."""
    from onnx.external_data_helper import uses_external_data

    if not streamable(model):
        raise ValueError("external tensors outside the graph's initializers: load the model and save it instead")
    tensors = [_ExternalTensor(t, Path(base_dir)) if uses_external_data(t) else _InlineTensor(t) for t in model.graph.initializer]
    shell = _copy(model.graph)
    shell.ClearField("initializer")
    graph_before, graph_after = _fields(shell, lambda n: n < _INITIALIZER), _fields(shell, lambda n: n > _INITIALIZER)
    framed = [(_key(_INITIALIZER) + _varint(t.size), t) for t in tensors]
    graph_size = len(graph_before) + sum(len(frame) + t.size for frame, t in framed) + len(graph_after)
    with Path(out_path).open("xb") as out:
        out.write(_fields(model, lambda n: n < _GRAPH) + _key(_GRAPH) + _varint(graph_size) + graph_before)
        for frame, tensor in framed:
            out.write(frame)
            tensor.write(out)
        out.write(graph_after + _fields(model, lambda n: n > _GRAPH))
    return Path(out_path)


def inline_copy(external_path: Path, out_path: Path, edit: Callable[[Any], None] | None = None) -> Path:
    """`external_path` (a graph with external data) written inline to `out_path`, after
    `edit(model)` if given (it may change anything but the initializers' values): streamed
    when `streamable`, else loaded whole and saved; the initializers' data-location markers
    cleared either way."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    _refuse_existing(Path(out_path))  # the fallback's onnx.save would replace it
    model = onnx.load(str(external_path), load_external_data=False)
    if edit is not None:
        edit(model)
    if streamable(model):
        return write_inline(model, Path(external_path).parent, out_path)
    load_external_data_for_model(model, str(Path(external_path).parent))
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    onnx.save(model, str(out_path))
    return Path(out_path)
