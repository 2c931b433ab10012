"""Static checks of the CUDA backend on a machine without a GPU.

* every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90a (``-O3 -Xptxas -v``, to
  object files, all shipped template instantiations); no kernel may spill or use a stack
  frame; registers per kernel are reported (``pytest -s`` prints the table);
* ``csrc/binding.cpp`` compiles against torch's headers with torch's extension flags;
* a missing toolchain gives a clear error; ``setup.py`` builds nothing unless asked;
* the tensor-core forward (``prefix_attention_fwd_tc.cu``, built with the CuTe headers of
  ``nvidia-cutlass``): its SASS for sm_80 and sm_90a has HMMA, LDSM and LDGSTS and no local
  memory traffic (LDL/STL); registers, shared memory and HMMA per main-loop iteration are printed.

Skipped with a reason when nvcc (or g++) is not installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
HEAD_DIMS = (32, 64, 128, 256)


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit or set NVCC)")


def _cuda_include() -> Path | None:
    for cand in (Path(NVCC).resolve().parents[1] / "include" if NVCC else None, Path("/usr/local/cuda/include")):
        if cand is not None and (cand / "cuda_runtime_api.h").exists():
            return cand
    return None


def _tc_flags() -> list[str]:
    from softprompt_kernels.cuda._build import tensor_core_build_flags

    inc, flags = tensor_core_build_flags()
    return [f"-I{p}" for p in inc] + flags


def _compile_cu(src: Path, arch: str, out_dir: Path, extra: list[str] | None = None) -> tuple[str, str, int]:
    obj = out_dir / f"{src.stem}.{arch}.o"
    extra = _tc_flags() if extra is None else extra
    cmd = [NVCC, "-std=c++17", "-O3", "-c", "-gencode", ARCHS[arch], "-Xptxas", "-v", f"-I{CSRC}", *extra, str(src),
           "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return arch, proc.stdout + proc.stderr, proc.returncode


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    """{(kernel, arch): {"regs", "stack", "spill_st", "spill_ld"}} from ``-Xptxas -v`` output."""
    out: dict[tuple[str, str], dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = (m.group(1), m.group(2))
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            out[cur]["regs"] = int(m.group(1))
    return out


def _pretty(mangled: str) -> str:
    m = re.match(r"_ZN3spk(?:2tc)?\d+(\w+?)I(.*)E(?:E)?vN?S?", mangled)
    if not m:
        return mangled
    name, targs = m.group(1), m.group(2)
    dt = next((v for k, v in DTYPES.items() if targs.startswith(k)), "?")
    if name == "mlp_bias_act_kernel":  # <input type, storage type>
        rest = targs[len(next((k for k in DTYPES if targs.startswith(k)), "")):]
        dt += "->" + next((v for k, v in DTYPES.items() if rest.startswith(k)), dt)
    d = re.search(r"Li(\d+)E", targs)
    stats = (", dropout" if name.endswith("_tc_kernel") else ", stats") if "Lb1E" in targs else ""
    return f"{name}<{dt}{', D=' + d.group(1) if d else ''}{stats}>"


@pytest.fixture(scope="module")
def cu_objects(ptxas_report):
    """{(source stem, arch): object file} of the ptxas_report build."""
    return ptxas_report.objects


class _Report(dict):
    objects: dict


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or set NVCC)")
    out_dir = tmp_path_factory.mktemp("cu_objs")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no .cu files in csrc/"
    jobs = [(src, arch) for src in sources for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: (job[0],) + _compile_cu(job[0], job[1], out_dir), jobs))
    report = _Report()
    report.objects = {(src.stem, arch): out_dir / f"{src.stem}.{arch}.o" for src, arch in jobs}
    for src, arch, log, rc in results:
        assert rc == 0, f"nvcc failed on {src.name} for {arch}:\n{log[-4000:]}"
        entries = parse_ptxas(log)
        assert entries, f"no kernels reported for {src.name} {arch}:\n{log[-2000:]}"
        report.update(entries)
    lines = [f"{'kernel':58s} {'arch':7s} regs stack spill_st spill_ld"]
    for (name, arch), r in sorted(report.items(), key=lambda kv: (_pretty(kv[0][0]), kv[0][1])):
        lines.append(f"{_pretty(name):58s} {arch:7s} {r.get('regs', -1):4d} {r.get('stack', -1):5d} "
                     f"{r.get('spill_st', -1):8d} {r.get('spill_ld', -1):8d}")
    print("\n" + "\n".join(lines))
    return report


@needs_nvcc
def test_cu_files_compile_without_spills(ptxas_report):
    bad = {f"{_pretty(k)} {a}": r for (k, a), r in ptxas_report.items()
           if r.get("spill_st") != 0 or r.get("spill_ld") != 0 or r.get("stack") != 0}
    assert not bad, f"kernels with spills / stack frames: {bad}"
    assert all(0 < r["regs"] <= 255 for r in ptxas_report.values())


@needs_nvcc
def test_every_instantiation_is_compiled_for_both_archs(ptxas_report):
    names = {(k, a) for k, a in ptxas_report}
    for arch in ARCHS:
        kernels = {k for k, a in names if a == arch}
        for kind in ("prefix_attn_fwd_kernel", "prefix_attn_bwd_dkdv_kernel", "prefix_attn_bwd_dq_kernel"):
            for dt in DTYPES:
                for d in HEAD_DIMS:
                    want = f"{kind}I{dt}Li{d}E"
                    assert any(want in k for k in kernels), f"missing {kind}<{DTYPES[dt]}, D={d}> for {arch}"
        for d in HEAD_DIMS:  # the exact row-statistics pass of float32 backward
            assert any(f"prefix_attn_bwd_dq_kernelIfLi{d}ELb1E" in k for k in kernels), f"missing dq stats D={d}"
        for want in ("mlp_bias_act_kernelIffE", "mlp_bias_act_kernelIf6__halfE", "mlp_bias_act_kernelIf13__nv_bfloat16E",
                     "mlp_bias_act_kernelI6__halfS1_E", "mlp_bias_act_kernelI13__nv_bfloat16S1_E"):
            assert any(want in k for k in kernels), f"missing {want} for {arch}"
        for kind in ("prefix_attn_bwd_delta_kernel", "prefix_grad_reduce_kernel",
                     "mlp_layout_store_kernel", "mlp_layout_gather_kernel", "mlp_act_bwd_kernel"):
            for dt in DTYPES:
                assert any(f"{kind}I{dt}E" in k for k in kernels), f"missing {kind}<{DTYPES[dt]}> for {arch}"


@needs_nvcc
def test_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++)")
    cuda_inc = _cuda_include()
    assert cuda_inc is not None, "CUDA headers (cuda_runtime_api.h) not found next to nvcc or in /usr/local/cuda"
    # CPU wheels of torch ship the c10/cuda headers but not the configure-generated
    # cuda_cmake_macros.h; provide the CUDA wheel's content for this syntax/semantic compile.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-std=c++20", "-fPIC", "-O1", "-c", str(CSRC / "binding.cpp"), "-o", str(tmp_path / "binding.o"),
           "-DTORCH_EXTENSION_NAME=softprompt_kernels_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Wall", "-Werror=return-type",
           f"-I{CSRC}", f"-I{cuda_inc}", f"-I{tmp_path / 'stub'}"]
    cmd += [f"-I{p}" for p in include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "binding.o").stat().st_size > 0
    nm = shutil.which("nm")
    if nm:  # the TORCH_LIBRARY registrations made it into the object
        syms = subprocess.run([nm, "-C", str(tmp_path / "binding.o")], capture_output=True, text=True).stdout
        assert "softprompt_kernels_cuda" in syms or "TORCH_LIBRARY" in syms or "TorchLibraryInit" in syms


def test_missing_toolchain_gives_clear_error():
    from softprompt_kernels.cuda import _build

    problem = _build.toolchain_problem()
    if problem is None:
        pytest.skip("CUDA torch, GPU and nvcc present: nothing is missing here")
    with pytest.raises(_build.CudaBackendUnavailable) as exc:
        _build.load()
    msg = str(exc.value)
    assert msg == problem
    assert any(word in msg for word in ("install", "set CUDA_HOME", "pip install ninja", "is_available"))


def test_setup_py_builds_nothing_unless_asked(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SOFTPROMPT_KERNELS_BUILD_CUDA"}
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nvcc" not in proc.stdout + proc.stderr
    if torch.version.cuda is None:  # asked on a CPU-only torch: clear failure, nothing compiled
        env["SOFTPROMPT_KERNELS_BUILD_CUDA"] = "1"
        proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--version"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "CUDA build of torch" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Tensor-core forward: SASS gate and static figures
TC_STEM = "prefix_attention_fwd_tc"
TC_DTYPES = {"6__half": "float16", "13__nv_bfloat16": "bfloat16"}
TC_DIMS = (64, 128)
TC_BM = TC_BN = 64
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _cuobjdump() -> str | None:
    try:
        from softprompt_kernels.triton.aot import find_cuobjdump

        return find_cuobjdump()
    except Exception:
        return shutil.which("cuobjdump")


def sass_functions(obj: Path) -> dict[str, list[tuple[int, str, str]]]:
    """{kernel: [(address, opcode, operands)]} of an object file (cuobjdump -sass)."""
    text = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _SASS.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def main_loop(instrs: list[tuple[int, str, str]]) -> list[str]:
    """Opcodes of the backward-branch loop holding the most HMMA (the key-tile loop)."""
    best: list[str] = []
    for addr, op, args in instrs:
        m = re.match(r"\s*0x([0-9a-f]+)", args)
        if op == "BRA" and m and int(m.group(1), 16) < addr:
            body = [o for a, o, _ in instrs if int(m.group(1), 16) <= a <= addr]
            if sum(o.startswith("HMMA") for o in body) > sum(o.startswith("HMMA") for o in best):
                best = body
    return best


@needs_nvcc
def test_tensor_core_forward_sass(ptxas_report, cu_objects):
    from softprompt_kernels.cuda._build import CUTLASS_HINT

    if not _tc_flags():
        pytest.skip(CUTLASS_HINT)
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (ships in the triton wheel)")
    lines = [f"{'tensor-core kernel':44s} {'arch':6s} regs smem_B HMMA/iter LDSM/iter LDGSTS/iter instr/iter "
             "instr/score"]
    for arch in ARCHS:
        funcs = sass_functions(cu_objects[(TC_STEM, arch)])
        for dt, dname in TC_DTYPES.items():
            for d in TC_DIMS:
                for drop in (0, 1):
                    name = next((k for k in funcs if f"prefix_attn_fwd_tc_kernelI{dt}Li{d}ELb{drop}E" in k), None)
                    assert name is not None, f"missing tensor-core kernel {dname} D={d} dropout={drop} for {arch}"
                    ops = [o for _, o, _ in funcs[name]]
                    label = f"{dname} D={d}{' dropout' if drop else ''} {arch}"
                    assert any(o.startswith("HMMA.16816.F32") for o in ops), f"no HMMA.16816 in {label}"
                    assert any(o.startswith("LDSM.16.M88.4") for o in ops), f"no LDSM in {label}"
                    assert any(o.startswith("LDSM.16.MT88.4") for o in ops), f"no LDSM .trans in {label}"
                    assert any(o.startswith("LDGSTS") for o in ops), f"no LDGSTS (cp.async) in {label}"
                    local = sorted({o for o in ops if o.startswith(("LDL", "STL"))})
                    assert not local, f"local-memory traffic {local} in {label}"
                    loop = main_loop(funcs[name])
                    hmma = sum(o.startswith("HMMA") for o in loop)
                    # S = Q K^T: (BN/8)(D/16) mma per warp, O += P V: (BN/16)(D/8): D per 64-key tile
                    assert hmma == d, f"{label}: {hmma} HMMA in the key-tile loop, expected {d}"
                    ldsm = sum(o.startswith("LDSM") for o in loop)
                    assert ldsm == d // 16 * (1 + TC_BN // 16) + TC_BN // 16 * d // 16, f"{label}: {ldsm} LDSM"
                    smem = 2 * (TC_BM * d + 4 * TC_BN * d)  # Q + 2 stages of K and V, 16-bit
                    per_score = len(loop) * 128 / (TC_BM * TC_BN)
                    lines.append(f"{label:44s} {'':6s} {ptxas_report[(name, arch)]['regs']:4d} {smem:6d} "
                                 f"{hmma:9d} {ldsm:9d} {sum(o.startswith('LDGSTS') for o in loop):11d} "
                                 f"{len(loop):10d} {per_score:11.2f}")
    print("\n" + "\n".join(lines))


# Tensor-core backward (prefix_attention_bwd_tc.cu): per main-loop iteration and warp,
#   dK/dV: S^T = K Q^T and dP^T = V dO^T ((BQ/8)(D/16) mma each), dV += P^T dO and dK += dS^T Q
#          ((BQ/16)(D/8) each) for 16 keys x BQ queries;
#   dQ:    S = Q K^T, dP = dO V^T, dQ += dS K ((BN/8)(D/16) each) for 16 queries x BN keys.
TC_BWD_STEM = "prefix_attention_bwd_tc"
TC_BWD_TILE = {("dkdv", 64): 64, ("dkdv", 128): 16, ("dq", 64): 64, ("dq", 128): 32}  # BQ / BN streamed


def _tc_bwd_expected(kind: str, d: int) -> tuple[int, int]:
    """(HMMA, LDSM) per main-loop iteration of one warp."""
    t = TC_BWD_TILE[(kind, d)]
    if kind == "dkdv":
        return 4 * t * d // 128, d // 16 * (2 + t // 8) + t // 16 * d // 8
    return 3 * t * d // 128, d // 16 * (2 + t // 8) + t // 16 * d // 16


@needs_nvcc
def test_tensor_core_backward_sass(ptxas_report, cu_objects):
    from softprompt_kernels.cuda._build import CUTLASS_HINT

    if not _tc_flags():
        pytest.skip(CUTLASS_HINT)
    if _cuobjdump() is None:
        pytest.skip("cuobjdump not found (ships in the triton wheel)")
    lines = [f"{'tensor-core backward kernel':46s} regs HMMA/iter LDSM/iter LDGSTS/iter instr/iter instr/score"]
    for arch in ARCHS:
        funcs = sass_functions(cu_objects[(TC_BWD_STEM, arch)])
        for kind in ("dkdv", "dq"):
            for dt, dname in TC_DTYPES.items():
                for d in TC_DIMS:
                    for drop in (0, 1):
                        name = next((k for k in funcs if f"prefix_attn_bwd_{kind}_tc_kernelI{dt}Li{d}ELb{drop}E" in k),
                                    None)
                        label = f"{kind} {dname} D={d}{' dropout' if drop else ''} {arch}"
                        assert name is not None, f"missing tensor-core backward kernel {label}"
                        ops = [o for _, o, _ in funcs[name]]
                        assert any(o.startswith("HMMA.16816.F32") for o in ops), f"no HMMA.16816 in {label}"
                        assert any(o.startswith("LDSM.16.M88.4") for o in ops), f"no LDSM in {label}"
                        assert any(o.startswith("LDSM.16.MT88.4") for o in ops), f"no LDSM .trans in {label}"
                        assert any(o.startswith("LDGSTS") for o in ops), f"no LDGSTS (cp.async) in {label}"
                        local = sorted({o for o in ops if o.startswith(("LDL", "STL"))})
                        assert not local, f"local-memory traffic {local} in {label}"
                        loop = main_loop(funcs[name])
                        hmma, ldsm = sum(o.startswith("HMMA") for o in loop), sum(o.startswith("LDSM") for o in loop)
                        assert (hmma, ldsm) == _tc_bwd_expected(kind, d), f"{label}: {hmma} HMMA, {ldsm} LDSM per iteration"
                        scores = 64 * TC_BWD_TILE[(kind, d)]  # (keys x queries) per CTA iteration
                        lines.append(f"{label:46s} {ptxas_report[(name, arch)]['regs']:4d} {hmma:9d} {ldsm:9d} "
                                     f"{sum(o.startswith('LDGSTS') for o in loop):11d} {len(loop):10d} "
                                     f"{len(loop) * 128 / scores:11.2f}")
    print("\n" + "\n".join(lines))


@needs_nvcc
def test_tensor_core_file_builds_without_cute(tmp_path):
    """Without the CuTe headers the tensor-core kernels compile to empty bodies (never launched:
    choose_fwd_path returns kSimtNotBuilt) and the rest of the backend still builds."""
    arch, log, rc = _compile_cu(CSRC / f"{TC_STEM}.cu", "sm_80", tmp_path, extra=[])
    assert rc == 0, log[-4000:]
    if _cuobjdump() is not None:
        funcs = sass_functions(tmp_path / f"{TC_STEM}.sm_80.o")
        assert funcs and not any(o.startswith("HMMA") for f in funcs.values() for _, o, _ in f)


def test_cutlass_headers_are_located(monkeypatch, tmp_path):
    from softprompt_kernels.cuda import _build

    monkeypatch.setenv("SOFTPROMPT_KERNELS_CUTLASS_INCLUDE", str(tmp_path))  # no cute/ there
    assert _build.cutlass_include_dir() is None and _build.tensor_core_build_flags() == ([], [])
    (tmp_path / "cute" / "arch").mkdir(parents=True)
    (tmp_path / "cute" / "arch" / "mma_sm80.hpp").write_text("")
    assert _build.cutlass_include_dir() == tmp_path
    assert _build.tensor_core_build_flags() == ([str(tmp_path)], ["-DSPK_WITH_CUTE"])
    monkeypatch.delenv("SOFTPROMPT_KERNELS_CUTLASS_INCLUDE")
    import importlib.util

    if importlib.util.find_spec("cutlass_library") is not None:  # installed by the test extra
        assert _build.cutlass_include_dir() is not None
