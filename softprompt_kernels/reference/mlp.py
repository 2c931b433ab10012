"""Plain-PyTorch ground truth for the prefix MLP (DESIGN.md §2, "Prefix MLP layout").

``out = (act(x @ w1.T + b1) @ w2.T + b2).view(P, L, 2, Hkv, D).permute(1, 2, 3, 0, 4)``

Differentiable and computed in the dtype it is given: upcast to float64 for ground
truth, or call it with low-precision inputs to get "plain PyTorch math in the same
precision" for the tolerance rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("tanh", "relu", "gelu", "identity")


def reference_activation(h: Tensor, activation: str) -> Tensor:
    """``act(h)`` with torch's own functions (gelu = exact erf form, nn.GELU's default)."""
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "relu":
        return torch.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "identity":
        return h
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def prefix_mlp_reference(
    x: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    activation: str = "tanh",
) -> Tensor:
    """x [P, E]; w1 [H1, E]; b1 [H1] | None; w2 [L*2*Hkv*D, H1]; b2 [L*2*Hkv*D] | None.

    Returns ``[num_layers, 2, num_kv_heads, P, head_dim]`` (contiguous): output column
    ``c = ((layer*2 + kv)*Hkv + h)*D + d`` of the second Linear lands at ``out[layer, kv, h, p, d]``.
    """
    P = x.shape[0]
    hidden = reference_activation(F.linear(x, w1, b1), activation)
    flat = F.linear(hidden, w2, b2)
    return flat.view(P, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
