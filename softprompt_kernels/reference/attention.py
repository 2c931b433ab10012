"""Plain-PyTorch ground truth for prefix attention (DESIGN.md §2).

Simple, differentiable math with an explicit ``torch.cat`` of the prefix: it exists to
be obviously right, not fast.  Upcast inputs to float64 for ground truth.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def visibility_mask(
    B: int, L: int, S: int, P: int, *, causal: bool, key_padding_mask: Optional[Tensor], device
) -> Tensor:
    """Bool ``[B, 1, L, P + S]``: True where query row i may see combined column c.

    Prefix columns (c < P) are always visible; sequence column j = c - P is visible iff
    ``(not causal or j <= i + S - L)`` and ``key_padding_mask[b, j]``.
    """
    seq = torch.ones(L, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        seq = j <= i + (S - L)
    seq = seq.expand(B, 1, L, S)
    if key_padding_mask is not None:
        seq = seq & key_padding_mask[:, None, None, :].to(torch.bool)
    pre = torch.ones(B, 1, L, P, dtype=torch.bool, device=device)
    return torch.cat([pre, seq], dim=-1)


def prefix_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor] = None,
    prefix_v: Optional[Tensor] = None,
    prefix_index: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Reference prefix attention in the dtype of its inputs.

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]``; prefix_k/v ``[T, Hkv, P, D]`` or None;
    prefix_index int ``[B]`` (row b uses task ``prefix_index[b]``; None means task 0 for
    every row when T == 1); key_padding_mask bool ``[B, S]``; dropout_mask bool keep mask
    ``[B, Hq, L, P + S]`` (kept probabilities scaled by ``1 / (1 - dropout_p)``).

    Returns ``out [B, Hq, L, D]`` and ``lse [B, Hq, L]`` (natural log, over visible
    columns, before dropout; ``-inf`` and a zero output for rows that see nothing).
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if scale is None:
        scale = D ** -0.5
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        if prefix_index is None:
            if prefix_k.shape[0] != 1:
                raise ValueError("prefix_index is required when the prefix has T > 1 tasks")
            prefix_index = torch.zeros(B, dtype=torch.long, device=q.device)
        pk = prefix_k[prefix_index.long()]  # [B, Hkv, P, D]
        pv = prefix_v[prefix_index.long()]
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        P = pk.shape[2]
    else:
        P = 0
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, L, P+S]
    visible = visibility_mask(B, L, S, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows that see nothing get finite dummy scores so that gradients stay finite,
    # then a zero output and lse = -inf.
    seen = visible.any(dim=-1)  # [B, 1, L]
    scores = torch.where(seen[..., None], scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1) * seen[..., None]
    lse = lse.masked_fill(~seen, float("-inf"))
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        raise ValueError("the reference needs an explicit dropout_mask when dropout_p > 0")
    out = torch.matmul(probs, v)
    return out, lse.float() if lse.dtype in (torch.float16, torch.bfloat16) else lse


def prefix_attention_reference_f64(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """``prefix_attention_reference`` on float64 copies of every floating input."""
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    kw = {n: (a.double() if isinstance(a, Tensor) and a.is_floating_point() else a) for n, a in kwargs.items()}
    return prefix_attention_reference(*up, **kw)


__all__ = ["prefix_attention_reference", "prefix_attention_reference_f64", "visibility_mask"]
