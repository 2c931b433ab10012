"""PyTorch backend of the prefix MLP (the CPU path); backend interface in ``ops/prefix_mlp.py``.

Explicit forward/backward (no autograd graph): the forward saves only the
pre-activation ``[P, H1]``; the backward recomputes ``act(pre)`` from it.
All math runs in the input dtype with torch's own kernels (fp32 accumulation inside
the GEMMs, as plain PyTorch does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _act(pre: Tensor, activation: str) -> Tensor:
    if activation == "tanh":
        return torch.tanh(pre)
    if activation == "relu":
        return torch.relu(pre)
    if activation == "gelu":
        return F.gelu(pre)
    return pre


def _act_backward(grad: Tensor, pre: Tensor, hidden: Tensor, activation: str) -> Tensor:
    """d act(pre) / d pre applied to ``grad`` (``hidden = act(pre)``)."""
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, hidden)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    return grad


def mlp_forward(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], *,
    num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor]:
    """Returns ``out [L, 2, Hkv, P, D]`` (contiguous) and ``pre = x @ w1.T + b1`` ``[P, H1]``."""
    P = x.shape[0]
    G = num_layers * 2 * num_kv_heads
    pre = F.linear(x, w1, b1)
    flat = F.linear(_act(pre, activation), w2, b2)  # [P, G*D]
    out = torch.empty((G, P, head_dim), dtype=flat.dtype, device=flat.device)
    out.copy_(flat.view(P, G, head_dim).transpose(0, 1))  # the one layout pass of this path
    return out.view(num_layers, 2, num_kv_heads, P, head_dim), pre


def mlp_backward(
    grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, pre: Tensor, *,
    has_b2: bool, num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """grad_out ``[L, 2, Hkv, P, D]`` (any strides) -> ``(dx, dw1, db1, dw2, db2)``; db* None without bias."""
    P = x.shape[0]
    G = num_layers * 2 * num_kv_heads
    g = grad_out.reshape(G, P, head_dim)
    g_flat = g.transpose(0, 1).reshape(P, G * head_dim)  # [P, N]
    hidden = _act(pre, activation)
    dw2 = g_flat.t().mm(hidden)
    db2 = g_flat.sum(0) if has_b2 else None
    dpre = _act_backward(g_flat.mm(w2), pre, hidden, activation)
    dw1 = dpre.t().mm(x)
    db1 = dpre.sum(0) if b1 is not None else None
    dx = dpre.mm(w1)
    return dx, dw1, db1, dw2, db2
