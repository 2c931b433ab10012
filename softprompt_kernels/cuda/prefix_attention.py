"""CUDA backend of prefix attention (backend contract: ``softprompt_kernels/ops/prefix_attention.py``).

Calls ``torch.ops.softprompt_kernels_cuda.attn_fwd / attn_bwd`` (csrc/).  Shapes:
q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]``, prefix ``[T, Hkv, P, D]`` + index ``[B]``, any
strides, D <= 256, float32/float16/bfloat16.  Attention dropout is not implemented in
the CUDA kernels yet: ``dropout_p > 0`` raises NotImplementedError.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._build import ops

_NO_DROPOUT = (
    "attention dropout is not implemented in the CUDA backend yet (dropout_p={p}); "
    "use backend='triton' or backend='torch' for dropout_p > 0"
)


def _check_dropout(dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise NotImplementedError(_NO_DROPOUT.format(p=dropout_p))


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor,
    prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], prefix_index: Optional[Tensor],
    key_padding_mask: Optional[Tensor], *, causal: bool, scale: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Returns ``out [B, Hq, L, D]`` (q.dtype, contiguous) and ``lse [B, Hq, L]`` float32."""
    _check_dropout(dropout_p)
    out, lse = ops().attn_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, bool(causal), float(scale))
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
    _check_dropout(dropout_p)
    dq, dk, dv, dpk, dpv = ops().attn_bwd(
        dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        bool(causal), float(scale), bool(deterministic),
    )
    if prefix_k is None:
        return dq, dk, dv, None, None
    return dq, dk, dv, dpk, dpv


def dropout_keep_mask(seed, B, Hq, L, P, S, dropout_p, device):
    """Not available: the CUDA kernels have no dropout yet."""
    raise NotImplementedError(_NO_DROPOUT.format(p=dropout_p))
