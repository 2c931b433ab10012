"""Host-side test of the CUDA kernels' shared ``__host__ __device__`` helpers.

``csrc/tests/host_test.cpp`` includes ``csrc/prefix_attention_common.cuh`` and
``csrc/prefix_mlp_common.cuh`` (index arithmetic, visibility predicates, online softmax /
LSE merge, activations and their derivatives, the MLP output layout) and checks them
against brute-force definitions.  Built twice: with g++ (plain host C++) and, when nvcc is
installed, with ``nvcc -x cu`` so the helpers are compiled exactly as the kernels see them
(``__host__ __device__ __forceinline__``) and run on the host.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "tests" / "host_test.cpp"


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _build_and_run(cmd: list[str], exe: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"compile failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def test_host_helpers_gxx(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++)")
    exe = tmp_path / "host_test"
    _build_and_run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", str(SRC), "-o", str(exe)], exe)


def test_host_helpers_nvcc_host_pass(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install the CUDA toolkit)")
    exe = tmp_path / "host_test_nvcc"
    # host code only: no GPU code generation needed to run it here
    _build_and_run([nvcc, "-std=c++17", "-O1", "-x", "cu", "-arch=sm_80", str(SRC), "-o", str(exe)], exe)
