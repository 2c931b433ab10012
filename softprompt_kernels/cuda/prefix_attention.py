"""CUDA backend of prefix attention (backend contract: ``softprompt_kernels/ops/prefix_attention.py``).

Calls ``torch.ops.softprompt_kernels_cuda.attn_fwd / attn_bwd`` (csrc/).  Shapes:
q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]``, prefix ``[T, Hkv, P, D]`` + index ``[B]``, any
strides, D <= 256, float32/float16/bfloat16.  Attention dropout: the keep decision of
probability (b, h, i, c) is ``spk::dropout_keep`` in ``csrc/prefix_attention_common.cuh`` (an
integer hash of seed, b, h, i, c); ``dropout_keep_mask`` reproduces it with tensor arithmetic.

Forward kernels: the tensor-core kernel (``csrc/prefix_attention_fwd_tc.cu``: mma.sync m16n8k16,
ldmatrix, cp.async; sm_80+) for float16/bfloat16, D <= 128 with D % 8 == 0, unit last stride and
16-byte aligned pointers and row strides, dropout included; the SIMT kernel otherwise.
``last_path()`` says which one the last forward ran and why.  Backward: the tensor-core dK/dV and
dQ kernels (``csrc/prefix_attention_bwd_tc.cu``) under the same conditions plus a dout that meets
them, the SIMT kernels otherwise; ``last_path("bwd")``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._build import ops

_M1, _M2, _U32 = 0x7FEB352D, 0x5BD1E995, 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """``spk::mix32`` on int64 tensors holding uint32 values (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _U32
    x = x ^ (x >> 15)
    x = (x * _M2) & _U32
    return x ^ (x >> 16)


# FwdPath codes of csrc/launchers.h
PATH_NAMES = {
    0: "none: no forward ran",
    1: "tensor_core",
    2: "simt: float32 inputs",
    3: "simt: head dim not <= 128 or not a multiple of 8",
    4: "simt: a last stride != 1 or a pointer / row stride not 16-byte aligned",
    5: "simt: GPU below sm_80",
    6: "simt: built without the CuTe headers (pip install nvidia-cutlass)",
    7: "simt: forced by SOFTPROMPT_KERNELS_CUDA_FWD=simt",
    8: "simt: scale <= 0 or not finite",
}
_last = {"fwd": PATH_NAMES[0], "bwd": "none: no backward ran"}


def _bwd_path_name(code: int) -> str:
    if code == 7:
        return "simt: forced by SOFTPROMPT_KERNELS_CUDA_BWD=simt"
    if code == 4:
        return "simt: a last stride != 1 or a pointer / row stride not 16-byte aligned (q, k, v, prefix or dout)"
    return PATH_NAMES.get(code, "unknown")


def last_path(kind: str = "fwd") -> str:
    """Kernel path of the last ``backend="cuda"`` call of ``kind`` ("fwd" or "bwd") in this process:
    ``"tensor_core"`` or ``"simt: <reason>"``."""
    return _last[kind]


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor,
    prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], prefix_index: Optional[Tensor],
    key_padding_mask: Optional[Tensor], *, causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``out [B, Hq, L, D]`` (q.dtype, contiguous) and ``lse [B, Hq, L]`` float32."""
    out, lse = ops().attn_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, bool(causal), float(scale),
                              float(dropout_p), int(seed))
    _last["fwd"] = PATH_NAMES.get(int(ops().last_fwd_path()), "unknown")
    return out, lse


def attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
    prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], prefix_index: Optional[Tensor],
    key_padding_mask: Optional[Tensor], out: Tensor, lse: Tensor, *,
    causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool,
):
    """Returns ``(dq, dk, dv, dprefix_k, dprefix_v)``; the prefix grads are None without a prefix.

    deterministic=True: per-row float32 partials reduced over rows in a fixed order (same
    bits every run); False: float32 atomics into one buffer per task.
    """
    dq, dk, dv, dpk, dpv = ops().attn_bwd(
        dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        bool(causal), float(scale), float(dropout_p), int(seed), bool(deterministic),
    )
    _last["bwd"] = _bwd_path_name(int(ops().last_bwd_path()))
    if prefix_k is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, dpk, dpv


def dropout_keep_mask(seed, B, Hq, L, P, S, dropout_p, device):
    """Bool keep mask ``[B, Hq, L, P + S]`` exactly as the kernels draw it (column c < P: prefix)."""
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=device)  # noqa: E731
    x = _mix32(ar(P + S).view(1, 1, 1, -1))
    x = _mix32(x ^ ar(L).view(1, 1, -1, 1))
    x = _mix32(x ^ ar(Hq).view(1, -1, 1, 1))
    x = _mix32(x ^ ar(B).view(-1, 1, 1, 1))
    seed = int(seed)
    x = _mix32(x ^ ((seed >> 32) & _U32))
    x = _mix32(x ^ (seed & _U32))
    u = (x >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u >= torch.tensor(float(dropout_p), dtype=torch.float32).item()
