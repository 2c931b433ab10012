"""Ahead-of-time compiles of every shipped Triton kernel configuration for sm_80 and sm_90.

The compiles run in a subprocess (``python -m softprompt_kernels.triton.aot``) with
``TRITON_INTERPRET`` removed, because conftest.py turns the interpreter on for this process.
Compiles go through Triton's normal cache (``TRITON_CACHE_DIR`` or ``~/.triton/cache``; keyed
by kernel source, options and Triton version, so a hit returns the same binary); set
``SPK_AOT_COLD=1`` to compile into a fresh temp cache instead.  When ``<repo>/.triton36`` holds
a side-by-side Triton 3.6 (the fleet GPU image's version; ``pip install --no-deps --target
.triton36 triton==3.6.0``) the compile tests also run under it; there the shipped kernels are
compiled as the representative subset (first and last spec of every kernel function, see
``aot.representative``) unless ``SPK_AOT_FULL_TRITON36=1``.  ``SPK_AOT_TIMEOUT`` (seconds,
default 900) bounds each driver run.
"""
import importlib
import os
from pathlib import Path

import pytest

from softprompt_kernels.triton import aot

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TRITON36 = ROOT / ".triton36"

# Explicit on purpose: a kernel module that is expected but missing (or ships no specs) fails.
EXPECTED_KERNEL_MODULES = [
    "softprompt_kernels.triton.prefix_attention",
    "softprompt_kernels.triton.prefix_mlp",
]

def _cache_dir(tmp_path):
    return str(tmp_path / "triton_cache") if os.environ.get("SPK_AOT_COLD") == "1" else None


TRITONS = [
    pytest.param((), id="triton-venv"),
    pytest.param((str(TRITON36),), id="triton-3.6", marks=pytest.mark.skipif(
        not (TRITON36 / "triton").is_dir(),
        reason=f"no side-by-side triton 3.6 in {TRITON36} (pip install --no-deps --target .triton36 triton==3.6.0)")),
]


# ------------------------------------------------------------------ parser / occupancy (fast)
CUOBJDUMP_SPILL = """
Resource usage:
 Common:
  GLOBAL:0
 Function attn_fwd:
  REG:168 STACK:0 SHARED:0 LOCAL:64 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function attn_bwd:
  REG:255 STACK:96 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function clean:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage_and_spill_detector():
    usage = aot.parse_resource_usage(CUOBJDUMP_SPILL)
    assert set(usage) == {"attn_fwd", "attn_bwd", "clean"}
    assert usage["attn_fwd"]["REG"] == 168 and usage["attn_fwd"]["LOCAL"] == 64
    assert usage["attn_bwd"]["STACK"] == 96 and usage["attn_bwd"]["SHARED"] == 1024
    assert usage["attn_bwd"]["CONSTANT[0]"] == 600

    def res(fn, arch=90, warps=4):
        base = aot.AotResult(module="m", name=fn, arch=arch, num_warps=warps)
        return aot.result_from_usage(base, usage[fn], shared_dynamic=49152, ptx="mma.sync.aligned")

    fwd, bwd, clean = res("attn_fwd"), res("attn_bwd"), res("clean")
    assert fwd.spills and fwd.local_bytes == 64           # LOCAL only
    assert bwd.spills and bwd.stack_bytes == 96           # STACK only
    assert not clean.spills
    assert bwd.shared_bytes == 1024 + 49152
    assert not fwd.wgmma                                  # mma.sync is not wgmma
    wg = aot.result_from_usage(aot.AotResult(module="m", name="x", arch=90, num_warps=4), usage["clean"], 0,
                               ptx="wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16")
    assert wg.wgmma


def test_theoretical_occupancy_hand_computed():
    occ = aot.theoretical_occupancy
    # 255 regs: 255*32 -> 8192 regs/warp; 16384 regs per sub-partition -> 2 warps each -> 8 warps/SM.
    assert occ(80, 255, 8, 32768) == {"blocks_per_sm": 1, "warps_per_sm": 8, "occupancy_pct": 12.5,
                                      "limiter": "registers"}
    # 128 regs, 4 warps: 4096 regs/warp -> 4 warps/partition -> 16 warps -> 4 blocks; smem 64 KiB+1 KiB -> 2 blocks (A100)
    assert occ(80, 128, 4, 65536)["blocks_per_sm"] == 2
    assert occ(80, 128, 4, 65536)["limiter"] == "shared memory"
    # H100 has 228 KiB: 3 blocks of 65 KiB fit, registers allow 4
    assert occ(90, 128, 4, 65536)["blocks_per_sm"] == 3
    # 32 regs, 4 warps, no smem: threads limit 2048/128 = 16 blocks = 64 warps = 100 %
    assert occ(90, 32, 4, 0) == {"blocks_per_sm": 16, "warps_per_sm": 64, "occupancy_pct": 100.0,
                                 "limiter": "threads"}
    # 1 warp per block: the 32-block limit caps at 32 warps
    assert occ(80, 32, 1, 0)["warps_per_sm"] == 32 and occ(80, 32, 1, 0)["limiter"] == "blocks"
    # more shared memory than a block may have -> cannot launch
    assert occ(80, 64, 4, 170 * 1024)["blocks_per_sm"] == 0
    assert occ(90, 64, 4, 170 * 1024)["blocks_per_sm"] == 1
    # 255 regs x 16 warps = 128K regs > 64K per block -> cannot launch
    assert occ(90, 255, 16, 0)["blocks_per_sm"] == 0 and occ(90, 255, 16, 0)["limiter"] == "registers"


def test_format_table_marks_errors_spills_and_missing_wgmma():
    ok = aot.AotResult(module="m", name="k_ok", arch=90, num_warps=4, expect_wgmma=True, regs=100, wgmma=False,
                       warps_per_sm=16, occupancy_pct=25.0, occupancy_limiter="registers")
    sp = aot.AotResult(module="m", name="k_spill", arch=80, num_warps=4, regs=255, spills=True, stack_bytes=8)
    bad = aot.AotResult(module="m", name="k_bad", arch=80, error="CompilationError: boom")
    text = aot.format_table([ok, sp, bad])
    assert "MISSING" in text and "STACK 8" in text and "CompilationError: boom" in text


def test_representative_subset_covers_every_kernel_function():
    from types import SimpleNamespace as NS

    def f(name):
        return NS(__name__=name)

    fa, fb = f("fwd"), f("bwd")
    specs = [NS(fn=fa, expect_wgmma=True), NS(fn=fa, expect_wgmma=True), NS(fn=fa, expect_wgmma=True),
             NS(fn=fa, expect_wgmma=False), NS(fn=fb, expect_wgmma=False), NS(fn=fa, expect_wgmma=False)]
    assert aot.representative(specs) == [0, 2, 3, 4, 5]


def test_run_refuses_interpreter_in_process():
    assert os.environ.get("TRITON_INTERPRET") == "1"      # conftest.py
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.run(["aot_fixture_kernels"], (90,))


# -------------------------------------------------------- the driver on fixture kernels
@pytest.mark.parametrize("pythonpath", TRITONS)
def test_driver_on_fixture_kernels(pythonpath, tmp_path):
    """Known facts: GEMM uses wgmma on sm_90 only, axpy never; the spill kernel spills; a bad spec errors."""
    results, proc = aot.run_subprocess(
        ["aot_fixture_kernels", "aot_fixture_kernels:spill_specs", "aot_fixture_kernels:bad_specs",
         "aot_fixture_no_such_module"],
        (80, 90), cache_dir=_cache_dir(tmp_path), pythonpath=[*pythonpath, str(TESTS)], timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr          # the bad spec makes the run fail
    by = {(r["name"], r["arch"]): r for r in results}
    assert len(by) == len(results) == 9
    missing = by["<module>", 0]
    assert missing["module"] == "aot_fixture_no_such_module" and "ModuleNotFoundError" in missing["error"]
    if pythonpath:
        assert all(r["triton_version"].startswith("3.6") for r in results if r["name"] != "<module>")
    for arch in (80, 90):
        gemm, axpy, spill = by["gemm[fp16,128x128x64]", arch], by["axpy[fp32,1024]", arch], \
            by["spill[fp32,64x64,1warp]", arch]
        for r in (gemm, axpy, spill):
            assert r["error"] is None, r
            assert 0 < r["regs"] <= 255 and r["compile_s"] > 0
        assert gemm["wgmma"] is (arch == 90)
        assert axpy["wgmma"] is False
        assert not gemm["spills"] and not axpy["spills"]
        assert spill["spills"] and spill["stack_bytes"] + spill["local_bytes"] > 0
        assert gemm["shared_dynamic"] > 0 and 0 < gemm["occupancy_pct"] <= 100
        bad = by["gemm[missing K]", arch]
        assert bad["error"] and "'K'" in bad["error"]


# ------------------------------------------------------------- the shipped kernel modules
def test_expected_module_list_matches_driver():
    assert list(aot.KERNEL_MODULES) == EXPECTED_KERNEL_MODULES


@pytest.mark.parametrize("pythonpath", TRITONS)
def test_shipped_kernels_compile_without_spills(pythonpath, tmp_path):
    """Every spec of every kernel module compiles for sm_80 and sm_90, no spills, wgmma where expected."""
    subset = "representative" if pythonpath and os.environ.get("SPK_AOT_FULL_TRITON36") != "1" else "all"
    results, proc = aot.run_subprocess(EXPECTED_KERNEL_MODULES, (80, 90), cache_dir=_cache_dir(tmp_path),
                                       subset=subset, pythonpath=list(pythonpath),
                                       timeout=float(os.environ.get("SPK_AOT_TIMEOUT", "900")))
    print(aot.format_table(results))
    print(proc.stdout.splitlines()[-1] if proc.stdout else proc.stderr[-2000:])
    problems = [f"{r['module']} {r['name']} sm_{r['arch']}: {r['error']}" for r in results if r["error"]]
    for mod in EXPECTED_KERNEL_MODULES:
        mine = [r for r in results if r["module"] == mod and not r["error"]]
        if not mine:
            problems.append(f"{mod}: no compiled specs")
        # every spec compiles for exactly the archs it ships for (KernelSpec.archs); the subset
        # compiled is that of the driver (see aot.representative), read from the results' names
        specs = {s.name: s for s in importlib.import_module(mod).aot_specs()}
        compiled = {(r["name"], r["arch"]) for r in mine}
        for name in {r["name"] for r in results if r["module"] == mod and r["name"] != "<module>"}:
            want = {(name, a) for a in specs[name].archs if a in (80, 90)}
            if not want <= compiled or any(n == name and a not in specs[name].archs for n, a in compiled):
                problems.append(f"{mod} {name}: compiled for {sorted(a for n, a in compiled if n == name)}, "
                                f"ships for {specs[name].archs}")
    for r in results:
        if r["error"]:
            continue
        if r["spills"]:
            problems.append(f"{r['name']} sm_{r['arch']}: spills (STACK {r['stack_bytes']}, LOCAL {r['local_bytes']})")
        if r["arch"] == 90 and r["expect_wgmma"] and not r["wgmma"]:
            problems.append(f"{r['name']} sm_90: no wgmma in PTX")
        if r["blocks_per_sm"] == 0:
            problems.append(f"{r['name']} sm_{r['arch']}: cannot launch ({r['occupancy_limiter']})")
    if pythonpath:
        assert all(r["triton_version"].startswith("3.6") for r in results if not r["error"])
    assert not problems, "\n".join(problems)
    assert proc.returncode == 0
