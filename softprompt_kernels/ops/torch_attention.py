"""Plain-PyTorch backend of prefix attention: the CPU path.

Implements the backend contract of ``ops/prefix_attention.py`` with explicit forward
and backward functions (the backward recomputes the probabilities, so autograd keeps
only q, k, v, the prefix, out and lse, as the fused kernels do).
Math runs in float32 (float64 for float64 inputs); work is chunked over batch rows
to bound the ``[rows, Hq, L, P + S]`` temporaries.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# Upper bound on the elements of one [rows, Hq, L, P+S] score block.
_CHUNK_ELEMENTS = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_seed(seed: int, b: int) -> int:
    """Seed of batch row ``b``'s dropout stream (independent of chunking)."""
    return (seed * 1_000_003 + b * 7_919 + 1) % (2**63 - 1)


def dropout_keep_mask(seed: int, B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, device) -> Tensor:
    """Bool keep mask ``[B, Hq, L, P + S]`` exactly as this backend draws it."""
    return torch.stack([_row_keep(seed, b, Hq, L, P + S, dropout_p, device) for b in range(B)])


def _row_keep(seed: int, b: int, Hq: int, L: int, C: int, dropout_p: float, device) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(_row_seed(seed, b))
    return torch.rand((Hq, L, C), generator=gen, device=device) >= dropout_p


def _chunks(B: int, per_row: int):
    rows = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, B, rows):
        yield start, min(B, start + rows)


def _joint_kv(k: Tensor, v: Tensor, prefix_k, prefix_v, prefix_index, rows: slice, dtype, key_padding_mask=None):
    """K and V of rows ``rows`` with the prefix in front: ``[r, Hkv, P + S, D]``.

    Padded-out keys and values are replaced by zeros (out of place): their
    probabilities are exactly 0, but ``0 * nan`` would still poison ``P @ V`` and
    ``dS @ K`` (buffers from ``torch.empty`` hold anything). Masked keys and values
    contribute nothing at all, forward or backward (DESIGN §2).
    """
    kr, vr = k[rows].to(dtype), v[rows].to(dtype)
    if key_padding_mask is not None:
        real = key_padding_mask[rows][:, None, :, None]
        zero = torch.zeros((), dtype=dtype, device=kr.device)
        kr, vr = torch.where(real, kr, zero), torch.where(real, vr, zero)
    if prefix_k is None:
        return kr, vr
    idx = prefix_index[rows]
    return torch.cat([prefix_k[idx].to(dtype), kr], dim=2), torch.cat([prefix_v[idx].to(dtype), vr], dim=2)


def _visible(rows: slice, L: int, S: int, P: int, causal: bool, key_padding_mask, device) -> Optional[Tensor]:
    """Bool ``[r or 1, 1, L, P + S]`` visibility, or None when everything is visible."""
    if not causal and key_padding_mask is None:
        return None
    seq = torch.ones(1, 1, L, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        seq = (j <= i + (S - L))[None, None]
    if key_padding_mask is not None:
        seq = seq & key_padding_mask[rows][:, None, None, :]
    pre = torch.ones(seq.shape[0], 1, L, P, dtype=torch.bool, device=device)
    return torch.cat([pre, seq], dim=-1)


def _scores(qg: Tensor, kj: Tensor, scale: float, visible: Optional[Tensor], G: int, L: int) -> Tensor:
    """Masked scaled scores ``[r, Hkv, G*L, P+S]``."""
    s = torch.matmul(qg, kj.transpose(-1, -2)).mul_(scale)
    if visible is not None:
        # visible is [r|1, 1, L, C]; the G query heads of a group share it.
        s = s.view(s.shape[0], s.shape[1], G, L, -1).masked_fill_(~visible[:, :, None], float("-inf"))
        s = s.view(s.shape[0], s.shape[1], G * L, -1)
    return s


def _group_q(x: Tensor, rows: slice, Hkv: int, dtype) -> Tensor:
    """``[B, Hq, L, D]`` rows -> ``[r, Hkv, G*L, D]`` in ``dtype``."""
    xr = x[rows].to(dtype)
    r, Hq, L, D = xr.shape
    return xr.reshape(r, Hkv, (Hq // Hkv) * L, D)


def _softmax(s: Tensor, visible: Optional[Tensor], G: int, L: int) -> Tensor:
    """Row softmax of masked scores ``[r, Hkv, G*L, C]``; rows that see no column give zeros.

    Only rows with no *visible* column (from the mask, never from the score values) are
    zeroed: a NaN/inf in a visible score propagates to its row as NaN, as in the
    reference and SDPA (DESIGN §2), instead of being turned into a silent zero row.
    A direct softmax (max, exp, normalise) rounds less than ``exp(s - lse)``, whose
    relative error grows with ``|lse|``.
    """
    p = torch.softmax(s, dim=-1)
    return p if visible is None else _softmax_dead_rows_to_zero(p, visible, G, L)


def _softmax_dead_rows_to_zero(x: Tensor, visible: Tensor, G: int, L: int) -> Tensor:
    """Zero (in place) the rows of ``x [r, Hkv, G*L, C]`` that have no visible column."""
    dead = ~visible.any(dim=-1)  # [r|1, 1, L]
    if bool(dead.any()):
        r, h, _, c = x.shape
        x.view(r, h, G, L, c).masked_fill_(dead[:, :, None, :, None], 0.0)
    return x


def attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                      causal: bool, scale: float, dropout_p: float, seed: int):
    """Backend forward: ``out [B, Hq, L, D]`` (q.dtype), ``lse [B, Hq, L]`` float32."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    out = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    for lo, hi in _chunks(B, Hq * L * (P + S)):
        rows = slice(lo, hi)
        kj, vj = _joint_kv(k, v, prefix_k, prefix_v, prefix_index, rows, cdt, key_padding_mask)
        vis = _visible(rows, L, S, P, causal, key_padding_mask, q.device)
        s = _scores(_group_q(q, rows, Hkv, cdt), kj, scale, vis, G, L)
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        p = _softmax(s, vis, G, L)
        if dropout_p > 0.0:
            keep = torch.stack([_row_keep(seed, b, Hq, L, P + S, dropout_p, q.device) for b in range(lo, hi)])
            p = p.mul_(keep.view_as(p)).mul_(1.0 / (1.0 - dropout_p))
        o = torch.matmul(p, vj)
        out[rows] = o.view(hi - lo, Hq, L, D).to(q.dtype)
        lse[rows] = m.view(hi - lo, Hq, L).float()
    return out, lse


def attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *,
                       causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool = True):
    """Backend backward: dq, dk, dv and the prefix gradients reduced per task ``[T, Hkv, P, D]``."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    G = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    dq = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, S, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, S, D, dtype=v.dtype, device=v.device)
    dpk_rows = torch.empty(B, Hkv, P, D, dtype=cdt, device=q.device) if P else None
    dpv_rows = torch.empty(B, Hkv, P, D, dtype=cdt, device=q.device) if P else None
    for lo, hi in _chunks(B, Hq * L * (P + S)):
        rows = slice(lo, hi)
        r = hi - lo
        kj, vj = _joint_kv(k, v, prefix_k, prefix_v, prefix_index, rows, cdt, key_padding_mask)
        qg = _group_q(q, rows, Hkv, cdt)
        dog = _group_q(dout, rows, Hkv, cdt)
        vis = _visible(rows, L, S, P, causal, key_padding_mask, q.device)
        s = _scores(qg, kj, scale, vis, G, L)
        p = _softmax(s, vis, G, L)  # the whole row is at hand: no need to go through lse
        del s
        dp = torch.matmul(dog, vj.transpose(-1, -2))  # [r, Hkv, G*L, P+S]
        if dropout_p > 0.0:
            keep = torch.stack([_row_keep(seed, b, Hq, L, P + S, dropout_p, q.device) for b in range(lo, hi)])
            keep = keep.view_as(p).to(cdt).mul_(1.0 / (1.0 - dropout_p))
            dvj = torch.matmul((p * keep).transpose(-1, -2), dog)
            dp.mul_(keep)
            del keep
        else:
            dvj = torch.matmul(p.transpose(-1, -2), dog)
        # delta_i = sum_j P_ij dP_ij: the softmax-backward row term, taken from the
        # probabilities themselves (as autograd does) rather than rowsum(dO * O).
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta)).mul_(scale)  # reuses p's storage
        del dp
        if not math.isfinite(scale) and vis is not None:
            # 0 * nan: a row that sees nothing keeps zero gradients whatever the scale.
            ds = _softmax_dead_rows_to_zero(ds, vis, G, L)
        dq[rows] = torch.matmul(ds, kj).view(r, Hq, L, D).to(q.dtype)
        dkj = torch.matmul(ds.transpose(-1, -2), qg)  # [r, Hkv, P+S, D]
        dk[rows] = dkj[:, :, P:].to(k.dtype)
        dv[rows] = dvj[:, :, P:].to(v.dtype)
        if P:
            dpk_rows[rows] = dkj[:, :, :P]
            dpv_rows[rows] = dvj[:, :, :P]
    if not P:
        return dq, dk, dv, None, None
    return (dq, dk, dv,
            reduce_prefix_grad(dpk_rows, prefix_index, prefix_k.shape[0]).to(prefix_k.dtype),
            reduce_prefix_grad(dpv_rows, prefix_index, prefix_v.shape[0]).to(prefix_v.dtype))


def reduce_prefix_grad(per_row: Tensor, prefix_index: Tensor, T: int) -> Tensor:
    """Deterministic per-task sum: ``[B, Hkv, P, D]`` rows -> ``[T, Hkv, P, D]``.

    A fixed-order sum for a single task; a one-hot ``[T, B]`` matmul otherwise (no
    atomics, so the same bits on every run and device).
    """
    if T == 1:
        return per_row.sum(0, keepdim=True)
    onehot = torch.nn.functional.one_hot(prefix_index, T).to(per_row.dtype).t()  # [T, B]
    if per_row.shape[0] == 0:  # B = 0: nothing used any task
        return per_row.new_zeros(T, *per_row.shape[1:])
    return (onehot @ per_row.reshape(per_row.shape[0], -1)).view(T, *per_row.shape[1:])
