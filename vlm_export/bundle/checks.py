"""Bounds and types of the manifest values a bundle's reader acts on, checked up front
(the low-level checks `bundle.schema` composes).

Why: a bundle may come from anyone. A value that is merely odd (`"parity": "oops"`, a
missing `source`) must be one line naming it, not a traceback far away; a value that is
huge (a 10^6 × 10^6 preprocess size, a 1e5 × 1e5 input) must be refused before anything
allocates for it; JSON nested 200,000 deep must never reach a recursive parser. Every
check here is iterative and torch-free.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vlm_export.errors import BundleError

MAX_MANIFEST_BYTES = 8 << 20  # a manifest with engines for every target is tens of kB
MAX_DEPTH = 32  # the writer nests about 7 deep (components → variants → engines → profile → dims)
MAX_IMAGE_SIDE = 8192  # pixels per side of any preprocess size, crop or patch
MAX_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
MAX_DIM = 1 << 20  # one fixed input/output dimension
MAX_ELEMENTS = 1 << 28  # fixed dims of one input multiplied (1 GB of float32), batch not counted
_SIZE_KEYS = ("size", "crop_size")
_PIXEL_KEYS = ("min_pixels", "max_pixels")
_SIDE_KEYS = ("patch_size", "temporal_patch_size", "merge_size")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def check_depth(text: bytes, where: str) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH, counted without parsing (no recursion)."""
    brackets = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    step = np.isin(brackets, (ord("["), ord("{"))).astype(np.int32) - np.isin(brackets, (ord("]"), ord("}"))).astype(np.int32)
    depth = int(np.cumsum(step).max()) if step.size else 0
    if depth > MAX_DEPTH:
        raise BundleError(f"'{where}' nests {depth} levels deep (at most {MAX_DEPTH}); not a manifest this tool wrote, rebuild the bundle")


def bad(where: str, what: str) -> BundleError:
    return BundleError(f"'{where}' has {what}; rebuild the bundle")


def int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def strings(value: Any) -> bool:
    """A JSON list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_preprocess(where: str, pre: Any) -> None:
    """Image sizes, crops and pixel budgets within MAX_IMAGE_SIDE / MAX_PIXELS."""
    if pre is None:
        return
    if not isinstance(pre, dict):
        raise bad(where, f"'preprocess' of type {type(pre).__name__} (want an object)")
    for key in _SIZE_KEYS:
        value = pre.get(key)
        if value is None:
            continue
        sides = value.values() if isinstance(value, dict) else [value]
        if not all(int_in(v, 1, MAX_IMAGE_SIDE) for v in sides):
            raise bad(where, f"'preprocess.{key}' {short(value)} (want whole numbers 1..{MAX_IMAGE_SIDE})")
    for key, limit in [*((k, MAX_PIXELS) for k in _PIXEL_KEYS), *((k, MAX_IMAGE_SIDE) for k in _SIDE_KEYS)]:
        if key in pre and not int_in(pre[key], 0, limit):
            raise bad(where, f"'preprocess.{key}' {short(pre[key])} (want a whole number 0..{limit})")


def check_tensors(where: str, component: str, key: str, specs: Any) -> None:
    """components.<c>.inputs/outputs: name, dtype, and a shape of symbols or bounded ints."""
    if not isinstance(specs, list):
        raise bad(where, f"component '{component}' {key} that is not a list")
    for spec in specs:
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("dtype"), str)
                and isinstance(spec.get("shape"), list)):
            raise bad(where, f"a malformed entry in component '{component}' {key} (want name, dtype, shape)")
        fixed = [d for d in spec["shape"] if not isinstance(d, str)]
        if not all(int_in(d, 0, MAX_DIM) for d in fixed) or int(np.prod(fixed, dtype=np.float64)) > MAX_ELEMENTS:
            raise bad(where, f"component '{component}' {key[:-1]} '{spec['name']}' with shape {short(spec['shape'])} "
                              f"(each dim at most {MAX_DIM}, {MAX_ELEMENTS} elements in all)")


def check_variant(where: str, name: str, key: str, variant: dict[str, Any]) -> None:
    """The fields a reader of a variant uses: strings, a providers list, external_data entries."""
    for field in ("precision", "onnx", "sha256"):
        if field in variant and not isinstance(variant[field], str):
            raise bad(where, f"variant '{name}/{key}' field '{field}' that is not a string")
    providers = variant.get("providers", [])
    if not (isinstance(providers, list) and all(isinstance(p, str) for p in providers)):
        raise bad(where, f"variant '{name}/{key}' 'providers' that is not a list of strings")
    external = variant.get("external_data", [])
    if not (isinstance(external, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                and isinstance(e.get("sha256"), str)
                                                and (e.get("bytes") is None or int_in(e["bytes"], 0, 1 << 50)) for e in external)):
        raise bad(where, f"variant '{name}/{key}' 'external_data' that is not a list of {{file, sha256}} objects")


def check_top_level(where: str, data: dict[str, Any]) -> None:
    """family, source, parity, files, labels: present where required, of the right type."""
    if not isinstance(data.get("family"), str):
        raise bad(where, "no 'family' string")
    if not isinstance(data.get("source"), dict):
        raise bad(where, "no 'source' object (path, config_sha256, model_type)")
    parity = data.get("parity", {})
    if not isinstance(parity, dict):
        raise bad(where, f"'parity' of type {type(parity).__name__} (want an object)")
    if not isinstance(parity.get("file", ""), str) or parity.get("passed") not in (True, False, None):
        raise bad(where, "a malformed 'parity' object (want file: string, passed: true/false)")
    files = data.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())):
        raise bad(where, "a malformed 'files' object")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise bad(where, "malformed 'labels' (want a list of strings)")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
