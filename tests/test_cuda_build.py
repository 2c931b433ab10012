"""Static checks of the CUDA backend on a machine without a GPU.

* every ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90a (``-O3 -Xptxas -v``, to
  object files, all shipped template instantiations); no kernel may spill or use a stack
  frame; registers per kernel are reported (``pytest -s`` prints the table);
* ``csrc/binding.cpp`` compiles against torch's headers with torch's extension flags;
* a missing toolchain gives a clear error; ``setup.py`` builds nothing unless asked.

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


def _compile_cu(src: Path, arch: str, out_dir: Path) -> tuple[str, str, int]:
    obj = out_dir / f"{src.stem}.{arch}.o"
    cmd = [NVCC, "-std=c++17", "-O3", "-c", "-gencode", ARCHS[arch], "-Xptxas", "-v", f"-I{CSRC}", str(src), "-o", str(obj)]
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
    m = re.match(r"_ZN3spk\d+(\w+?)I(.*)E(?:E)?vN?S?", mangled)
    if not m:
        return mangled
    name, targs = m.group(1), m.group(2)
    dt = next((v for k, v in DTYPES.items() if targs.startswith(k)), "?")
    if name == "mlp_bias_act_kernel":  # <input type, storage type>
        rest = targs[len(next((k for k in DTYPES if targs.startswith(k)), "")):]
        dt += "->" + next((v for k, v in DTYPES.items() if rest.startswith(k)), dt)
    d = re.search(r"Li(\d+)E", targs)
    stats = ", stats" if "Lb1E" in targs else ""
    return f"{name}<{dt}{', D=' + d.group(1) if d else ''}{stats}>"


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
    report: dict[tuple[str, str], dict] = {}
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
