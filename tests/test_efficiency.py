"""CPU peak per precision from ISA flags, cores and clock, and `bench`'s achieved GMAC/s
(issue 18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm_export.runtime.cpu import physical_cores
from vlm_export.verify.cpu_peak import CpuPeak, macs_per_cycle, parse_clock
from vlm_export.verify.efficiency import achieved

AVX2 = {"sse", "sse2", "avx", "fma", "avx2"}
AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(("flags", "vendor", "family", "precision", "rate"), [
    (AVX2, "GenuineIntel", 6, "fp32", 16),  # 8 lanes × 2 FMA units
    (AVX2, "GenuineIntel", 6, "int8", 32),  # vpmaddubsw + vpmaddwd: 2× FP32
    (AVX2 | {"avx_vnni"}, "GenuineIntel", 6, "int8", 64),  # 256-bit vpdpbusd: 4× FP32
    (AVX512_VNNI, "GenuineIntel", 6, "fp32", 32),
    (AVX512_VNNI, "GenuineIntel", 6, "int8", 128),
    (AVX512_VNNI, "AuthenticAMD", 0x19, "fp32", 16),  # Zen 4: 512-bit ops on 256-bit pipes
    (AVX512_VNNI, "AuthenticAMD", 0x19, "int8", 64),
    (AVX512_VNNI, "AuthenticAMD", 0x1A, "int8", 128),  # Zen 5: full 512-bit pipes
    (AVX512_VNNI | {"amx_int8"}, "GenuineIntel", 6, "int8", 1024),
    (AVX512_VNNI, "GenuineIntel", 6, "fp16", 32),  # FP32 kernels
    (AVX512_VNNI | {"avx512_fp16"}, "GenuineIntel", 6, "fp16", 64),
    ({"sse", "sse2", "avx"}, "GenuineIntel", 6, "fp32", 8),  # no FMA: mul + add, 1 MAC per lane
])
def test_x86_rates(flags: set[str], vendor: str, family: int, precision: str, rate: int) -> None:
    got, how = macs_per_cycle(precision, flags, "x86_64", vendor, family)
    assert got == rate, how


@pytest.mark.parametrize(("flags", "precision", "rate"), [
    ({"asimd"}, "fp32", 8), ({"asimd", "asimddp"}, "int8", 32), ({"asimd", "asimddp", "i8mm"}, "int8", 64),
    ({"asimd", "asimdhp"}, "fp16", 16), ({"asimd"}, "int8", 16),
])
def test_arm_rates(flags: set[str], precision: str, rate: int) -> None:
    assert macs_per_cycle(precision, flags, "aarch64")[0] == rate


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="'bf16'"):
        macs_per_cycle("bf16", AVX2)


def test_clock_prefers_the_max_and_marks_guesses() -> None:
    assert parse_clock("CPU max MHz:                     3500.0000\n", 2_000_000, "cpu MHz\t\t: 2596.1\n") == (3.5, "lscpu CPU max MHz", False)
    assert parse_clock("", 2_400_000, "cpu MHz\t\t: 2596.1\n")[:3] == (2.4, "cpufreq cpuinfo_max_freq", False)
    ghz, source, assumed = parse_clock("", None, "cpu MHz\t\t: 2596.120\nbogomips\t: 5192.24\n")
    assert (ghz, assumed) == (pytest.approx(2.59612), True) and "nominal" in source
    ghz, source, assumed = parse_clock("", None, "bogomips\t: 5192.24\n")
    assert (ghz, assumed) == (pytest.approx(2.59612), True) and source.startswith("BogoMIPS")


def test_physical_cores_ignore_hyperthreads() -> None:
    cpuinfo = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 4}\n\n" for i in range(8))
    assert physical_cores(cpuinfo) == 4
    assert physical_cores(cpuinfo, "Core(s) per socket:  8\nSocket(s):           2\n") == 16


def test_peak_and_achieved_arithmetic() -> None:
    peak = CpuPeak("int8", 128.0, 2, 2.5, "AVX-512 VNNI", "given", False)
    assert peak.gmacs == 640.0
    # 6.12 GMAC per image, batch 8 in 100 ms: 489.6 GMAC/s, 76.5% of 640
    got = achieved(6.12e9, 8, 100.0, peak)
    assert got["gmacs"] == pytest.approx(489.6) and got["peak_fraction"] == pytest.approx(0.765)
    assert achieved(None, 8, 100.0, peak) == {"gmacs": None, "peak_fraction": None}


def test_bench_reports_gmacs_from_the_graph_count(vit_bundle: Path, tiny_vit_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vlm_export.cli import app
    from vlm_export.verify.macs import vit_macs

    bundle = tmp_path / "vit"
    shutil.copytree(vit_bundle, bundle)
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", str(bundle), "--batch", "1,2", "--runs", "2", "--variants", "fp32,int8-cpu",
                                    "--threads", "1", "--output", str(out)])
    assert done.exit_code == 0, done.output
    entry = json.loads(out.read_text())["providers"]["cpu"]
    cfg = json.loads((tiny_vit_dir / "config.json").read_text())
    expected = vit_macs(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["patch_size"],
                        (cfg["image_size"],) * 2, head_outputs=len(cfg["id2label"]))
    peaks = entry["peaks"]
    assert peaks["int8"]["cores"] == 1 and peaks["int8"]["gmacs"] >= peaks["fp32"]["gmacs"] > 0
    for row in entry["results"]:
        assert row["macs_per_image"] == expected
        assert row["gmacs"] == pytest.approx(expected * row["batch"] / row["p50_ms"] / 1e6)
        precision = "int8" if row["variant"] == "int8-cpu" else "fp32"
        assert row["peak_fraction"] == pytest.approx(row["gmacs"] / peaks[precision]["gmacs"])
    assert "GMAC/s" in done.output and "of peak" in done.output


def test_a_fraction_above_the_peak_blames_the_assumed_clock() -> None:
    from vlm_export.verify.efficiency import format_efficiency

    assert format_efficiency({"gmacs": 41.25, "peak_fraction": 0.25}) == "41.2 GMAC/s, 25% of peak"
    assert format_efficiency({"gmacs": 199.4, "peak_fraction": 1.2}) == (
        "199.4 GMAC/s, above the assumed peak (120%): the clock runs faster than assumed")
    assert format_efficiency({"gmacs": None, "peak_fraction": None}) == "n/a, peak n/a"
