"""Locate, build (JIT, ninja) and load the CUDA extension of ``csrc/``.

The extension registers its ops with ``TORCH_LIBRARY(softprompt_kernels_cuda, ...)``; it is a
plain shared library (no Python module), loaded with ``torch.ops.load_library``.  Order:
an ahead-of-time build next to this package (``setup.py`` with
``SOFTPROMPT_KERNELS_BUILD_CUDA=1``), else a JIT build with
``torch.utils.cpp_extension.load`` into torch's extension cache.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

LIB_NAMESPACE = "softprompt_kernels_cuda"
_PKG_DIR = Path(__file__).resolve().parents[1]  # softprompt_kernels/
_AOT_GLOB = "_cuda_ops*.so"
_lock = threading.Lock()
_loaded = False


class CudaBackendUnavailable(RuntimeError):
    """The CUDA backend cannot be built or loaded here; the message says how to fix it."""


def csrc_dir() -> Path:
    """The ``csrc/`` directory (override with ``SOFTPROMPT_KERNELS_CSRC``)."""
    env = os.environ.get("SOFTPROMPT_KERNELS_CSRC")
    return Path(env) if env else _PKG_DIR.parent / "csrc"


def cuda_sources(root: Optional[Path] = None) -> list[Path]:
    """Every source the extension is built from: the binding and all ``.cu`` files."""
    root = root or csrc_dir()
    return [root / "binding.cpp"] + sorted(root.glob("*.cu"))


CUTLASS_HINT = (
    "the CUDA backend's tensor-core kernels need the CuTe headers of the nvidia-cutlass package "
    "(pip install nvidia-cutlass, or pip install 'softprompt-kernels[cuda]'; or set "
    "SOFTPROMPT_KERNELS_CUTLASS_INCLUDE to a CUTLASS include/ directory); without them only the SIMT kernels are built"
)


def cutlass_include_dir() -> Optional[Path]:
    """Include directory holding ``cute/`` (``$SOFTPROMPT_KERNELS_CUTLASS_INCLUDE``, else the installed
    ``nvidia-cutlass`` package's ``cutlass_library/source/include``); None when absent.  Imports nothing."""
    cands: list[Path] = []
    env = os.environ.get("SOFTPROMPT_KERNELS_CUTLASS_INCLUDE")
    if env:
        cands.append(Path(env))
    else:
        spec = importlib.util.find_spec("cutlass_library")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            cands.append(Path(loc) / "source" / "include")
    for cand in cands:
        if (cand / "cute" / "arch" / "mma_sm80.hpp").exists():
            return cand
    return None


def tensor_core_build_flags() -> tuple[list[str], list[str]]:
    """(include dirs, nvcc flags) that enable the tensor-core kernels; ([], []) without CuTe."""
    inc = cutlass_include_dir()
    return ([str(inc)], ["-DSPK_WITH_CUTE"]) if inc is not None else ([], [])


def _find_nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        cand = Path(CUDA_HOME) / "bin" / "nvcc"
        if cand.exists():
            return str(cand)
    return shutil.which("nvcc")


def toolchain_problem(need_device: bool = True) -> Optional[str]:
    """None when the extension can be built and used here, else what is missing and how to fix it."""
    if torch.version.cuda is None:
        return (
            f"the CUDA backend needs a CUDA build of PyTorch, but torch {torch.__version__} is a CPU-only build; "
            "install a CUDA wheel (e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128) "
            "or use backend='triton' / backend='torch'"
        )
    if need_device and not torch.cuda.is_available():
        return "the CUDA backend needs a visible CUDA GPU (torch.cuda.is_available() is False)"
    if _find_aot_library() is None:
        if _find_nvcc() is None:
            return (
                "the CUDA backend is built on first use, which needs nvcc: install the CUDA toolkit matching "
                f"torch's CUDA {torch.version.cuda} and set CUDA_HOME (or put nvcc on PATH), or build ahead of time "
                "with SOFTPROMPT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation ."
            )
        try:
            import ninja  # noqa: F401
        except ImportError:
            if shutil.which("ninja") is None:
                return "the CUDA backend's JIT build needs ninja: pip install ninja"
        missing = [str(p) for p in cuda_sources() if not p.exists()]
        if missing:
            return (
                f"CUDA sources not found ({', '.join(missing)}); use a source checkout / editable install, "
                "set SOFTPROMPT_KERNELS_CSRC to the csrc/ directory, or build ahead of time with "
                "SOFTPROMPT_KERNELS_BUILD_CUDA=1"
            )
    return None


def _find_aot_library() -> Optional[Path]:
    found = sorted(_PKG_DIR.glob(_AOT_GLOB))
    return found[0] if found else None


def load(verbose: bool = False) -> None:
    """Build if needed and load the extension (idempotent, thread-safe)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        problem = toolchain_problem()
        if problem:
            raise CudaBackendUnavailable(problem)
        aot = _find_aot_library()
        if aot is not None:
            torch.ops.load_library(str(aot))
        else:
            from torch.utils.cpp_extension import load as jit_load

            root = csrc_dir()
            tc_inc, tc_flags = tensor_core_build_flags()
            if not tc_flags:
                warnings.warn(CUTLASS_HINT, RuntimeWarning, stacklevel=2)
            jit_load(
                name=LIB_NAMESPACE,
                sources=[str(p) for p in cuda_sources(root)],
                extra_include_paths=[str(root)] + tc_inc,
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"] + tc_flags,
                is_python_module=False,
                verbose=verbose,
            )
        _loaded = True


def ops():
    """``torch.ops.softprompt_kernels_cuda`` after loading the extension."""
    load()
    return getattr(torch.ops, LIB_NAMESPACE)
