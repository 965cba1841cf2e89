"""What changed between two bundles: parity, latency, size, verdicts; regressions flagged.

Why: a fine-tuned checkpoint is rebuilt often, and a CI job must notice when the new
bundle drifts further from PyTorch, slows down or starts failing parity, without a
person reading two reports. Pure functions over the bundles' JSON files (no torch), so
the gate runs with the runtime install only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_export.errors import BundleError, InputError
from vlm_export.report.tables import DASH, fmt

METRICS = ("cosine_min", "cosine_mean", "max_abs", "mean_abs", "top1_agreement")


@dataclass(frozen=True)
class Thresholds:
    """What counts as a regression. Defaults to a cosine_min drop over 0.001 or a p50
    latency rise over 10 % (latency on a shared CI machine is noisy; widen it there)."""

    max_cosine_drop: float = 0.001
    max_latency_increase: float = 0.10

    def __post_init__(self) -> None:
        if not self.max_cosine_drop >= 0:
            raise InputError(f"--max-cosine-drop must be 0 or more (got {self.max_cosine_drop})")
        if not self.max_latency_increase >= 0:
            raise InputError(f"--max-latency-increase must be 0 or more, a fraction (got {self.max_latency_increase})")


@dataclass(frozen=True)
class Snapshot:
    """One variant of one bundle, as far as a comparison needs it."""

    passed: bool | None
    metrics: dict[str, float]
    p50_ms: dict[str, float]  # provider → p50 (PyTorch eager left out: not the bundle's speed)
    bytes: int | None


@dataclass(frozen=True)
class VariantChange:
    component: str
    variant: str
    before: Snapshot | None  # None: only in bundle B
    after: Snapshot | None  # None: only in bundle A
    regressions: tuple[str, ...]


@dataclass(frozen=True)
class BundleDiff:
    a: Path
    b: Path
    verdict_a: bool | None
    verdict_b: bool | None
    changes: tuple[VariantChange, ...]

    @property
    def regressions(self) -> list[str]:
        """'component/variant: reason' for every regression found."""
        return [f"{c.component}/{c.variant}: {r}" for c in self.changes for r in c.regressions]

    @property
    def providers(self) -> list[str]:
        seen = [p for c in self.changes for s in (c.before, c.after) if s for p in s.p50_ms]
        return list(dict.fromkeys(seen))


def verified_manifest(bundle: Path) -> Any:
    """The bundle's Manifest after every variant's file (and external data) matched its
    sha256: a comparison of tampered files would gate CI on numbers nobody built."""
    from vlm_export.runtime.manifest import check_external_data, read_manifest, verify_file

    manifest = read_manifest(Path(bundle))
    for name in manifest.components:
        for variant in manifest.variants(name).values():
            verify_file(variant)
            check_external_data(variant)
    return manifest


def check_comparable(a: Any, b: Any) -> None:
    """Refuse two bundles of different families or component sets: their numbers do not compare."""
    if a.family != b.family:
        raise InputError(f"cannot compare a '{a.family}' bundle ('{a.root}') with a '{b.family}' bundle ('{b.root}'); compare two builds of one model family")
    if set(a.components) != set(b.components):
        raise InputError(f"cannot compare bundles with different components ({', '.join(sorted(a.components))} vs {', '.join(sorted(b.components))})")


def load_snapshots(bundle: Path, manifest_obj: Any = None) -> tuple[bool | None, dict[tuple[str, str], Snapshot]]:
    """(overall verdict, {(component, variant): Snapshot}) of a finished bundle.

    `manifest_obj` is the bundle's already verified Manifest. Defaults to reading it.
    """
    from vlm_export.report.write import read_parity
    from vlm_export.runtime.manifest import read_manifest

    manifest = (manifest_obj or read_manifest(Path(bundle))).typed
    parity = read_parity(Path(bundle), manifest)
    snaps = {}
    for rec in parity["records"]:
        try:
            comp, key = str(rec["component"]), str(rec["variant"])
            component = manifest.components.get(comp)
            variant = component.variants.get(key) if component is not None else None
            snaps[(comp, key)] = Snapshot(
                passed=rec.get("passed"),
                metrics={m: float(rec["metrics"][m]) for m in METRICS if rec["metrics"].get(m) is not None},
                p50_ms={p: float(v["p50_ms"]) for p, v in rec.get("latency", {}).items() if not p.startswith("pytorch") and "p50_ms" in v},
                bytes=variant.total_bytes if variant is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"'{bundle}/parity.json' has a malformed record ({exc!r}); rebuild the bundle") from None
    return manifest.parity.get("passed"), snaps


def _regressions(a: Snapshot, b: Snapshot, t: Thresholds) -> tuple[str, ...]:
    found = []
    if a.passed and b.passed is False:
        found.append("verdict PASS → FAIL")
    cos_a, cos_b = a.metrics.get("cosine_min"), b.metrics.get("cosine_min")
    if cos_a is not None and math.isfinite(cos_a):
        if cos_b is None or not math.isfinite(cos_b):
            found.append("cosine_min is no longer a finite number")
        elif cos_a - cos_b > t.max_cosine_drop:
            found.append(f"cosine_min dropped {cos_a - cos_b:.3g} ({cos_a:.6f} → {cos_b:.6f}; allowed {t.max_cosine_drop:g})")
    for provider, before in a.p50_ms.items():
        after = b.p50_ms.get(provider)
        if after is not None and before > 0 and (after - before) / before > t.max_latency_increase:
            found.append(f"{provider} p50 +{(after - before) / before:.0%} ({before:.2f} → {after:.2f} ms; allowed +{t.max_latency_increase:.0%})")
    return tuple(found)


def compare_bundles(a: Path, b: Path, thresholds: Thresholds | None = None) -> BundleDiff:
    """Every variant of either bundle, A (before) against B (after), regressions flagged.

    A variant present in only one bundle is listed, not counted as a regression. Both
    bundles' checksums are verified first, and they must share family and components.
    """
    thresholds = thresholds or Thresholds()
    manifest_a, manifest_b = verified_manifest(a), verified_manifest(b)
    check_comparable(manifest_a, manifest_b)
    verdict_a, snaps_a = load_snapshots(a, manifest_a)
    verdict_b, snaps_b = load_snapshots(b, manifest_b)
    changes = []
    for key in dict.fromkeys([*snaps_a, *snaps_b]):
        before, after = snaps_a.get(key), snaps_b.get(key)
        found = _regressions(before, after, thresholds) if before and after else ()
        changes.append(VariantChange(key[0], key[1], before, after, found))
    return BundleDiff(Path(a), Path(b), verdict_a, verdict_b, tuple(changes))


def _arrow(before: Any, after: Any, digits: int = 6, relative: bool = False) -> str:
    """'x' when unchanged, 'x → y (Δ)' when changed; Δ as a percentage when `relative`."""
    if before is None and after is None:
        return DASH
    if before == after:
        return fmt(before, digits)
    text = f"{fmt(before, digits)} → {fmt(after, digits)}"
    if isinstance(before, float) and isinstance(after, float) and math.isfinite(before) and math.isfinite(after):
        delta = f"{(after - before) / before:+.1%}" if relative and before else f"{after - before:+.3g}"
        text += f" ({delta})"
    return text


def _verdict(s: Snapshot | None) -> str:
    return "absent" if s is None else {True: "PASS", False: "FAIL", None: DASH}[s.passed]


def diff_rows(diff: BundleDiff) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for a terminal table: one row per variant, A → B per quantity."""
    providers = diff.providers
    header = ["component", "variant", "verdict", "cos min", "cos mean", "max abs", "top-1", *[f"{p} p50 ms" for p in providers], "MB", "regression"]
    rows = []
    for c in diff.changes:
        a, b = c.before, c.after
        va, vb = _verdict(a), _verdict(b)

        def metric(name: str, digits: int = 6) -> str:
            return _arrow(a.metrics.get(name) if a else None, b.metrics.get(name) if b else None, digits)

        lat = [_arrow(a.p50_ms.get(p) if a else None, b.p50_ms.get(p) if b else None, 4, relative=True) for p in providers]
        size = [None if s is None or s.bytes is None else round(s.bytes / 1e6, 2) for s in (a, b)]
        regression = "; ".join(c.regressions) or ("only in B" if a is None else "only in A" if b is None else "")
        rows.append([c.component, c.variant, va if va == vb else f"{va} → {vb}", metric("cosine_min"), metric("cosine_mean"),
                     metric("max_abs", 4), metric("top1_agreement", 4), *lat, _arrow(size[0], size[1], 3, relative=True), regression])
    return header, rows
