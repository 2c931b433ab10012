"""Which backend runs an op: the one rule every op shares."""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: Optional[torch.device], dtype: Optional[torch.dtype] = None) -> str:
    """Map ``backend`` (``auto|triton|cuda|torch``) to a concrete backend for tensors on ``device``.

    ``auto``: Triton for CUDA tensors (the CUDA backend is opt-in until it has been
    verified on a GPU); on CPU the plain-PyTorch path, or Triton when the Triton
    interpreter is enabled.  An explicit ``triton`` on CPU tensors without the
    interpreter, or ``cuda`` on CPU tensors, fails with a clear error.  float64 (a
    reference / debugging precision only the PyTorch path computes) makes ``auto`` pick
    ``torch`` on any device.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if on_cuda:
            return "triton"
        return "triton" if triton_interpreter_enabled() else "torch"
    if backend == "triton" and not on_cuda and not triton_interpreter_enabled():
        raise ValueError(
            "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported; "
            "use backend='torch' (or 'auto') for CPU tensors"
        )
    if backend == "cuda" and not on_cuda:
        raise ValueError("backend='cuda' needs CUDA tensors; use backend='torch' (or 'auto') for CPU tensors")
    return backend
