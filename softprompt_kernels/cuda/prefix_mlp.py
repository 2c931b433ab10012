"""CUDA backend of the prefix MLP (interface: ``softprompt_kernels/ops/torch_mlp.py`` /
``ops/prefix_mlp.py``).

GEMMs run in cuBLAS through ATen; the csrc/ kernels fuse bias + activation (saving the
pre-activation ``[P, H1]``), the store into ``[num_layers, 2, Hkv, P, D]``, the gather of
the output gradient fused with ``db2``, and ``dH * act'(pre)`` fused with ``db1``.  The
backward recomputes ``act(pre)``; nothing else is saved.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._build import ops

ACTIVATIONS = {"identity": 0, "tanh": 1, "relu": 2, "gelu": 3}


def _act_code(activation: str) -> int:
    try:
        return ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}") from None


def mlp_forward(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], *,
    num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``out [num_layers, 2, Hkv, P, D]`` (contiguous) and ``pre = x @ w1.T + b1`` ``[P, H1]``."""
    out, pre = ops().mlp_fwd(x, w1, b1, w2, b2, int(num_layers), int(num_kv_heads), int(head_dim),
                             _act_code(activation))
    return out, pre


def mlp_backward(
    grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, pre: Tensor, *,
    has_b2: bool, num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """grad_out ``[num_layers, 2, Hkv, P, D]`` -> ``(dx, dw1, db1, dw2, db2)``; db* None without bias."""
    dx, dw1, db1, dw2, db2 = ops().mlp_bwd(grad_out, x, w1, b1, w2, pre, bool(has_b2), int(num_layers),
                                           int(num_kv_heads), int(head_dim), _act_code(activation))
    return dx, dw1, (db1 if b1 is not None else None), dw2, (db2 if has_b2 else None)
