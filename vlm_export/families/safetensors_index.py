"""Where each tensor of a checkpoint lives, from the safetensors headers alone.

Why headers only: a LLaVA-7B checkpoint holds ~14 GB of language model next to a
0.6 GB vision tower; exporting the tower must not read, map into memory or even touch the
language model's bytes. A safetensors file starts with a JSON header that names every
tensor with its dtype, shape and byte range, so names and shapes of the whole checkpoint
(what the key check needs) cost a few kilobytes per shard, and the tensors a component
needs are then read one by one (`safetensors.safe_open`), nothing else.

Why the index is checked against the headers: `model.safetensors.index.json` is a
separate file that can go stale (a re-sharded checkpoint, a shard copied from another
revision); a key the index places in a shard that lacks it would otherwise surface as a
deep error in the middle of loading, or, worse, a tensor read from the wrong file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from vlm_export.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' own limit on the JSON header, and its dtypes' sizes in bytes.
MAX_HEADER = 100_000_000
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# How many key names one error line shows.
_SHOWN = 3


@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor as its shard's header declares it (no data read)."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the file, header included
    end: int


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint by its key in the file, and the file an error should name."""

    source: Path  # model.safetensors, or the index when sharded
    tensors: Mapping[str, TensorEntry]

    def entry(self, key: str) -> TensorEntry:
        """The header entry of `key`; an InputError naming the source when absent."""
        if key not in self.tensors:
            raise InputError(f"'{self.source}' has no tensor '{key}'; re-save the checkpoint with save_pretrained()")
        return self.tensors[key]


def read_index(model_dir: Path) -> CheckpointIndex:
    """Headers of MODEL_DIR's safetensors: the single file, or every shard the index names.

    Raises InputError (one line naming the file) when the index is not JSON, names a
    shard that is missing or outside MODEL_DIR, or disagrees with a shard's header, and
    when a header is unreadable or declares another size than the file's.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        return _sharded(model_dir, index)
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        legacy = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(legacy)}: pickled weights are not loaded; convert them to safetensors)" if legacy else ""
        raise InputError(
            f"neither '{single}' nor '{index}' exists{hint}; save the model with save_pretrained() (safetensors weights)"
        )
    return CheckpointIndex(single, _header(single))


def _sharded(model_dir: Path, index: Path) -> CheckpointIndex:
    weight_map = _weight_map(index)
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    tensors: dict[str, TensorEntry] = {}
    for name in sorted(by_shard):
        path = _shard_path(model_dir, index, name)
        header = _header(path)
        listed = by_shard[name]
        absent = sorted(listed - header.keys())
        if absent:
            raise InputError(
                f"'{path}' lacks {len(absent)} tensor{'s' if len(absent) > 1 else ''} that '{index}' places there "
                f"({_first(absent)}); the index and the shards come from different saves: re-download or re-save the checkpoint"
            )
        stray = sorted(header.keys() - listed)
        if stray:
            raise InputError(
                f"'{path}' holds {len(stray)} tensor{'s' if len(stray) > 1 else ''} that '{index}' places elsewhere or "
                f"nowhere ({_first(stray)}); the index and the shards come from different saves: re-download or re-save"
            )
        tensors.update((key, header[key]) for key in listed)
    return CheckpointIndex(index, tensors)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"'{index}' is not valid JSON ({exc}); re-save the checkpoint with save_pretrained()") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(f"'{index}' has no 'weight_map' of tensor names to shard files; re-save the checkpoint")
    return weight_map


def _shard_path(model_dir: Path, index: Path, name: str) -> Path:
    """The shard file `name` inside MODEL_DIR; a plain file name only, as save_pretrained writes."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise InputError(f"'{index}' names shard '{name}', which is not a file name inside '{model_dir}'; fix the index")
    path = model_dir / name
    if not path.is_file():
        raise InputError(f"'{index}' names shard '{path}', which is missing; download every shard the index lists")
    return path


def _header(path: Path) -> dict[str, TensorEntry]:
    """Names, dtypes, shapes and byte ranges from one file's header, checked against its size.

    Why by hand and not `safetensors.safe_open`: safe_open maps the whole file into memory,
    and on a machine with less memory than the file the kernel refuses the map
    ("Cannot allocate memory" for a 27 GB shard on 24 GiB), so a checkpoint whose
    language model alone is larger than memory could not even be opened. The format is a
    little-endian u64 length and a JSON header; its rules (below) are safetensors' own.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        entries = {key: _entry(path, key, value, 8 + length) for key, value in header.items() if key != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise InputError(f"'{path}' is not a readable safetensors file ({str(exc)[:200]}); re-download or re-save it") from None
    end = 8 + length + _data_bytes(entries, 8 + length)
    if end != size:
        raise InputError(
            f"'{path}' holds {size} bytes but its header declares {end}; the file is truncated or damaged: re-download it"
        )
    return entries


def _entry(path: Path, key: str, value: Any, base: int) -> TensorEntry:
    """One header entry; its byte count must be what dtype and shape make."""
    dtype, shape, (start, end) = value["dtype"], tuple(int(d) for d in value["shape"]), value["data_offsets"]
    if dtype not in ITEMSIZE:
        raise ValueError(f"tensor '{key}' has dtype '{dtype}', which safetensors does not define")
    count = ITEMSIZE[dtype]
    for dim in shape:
        count *= dim
    if min(shape, default=0) < 0 or not 0 <= int(start) <= int(end) or int(end) - int(start) != count:
        raise ValueError(f"tensor '{key}' declares bytes {start}..{end} for {dtype}{list(shape)}")
    return TensorEntry(path, dtype, shape, base + int(start), base + int(end))


def _data_bytes(entries: Mapping[str, TensorEntry], base: int) -> int:
    """Where the data ends, relative to the header's end: the tensors must tile it with no gap."""
    position = base
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise InputError(f"'{entry.shard}' has a gap or overlap at byte {position} between tensors; re-save it")
        position = entry.end
    return position - base


def read_tensor(handle: BinaryIO, entry: TensorEntry) -> Any:
    """One tensor as a torch.Tensor: its bytes only, decoded by safetensors (dtype, byte order)."""
    from safetensors.torch import load

    head = json.dumps({"t": {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [0, entry.end - entry.start]}})
    head += " " * (-len(head) % 8)
    handle.seek(entry.start)
    data = handle.read(entry.end - entry.start)
    if len(data) != entry.end - entry.start:
        raise InputError(f"'{entry.shard}' ended before the data of a tensor; the file is truncated: re-download it")
    return load(struct.pack("<Q", len(head)) + head.encode("utf-8") + data)["t"]


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", …" if len(keys) > _SHOWN else "")

