"""Strictness from a recorded TensorRT surface (tests/data/trt_surface/<version>.json).

A fake class made here answers only the names the real pybind class has in that version:
an unknown attribute, a keyword the real signature lacks, too many positional arguments,
a write to a read-only property, or an enum member that does not exist raise at once, so
code that would fail on the device fails in CI. Behaviour lives in fake_tensorrt.py.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

SURFACES = Path(__file__).resolve().parents[1] / "data" / "trt_surface"


def recorded_versions() -> list[str]:
    """Every recorded TensorRT version, oldest first."""
    return sorted((p.stem for p in SURFACES.glob("[0-9]*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))


@lru_cache(maxsize=None)
def surface(version: str) -> dict[str, Any]:
    return json.loads((SURFACES / f"{version}.json").read_text())


class SurfaceError(AttributeError):
    """The code under test used a name the real TensorRT of this version does not have."""


def check_call(owner: str, name: str, overloads: list[dict[str, list[str]]], args: tuple, kwargs: dict) -> None:
    """Raise TypeError unless some recorded overload accepts these positional/keyword args."""
    if not overloads:  # a Python-level function (no pybind signature recorded): accept
        return
    for sig in overloads:
        params, defaults = sig["params"], set(sig["defaults"])
        if len(args) > len(params):
            continue
        named = set(params[len(args):])
        if not set(kwargs) <= named:
            continue
        required = [p for p in params[len(args):] if p not in defaults]
        if all(p in kwargs for p in required):
            return
    shown = " | ".join("(" + ", ".join(s["params"]) + ")" for s in overloads)
    raise TypeError(f"{owner}.{name}() got args {len(args)} positional, keywords {sorted(kwargs)}; real signatures: {shown}")


class FakeEnumMember:
    """One pybind enum value: int() gives its value, == compares enum and name."""

    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeEnumMember) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __repr__(self) -> str:
        return f"<{self.enum}.{self.name}: {self.value}>"

    __str__ = lambda self: f"{self.enum.split('.')[-1]}.{self.name}"  # noqa: E731 - as pybind prints


class FakeEnum:
    """A pybind enum type: members as attributes and `__members__`; anything else raises."""

    def __init__(self, name: str, members: dict[str, int], version: str) -> None:
        self._name, self._version = name, version
        self.__members__ = {m: FakeEnumMember(name, m, v) for m, v in members.items()}

    def __getattr__(self, item: str) -> Any:
        members = self.__dict__.get("__members__", {})
        if item in members:
            return members[item]
        raise SurfaceError(f"TensorRT {self._version}: {self._name} has no member '{item}'; it has {', '.join(members)}")

    def __call__(self, value: int) -> FakeEnumMember:
        for member in self.__members__.values():
            if member.value == value:
                return member
        raise ValueError(f"{self._name} has no value {value}")


class StrictBase:
    """Base of every fake class: attribute access checked against `_surface` (one class's
    recorded methods/properties/constants); names starting with "_" are the fake's own."""

    _surface: dict[str, Any] = {}
    _trt_name = "?"
    _version = "?"

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        cls = type(self)
        spec = cls._surface
        if name in spec.get("methods", {}):
            value = object.__getattribute__(self, name)
            if callable(value):
                return _checked(f"{cls._trt_name}", name, spec["methods"][name], value)
            return value
        if name in spec.get("properties", {}) or name in spec.get("constants", {}):
            stored = object.__getattribute__(self, "__dict__")
            return stored[f"_prop_{name}"] if f"_prop_{name}" in stored else object.__getattribute__(self, name)
        raise SurfaceError(f"TensorRT {cls._version}: {cls._trt_name} has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        cls = type(self)
        mode = cls._surface.get("properties", {}).get(name)
        if mode is None:
            raise SurfaceError(f"TensorRT {cls._version}: {cls._trt_name} has no property '{name}'")
        if mode != "rw":
            raise SurfaceError(f"TensorRT {cls._version}: {cls._trt_name}.{name} is read-only")
        object.__setattr__(self, f"_prop_{name}", value)

    def _prop(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(f"_prop_{name}", default)


def _checked(owner: str, name: str, overloads: list, method: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        check_call(owner, name, overloads, args, kwargs)
        return method(*args, **kwargs)

    return call


def strict_class(behaviour: type, trt_name: str, version: str) -> type:
    """`behaviour` made strict to `trt_name`'s surface in `version` (a new subclass), with
    the constructor's recorded signature checked too."""
    spec = surface(version)["classes"][trt_name]
    init_overloads = spec.get("methods", {}).get("__init__", [])

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        check_call(trt_name, "__init__", init_overloads, args, kwargs)
        behaviour.__init__(self, *args, **kwargs)

    return type(trt_name, (behaviour, StrictBase), {"_surface": spec, "_trt_name": trt_name, "_version": version, "__init__": __init__})
