"""Ahead-of-time build of the CUDA extension (csrc/); all metadata lives in pyproject.toml.

Nothing is compiled unless ``SOFTPROMPT_KERNELS_BUILD_CUDA=1`` is set, so a plain
``pip install -e .`` works on CPU-only machines and stays fast.  To build the kernels ahead of
time (needs a CUDA build of torch, nvcc and ninja; torch must be importable, hence no build
isolation)::

    SOFTPROMPT_KERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
        pip install --no-build-isolation -e .

The result is ``softprompt_kernels/_cuda_ops*.so``, which ``softprompt_kernels.cuda._build``
loads instead of JIT-compiling on first use.
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("SOFTPROMPT_KERNELS_BUILD_CUDA", "0") != "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        raise RuntimeError(
            "SOFTPROMPT_KERNELS_BUILD_CUDA=1 needs torch importable at build time: "
            "install a CUDA build of torch first and use pip install --no-build-isolation"
        ) from exc
    if torch.version.cuda is None or CUDA_HOME is None:
        raise RuntimeError(
            "SOFTPROMPT_KERNELS_BUILD_CUDA=1 needs a CUDA build of torch "
            f"(found {torch.__version__}) and the CUDA toolkit (nvcc; set CUDA_HOME)"
        )
    import sys

    sys.path.insert(0, str(ROOT))
    from softprompt_kernels.cuda._build import CUTLASS_HINT, tensor_core_build_flags

    tc_inc, tc_flags = tensor_core_build_flags()  # CuTe headers (nvidia-cutlass) -> tensor-core kernels
    if not tc_flags:
        print(f"warning: {CUTLASS_HINT}", file=sys.stderr)
    csrc = ROOT / "csrc"
    sources = ["csrc/binding.cpp"] + sorted(f"csrc/{p.name}" for p in csrc.glob("*.cu"))
    ext = CUDAExtension(
        name="softprompt_kernels._cuda_ops",
        sources=sources,
        include_dirs=[str(csrc)] + tc_inc,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"] + tc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
