"""Triton prefix attention backward: row statistics + dQ kernel, dK/dV kernels, prefix-gradient reduction.

Inputs as in the forward (any strides) plus dout [B, Hq, L, D] and lse [B, Hq, L] float32 (natural log,
-inf for a row that sees nothing).  ``out`` is not read: Delta_i = sum_j P_ij dP_ij is recomputed from
the probabilities (rowsum(dO * O) from the rounded 16-bit O misses the 2x rule on peaked softmaxes).
Outputs dq, dk, dv in the layouts of q, k, v and prefix grads [T, Hkv, P, D] in those of prefix_k,
prefix_v (``ops.layout.gradient_like``).

Passes:
  16-bit, deterministic:  _attn_bwd_dq (per query tile: Delta, then dQ; 3 + 2 GEMMs) -> dK/dV kernels (4).
  16-bit, atomic:         _attn_bwd_dq as a stats pass (Delta only; 2) -> dK/dV kernels that also add dQ
                          with fp32 atomics (5 GEMMs), dQ = scale * accumulator.
  fp32:                   _attn_bwd_dq twice: statistics (recomputes each row's max and sum, see
                          _attn_bwd_dq), then dQ (2 + 2 GEMMs) -> dK/dV kernels (4); a ragged head dim
                          is zero-padded to BLOCK_D by the launcher (the ragged-D fp32 kernels spill).
dK/dV: _attn_bwd_dkdv owns one (sequence key block, b, kv head); _attn_bwd_dkdv_prefix one (row chunk,
prefix key block, kv head) and loops over the chunk's rows (rows of one task in ascending b order), the
GQA group's query heads and every query block.  Deterministic prefix grads: a task that fits in one chunk
is stored directly; a task split over several chunks gets fp32 partials summed in chunk order by
_prefix_reduce (at most ~2 * cdiv(B, R) partials, R rows per chunk chosen for ~256 programs, never one per
batch row for large B).  Atomic: fp32 atomics into [T, Hkv, P, D].

Every feature is a constexpr (causal, key padding mask, dropout, prefix present, ragged head dim) and the
query / key loops are split so fully visible blocks (all prefix blocks but the ragged tail, sequence blocks
off the causal diagonal) run with no mask arithmetic.  16-bit kernels work in the exp2 domain: scores
scaled by scale * log2(e), lse converted once per row by the stats pass (dead rows: +inf, so P = 0).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.layout import gradient_like
from .kernel_spec import KernelSpec
from .prefix_attention_fwd import (
    _TL_DTYPES,
    BLOCK_DS,
    CONFIG_OVERRIDE,
    _dropout_keep,
    _dummies,
    align_inputs,
    block_d_for,
    family,
    make_signature,
    vec_for,
)

LOG2E = 1.4426950408889634
# The Triton interpreter multiplies bf16 tiles as their raw uint16 storage (triton 3.9), so under
# TRITON_INTERPRET=1 bf16 dot operands are widened to fp32 first (exact: same products, fp32 sums).
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE (fp32 inputs) forbids tf32."""
    if _INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _sdot(a, b, IEEE: tl.constexpr):
    """Score-type product (Q K^T, dO V^T) in fp32.  fp32 kernels accumulate it in fp64 and round once:
    these values feed exp() and the dP - Delta cancellation; 16-bit kernels use the tensor-core dot."""
    if IEEE:
        r = tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        r = _dot(a, b, IEEE)
    return r


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, accumulated by the tensor-core dot itself (fp32); IEEE forbids tf32."""
    if _INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _ld(ptrs, rows_ok, d_ok, ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """[R, BLOCK_D] tile; rows_ok [R] masks rows when ROWS, d_ok [BLOCK_D] the ragged head dim unless
    EVEN_D; masked elements read as 0."""
    if ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _probs(qk, lse, rowl, qk_scale, IEEE: tl.constexpr):
    """Recomputed probabilities.  16-bit: exp2(qk * scale * log2e - lse2) (one FFMA + EX2, lse2 in log2
    units); IEEE: exp(qk * scale - m) / l with the row's own max m and sum l (lse, rowl)."""
    if IEEE:
        p = tl.exp(qk * qk_scale - lse) / rowl
    else:
        p = tl.math.exp2(qk * qk_scale - lse)
    return p


# ----------------------------------------------------------------------------- dQ / row statistics
@triton.jit
def _q_loop(dq, dsum, m_i, l_i, q, do, lse, rowl, delta, k_ptrs, v_ptrs, s_kn, s_vn, kpm_ptr, s_ms,
            lo, hi, n_valid, col_base, offs_m, offs_n, d_ok, vis_off, qk_scale,
            dropout_p, inv_keep, seed, bh,
            BLOCK_N: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, STATS: tl.constexpr):
    """Key blocks [lo, hi) of one key source for one query tile (k_ptrs, v_ptrs: [BLOCK_N, BLOCK_D] at
    source column 0).  STATS: 16-bit dsum += rowsum(P * dP); IEEE online max m_i, sum l_i and
    dsum = sum exp(S - m) dP.  Else dq += (P * (dP - delta)) @ K (unscaled).  MASKED: column j visible
    iff j < n_valid, (CAUSAL) j <= i + vis_off, (HAS_MASK) kpm[j]; invisible keys/values load as 0 and
    their P, P*dP, dS are tl.where-ed to 0, so whatever they hold contributes nothing."""
    k_ptrs += lo.to(tl.int64) * s_kn
    v_ptrs += lo.to(tl.int64) * s_vn
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            col_ok = cols < n_valid
            # K / V loads masked by the column bound only (a padding-mask-dependent load mask on the
            # operands of the fp64 score products breaks triton 3.6's MMA lowering): every product a
            # padded key or value enters (S, dP) is tl.where-ed away, and dQ += dS @ K takes a copy of
            # K with padded keys zeroed
            k = _ld(k_ptrs, col_ok, d_ok, True, EVEN_D)
            v = _ld(v_ptrs, col_ok, d_ok, True, EVEN_D)
            kv_ok = col_ok
            if HAS_MASK:
                km = tl.load(kpm_ptr + cols.to(tl.int64) * s_ms, mask=col_ok, other=0)
                kv_ok = col_ok & (km != 0)
            vis = kv_ok[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + vis_off)
        else:
            k = _ld(k_ptrs, offs_n, d_ok, False, EVEN_D)
            v = _ld(v_ptrs, offs_n, d_ok, False, EVEN_D)
        qk = _sdot(q, tl.trans(k), IEEE)
        dp = _sdot(do, tl.trans(v), IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (col_base + cols)[None, :], dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        if STATS and IEEE:
            s = qk * qk_scale
            if MASKED:
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            pdp = p * dp
            if MASKED:
                pdp = tl.where(vis, pdp, 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            dsum = dsum * alpha + tl.sum(pdp, 1)
            m_i = m_new
        else:
            p = _probs(qk, lse[:, None], rowl[:, None], qk_scale, IEEE)
            if MASKED:
                p = tl.where(vis, p, 0.0)
            if STATS:
                pdp = p * dp
                if MASKED:
                    pdp = tl.where(vis, pdp, 0.0)
                dsum += tl.sum(pdp, 1)
            else:
                ds = p * (dp - delta[:, None])
                kd = k
                if MASKED:
                    ds = tl.where(vis, ds, 0.0)
                    if HAS_MASK:
                        kd = tl.where(kv_ok[:, None], k, 0.0)  # 0 * NaN: a padded key adds nothing
                dq = _mma(ds.to(k.dtype), kd, dq, IEEE)
        k_ptrs += BLOCK_N * s_kn
        v_ptrs += BLOCK_N * s_vn
    return dq, dsum, m_i, l_i


@triton.jit
def _q_pass(dq, dsum, m_i, l_i, q, do, lse, rowl, delta, pk_ptrs, pv_ptrs, k_ptrs, v_ptrs, kpm_ptr,
            s_pkn, s_pvn, s_kn, s_vn, s_ms, P, S, m0, L, offs_m, offs_n, d_ok, qk_scale,
            dropout_p, inv_keep, seed, bh,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, HAS_PREFIX: tl.constexpr, EVEN_D: tl.constexpr,
            STATS: tl.constexpr):
    """Every key block a query tile [m0, m0 + BLOCK_M) sees: prefix full blocks (unmasked), prefix tail,
    sequence blocks visible to the whole tile (unmasked), then the diagonal / ragged / padded ones."""
    if HAS_PREFIX:
        p_full = P // BLOCK_N * BLOCK_N
        dq, dsum, m_i, l_i = _q_loop(
            dq, dsum, m_i, l_i, q, do, lse, rowl, delta, pk_ptrs, pv_ptrs, s_pkn, s_pvn, kpm_ptr, 0,
            P * 0, p_full, P, 0, offs_m, offs_n, d_ok, 0, qk_scale, dropout_p, inv_keep, seed, bh,
            BLOCK_N, IEEE, False, False, False, DROPOUT, EVEN_D, STATS)
        dq, dsum, m_i, l_i = _q_loop(
            dq, dsum, m_i, l_i, q, do, lse, rowl, delta, pk_ptrs, pv_ptrs, s_pkn, s_pvn, kpm_ptr, 0,
            p_full, P, P, 0, offs_m, offs_n, d_ok, 0, qk_scale, dropout_p, inv_keep, seed, bh,
            BLOCK_N, IEEE, True, False, False, DROPOUT, EVEN_D, STATS)
    vis_off = S - L
    s_full = S // BLOCK_N * BLOCK_N
    n_hi = S
    if CAUSAL:
        # columns <= m0 + vis_off are visible to every row of the tile; none beyond the last row's bound
        s_full = tl.minimum(s_full, tl.maximum(m0 + vis_off + 1, 0) // BLOCK_N * BLOCK_N)
        n_hi = tl.minimum(S, tl.maximum(tl.minimum(m0 + BLOCK_M, L) + vis_off, 0))
    if HAS_MASK:
        s_full = 0
    dq, dsum, m_i, l_i = _q_loop(
        dq, dsum, m_i, l_i, q, do, lse, rowl, delta, k_ptrs, v_ptrs, s_kn, s_vn, kpm_ptr, s_ms,
        S * 0, s_full, S, P, offs_m, offs_n, d_ok, vis_off, qk_scale, dropout_p, inv_keep, seed, bh,
        BLOCK_N, IEEE, False, False, False, DROPOUT, EVEN_D, STATS)
    dq, dsum, m_i, l_i = _q_loop(
        dq, dsum, m_i, l_i, q, do, lse, rowl, delta, k_ptrs, v_ptrs, s_kn, s_vn, kpm_ptr, s_ms,
        s_full, n_hi, S, P, offs_m, offs_n, d_ok, vis_off, qk_scale, dropout_p, inv_keep, seed, bh,
        BLOCK_N, IEEE, True, CAUSAL, HAS_MASK, DROPOUT, EVEN_D, STATS)
    return dq, dsum, m_i, l_i


@triton.jit
def _attn_bwd_dq(Q, K, V, PK, PV, PIDX, KPM, DO, Lse, LseS, RowL, Delta, DQ,
                 s_qb, s_qh, s_qm, s_qd,
                 s_kb, s_kh, s_kn, s_kd,
                 s_vb, s_vh, s_vn, s_vd,
                 s_pkt, s_pkh, s_pkn, s_pkd,
                 s_pvt, s_pvh, s_pvn, s_pvd,
                 s_mb, s_ms,
                 s_dob, s_doh, s_dom, s_dod,
                 s_dqb, s_dqh, s_dqm, s_dqd,
                 Hq, L, Lp, S, P, T, D, GROUP,
                 scale, dropout_p, seed,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 HAS_PREFIX: tl.constexpr, EVEN_D: tl.constexpr, STATS: tl.constexpr,
                 COMPUTE_DQ: tl.constexpr):
    """Grid (cdiv(Lp, BLOCK_M), B * Hq).  (STATS) Writes the row statistics LseS, Delta (and RowL for
    IEEE), [B * Hq, Lp] fp32, for every row < Lp (rows >= L: LseS = +inf, Delta = 0, so the dK/dV
    kernels read them unmasked), else reads them (a second launch with the tile's rows); then
    (COMPUTE_DQ) DQ [B, Hq, L, D] through its strides.  fp32 runs two launches (STATS, then COMPUTE_DQ):
    one pass per launch keeps the fp64 score products' registers of the other pass out (D = 256 spilled).

    Delta = sum_j P_ij dP_ij (dropout-scaled dP).  16-bit: P = exp2(S * scale * log2e - lse2) with the
    forward's lse (LseS <- lse2 = lse * log2e, +inf for a row that sees nothing).  IEEE: a first loop
    recomputes each row's max m and sum l (LseS <- m, RowL <- l); P = exp(S * scale - m) / l then has
    the rounding of a plain softmax (exp(S * scale - lse) would carry |lse| ulps of fp32 rounding)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    bh64 = bh.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < L
    d_ok = offs_d < D
    q = _ld(Q + b64 * s_qb + h64 * s_qh + rows64[:, None] * s_qm + offs_d[None, :] * s_qd, row_ok, d_ok,
            True, EVEN_D)
    do = _ld(DO + b64 * s_dob + h64 * s_doh + rows64[:, None] * s_dom + offs_d[None, :] * s_dod, row_ok, d_ok,
             True, EVEN_D)
    if IEEE:
        qk_scale = scale
    else:
        qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
    else:
        inv_keep = 1.0
    pk_ptrs = PK
    pv_ptrs = PV
    if HAS_PREFIX:
        t = tl.minimum(tl.maximum(tl.load(PIDX + b), 0), T - 1).to(tl.int64)  # in bounds whatever it holds
        pk_ptrs = PK + t * s_pkt + hk64 * s_pkh + (offs_n[:, None] * s_pkn + offs_d[None, :] * s_pkd)
        pv_ptrs = PV + t * s_pvt + hk64 * s_pvh + (offs_n[:, None] * s_pvn + offs_d[None, :] * s_pvd)
    k_ptrs = K + b64 * s_kb + hk64 * s_kh + (offs_n[:, None] * s_kn + offs_d[None, :] * s_kd)
    v_ptrs = V + b64 * s_vb + hk64 * s_vh + (offs_n[:, None] * s_vn + offs_d[None, :] * s_vd)
    kpm_ptr = KPM + b64 * s_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dsum = tl.zeros([BLOCK_M], tl.float32)
    if STATS:
        if IEEE:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            dq, dsum, m_i, l_i = _q_pass(
                dq, dsum, m_i, l_i, q, do, m_i, l_i, dsum, pk_ptrs, pv_ptrs, k_ptrs, v_ptrs, kpm_ptr,
                s_pkn, s_pvn, s_kn, s_vn, s_ms, P, S, m0, L, offs_m, offs_n, d_ok, qk_scale,
                dropout_p, inv_keep, seed, bh, BLOCK_M, BLOCK_N, IEEE, CAUSAL, HAS_MASK, DROPOUT, HAS_PREFIX,
                EVEN_D, True)
            seen = (l_i > 0.0) & row_ok
            rowl = tl.where(seen, l_i, 1.0)
            lse = tl.where(seen, m_i, float("inf"))
            delta = tl.where(row_ok, dsum / rowl, 0.0)
            tl.store(RowL + bh64 * Lp + offs_m, rowl)
        else:
            lse = tl.load(Lse + bh64 * L + offs_m, mask=row_ok, other=float("-inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            rowl = lse
            dq, dsum, _m, _l = _q_pass(
                dq, dsum, dsum, dsum, q, do, lse, rowl, dsum, pk_ptrs, pv_ptrs, k_ptrs, v_ptrs, kpm_ptr,
                s_pkn, s_pvn, s_kn, s_vn, s_ms, P, S, m0, L, offs_m, offs_n, d_ok, qk_scale,
                dropout_p, inv_keep, seed, bh, BLOCK_M, BLOCK_N, IEEE, CAUSAL, HAS_MASK, DROPOUT, HAS_PREFIX,
                EVEN_D, True)
            delta = tl.where(row_ok, dsum, 0.0)
        tl.store(LseS + bh64 * Lp + offs_m, lse)
        tl.store(Delta + bh64 * Lp + offs_m, delta)
    else:
        lse = tl.load(LseS + bh64 * Lp + offs_m)
        delta = tl.load(Delta + bh64 * Lp + offs_m)
        if IEEE:
            rowl = tl.load(RowL + bh64 * Lp + offs_m)
        else:
            rowl = lse
    if COMPUTE_DQ:
        dq, dsum, _m, _l = _q_pass(
            dq, dsum, dsum, dsum, q, do, lse, rowl, delta, pk_ptrs, pv_ptrs, k_ptrs, v_ptrs, kpm_ptr,
            s_pkn, s_pvn, s_kn, s_vn, s_ms, P, S, m0, L, offs_m, offs_n, d_ok, qk_scale,
            dropout_p, inv_keep, seed, bh, BLOCK_M, BLOCK_N, IEEE, CAUSAL, HAS_MASK, DROPOUT, HAS_PREFIX,
            EVEN_D, False)
        dq = dq * scale
        dq_ptrs = DQ + b64 * s_dqb + h64 * s_dqh + rows64[:, None] * s_dqm + offs_d[None, :] * s_dqd
        if EVEN_D:
            tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
        else:
            tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- dK / dV
@triton.jit
def _kv_loop(dk, dv, k, v, kq, q_ptrs, do_ptrs, dqa_ptrs, s_qm, s_dom, s_dqam, lse_ptr, rowl_ptr, delta_ptr,
             lo, split, hi, L, cols, kv_ok, offs_m, d_ok, vis_off, col_base, qk_scale,
             dropout_p, inv_keep, seed, bh,
             BLOCK_M: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr,
             DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV (unscaled dK) of one key block (k, v: [BLOCK_N, BLOCK_D], columns cols; kq: k with the
    padded keys zeroed, the operand of the atomic dQ) over the query blocks
    [lo, hi) of one (b, query head); q_ptrs, do_ptrs, dqa_ptrs: [BLOCK_M, BLOCK_D] at query row 0;
    lse_ptr, rowl_ptr, delta_ptr: that row's [Lp] statistics (padded, read unmasked).  Blocks below
    ``split`` are masked: column j visible to row i iff kv_ok[j] and (CAUSAL) j <= i + vis_off; the
    others run no mask arithmetic (one uniform branch).  ATOMIC_DQ: also adds dS @ K (unscaled) to the
    fp32 accumulator with atomics."""
    q_ptrs += lo.to(tl.int64) * s_qm
    do_ptrs += lo.to(tl.int64) * s_dom
    if ATOMIC_DQ:
        dqa_ptrs += lo.to(tl.int64) * s_dqam
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < L
        q = _ld(q_ptrs, row_ok, d_ok, True, EVEN_D)
        do = _ld(do_ptrs, row_ok, d_ok, True, EVEN_D)
        lse = tl.load(lse_ptr + rows)
        delta = tl.load(delta_ptr + rows)
        if IEEE:
            rowl = tl.load(rowl_ptr + rows)
        else:
            rowl = lse
        qkT = _sdot(k, tl.trans(q), IEEE)
        pT = _probs(qkT, lse[None, :], rowl[None, :], qk_scale, IEEE)
        masked = start < split
        if masked:
            vis = kv_ok[:, None]
            if CAUSAL:
                vis = vis & (cols[:, None] <= rows[None, :] + vis_off)
            pT = tl.where(vis, pT, 0.0)
        dpT = _sdot(v, tl.trans(do), IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[None, :], (col_base + cols)[:, None], dropout_p)
            pdT = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        dv = _mma(pdT.to(do.dtype), do, dv, IEEE)
        dsT = pT * (dpT - delta[None, :])
        if masked:
            vis = kv_ok[:, None]
            if CAUSAL:
                vis = vis & (cols[:, None] <= rows[None, :] + vis_off)
            dsT = tl.where(vis, dsT, 0.0)
        dsT = dsT.to(q.dtype)
        dk = _mma(dsT, q, dk, IEEE)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dsT), kq, IEEE)
            if EVEN_D:
                tl.atomic_add(dqa_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dqa_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
            dqa_ptrs += BLOCK_M * s_dqam
        q_ptrs += BLOCK_M * s_qm
        do_ptrs += BLOCK_M * s_dom
    return dk, dv


@triton.jit
def _kv_head(dk, dv, k, v, kq, Q, DO, DQA, LseS, RowL, Delta, b64, h, Hq,
             s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_dqab, s_dqah, s_dqam,
             lo, split, L, Lp, cols, kv_ok, offs_m, offs_d, d_ok, vis_off, col_base, qk_scale,
             dropout_p, inv_keep, seed,
             BLOCK_M: tl.constexpr, IEEE: tl.constexpr, CAUSAL: tl.constexpr,
             DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """One (b, query head h): the query blocks [lo, L), masked below ``split`` (see _kv_loop)."""
    h64 = h.to(tl.int64)
    bh = b64.to(tl.int32) * Hq + h
    q_ptrs = Q + b64 * s_qb + h64 * s_qh + (offs_m[:, None] * s_qm + offs_d[None, :] * s_qd)
    do_ptrs = DO + b64 * s_dob + h64 * s_doh + (offs_m[:, None] * s_dom + offs_d[None, :] * s_dod)
    dqa_ptrs = DQA
    if ATOMIC_DQ:
        dqa_ptrs = DQA + b64 * s_dqab + h64 * s_dqah + (offs_m[:, None] * s_dqam + offs_d[None, :])
    row = bh.to(tl.int64) * Lp
    dk, dv = _kv_loop(dk, dv, k, v, kq, q_ptrs, do_ptrs, dqa_ptrs, s_qm, s_dom, s_dqam,
                      LseS + row, RowL + row, Delta + row, lo, split, L, L, cols, kv_ok, offs_m, d_ok,
                      vis_off, col_base, qk_scale, dropout_p, inv_keep, seed, bh,
                      BLOCK_M, IEEE, CAUSAL, DROPOUT, EVEN_D, ATOMIC_DQ)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, KPM, DO, LseS, RowL, Delta, DK, DV, DQA,
                   s_qb, s_qh, s_qm, s_qd,
                   s_kb, s_kh, s_kn, s_kd,
                   s_vb, s_vh, s_vn, s_vd,
                   s_mb, s_ms,
                   s_dob, s_doh, s_dom, s_dod,
                   s_dkb, s_dkh, s_dkn, s_dkd,
                   s_dvb, s_dvh, s_dvn, s_dvd,
                   s_dqab, s_dqah, s_dqam,
                   Hq, Hkv, L, Lp, S, P, D, GROUP,
                   scale, dropout_p, seed,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                   EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Sequence keys.  Grid (cdiv(S, BLOCK_N), B * Hkv).  DK, DV [B, Hkv, S, D] through their strides;
    DQA fp32 [B, Hq, L, D] (unit d-stride) dQ / scale accumulator when ATOMIC_DQ.

    Query blocks of the causal diagonal (and every block when the key block has a padded or ragged
    column) take the masked loop; the rest have no mask arithmetic.  Padded keys/values load as 0."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    kv_ok = cols < S
    # loads masked by the column bound only (see _q_loop); padded keys / values enter only products
    # that are tl.where-ed away, and the atomic dQ takes K with them zeroed
    k = _ld(K + b64 * s_kb + hk64 * s_kh + (cols64[:, None] * s_kn + offs_d[None, :] * s_kd), kv_ok, d_ok,
            True, EVEN_D)
    v = _ld(V + b64 * s_vb + hk64 * s_vh + (cols64[:, None] * s_vn + offs_d[None, :] * s_vd), kv_ok, d_ok,
            True, EVEN_D)
    kq = k
    if HAS_MASK:
        km = tl.load(KPM + b64 * s_mb + cols64 * s_ms, mask=kv_ok, other=0)
        kv_ok = kv_ok & (km != 0)
        if ATOMIC_DQ:
            kq = tl.where(kv_ok[:, None], k, 0.0)
    vis_off = S - L
    l_ceil = (L + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_lo = L * 0
    m_split = L * 0
    if CAUSAL:
        # row i sees column j iff j <= i + vis_off: rows < n0 - vis_off see nothing of this block,
        # rows >= n0 + BLOCK_N - 1 - vis_off all of it
        m_lo = tl.minimum(tl.maximum(n0 - vis_off, 0) // BLOCK_M * BLOCK_M, l_ceil)
        m_split = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - vis_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M,
                             l_ceil)
    full = tl.sum(kv_ok.to(tl.int32), 0) == BLOCK_N
    m_split = tl.where(full, m_split, l_ceil)
    qk_scale = scale
    if not IEEE:
        qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
    else:
        inv_keep = 1.0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        dk, dv = _kv_head(dk, dv, k, v, kq, Q, DO, DQA, LseS, RowL, Delta, b64, hk * GROUP + g, Hq,
                          s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_dqab, s_dqah, s_dqam,
                          m_lo, m_split, L, Lp, cols, kv_ok, offs_m, offs_d, d_ok, vis_off, P, qk_scale,
                          dropout_p, inv_keep, seed, BLOCK_M, IEEE, CAUSAL, DROPOUT, EVEN_D, ATOMIC_DQ)
    dk = dk * scale
    st_ok = (cols < S)[:, None]
    if not EVEN_D:
        st_ok = st_ok & d_ok[None, :]
    tl.store(DK + b64 * s_dkb + hk64 * s_dkh + (cols64[:, None] * s_dkn + offs_d[None, :] * s_dkd),
             dk.to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + b64 * s_dvb + hk64 * s_dvh + (cols64[:, None] * s_dvn + offs_d[None, :] * s_dvd),
             dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _attn_bwd_dkdv_prefix(Q, PK, PV, DO, LseS, RowL, Delta, Order, ChunkTask, ChunkLo, ChunkHi, FirstChunk,
                          PartFirst, DPK, DPV, DQA,
                          s_qb, s_qh, s_qm, s_qd,
                          s_pkt, s_pkh, s_pkn, s_pkd,
                          s_pvt, s_pvh, s_pvn, s_pvd,
                          s_dob, s_doh, s_dom, s_dod,
                          s_dqab, s_dqah, s_dqam,
                          Hq, Hkv, L, Lp, P, T, D, GROUP,
                          scale, dropout_p, seed,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          IEEE: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, ATOMIC: tl.constexpr):
    """Prefix keys.  Grid (n_chunks, cdiv(P, BLOCK_N), Hkv).  Chunk c holds the batch rows
    Order[ChunkLo[c]:ChunkHi[c]], all of task ChunkTask[c] (an empty chunk writes nothing).

    DPK, DPV fp32 [T + slots, Hkv, P, D]: rows [0, T) the per-task gradients, rows T + slot partials.
    ATOMIC: fp32 atomics into row t.  Else a task whose rows form one chunk (FirstChunk[t + 1] -
    FirstChunk[t] == 1) is stored into row t, a task over several chunks into row T + PartFirst[t] +
    c - FirstChunk[t] (summed in slot order by _prefix_reduce).  Only the ragged last
    key block has a mask."""
    c = tl.program_id(0)
    pid_n = tl.program_id(1)
    hk = tl.program_id(2)
    hk64 = hk.to(tl.int64)
    t = tl.load(ChunkTask + c)
    r_lo = tl.load(ChunkLo + c).to(tl.int32)
    r_hi = tl.load(ChunkHi + c).to(tl.int32)
    n0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    kv_ok = cols < P
    k = _ld(PK + t * s_pkt + hk64 * s_pkh + (cols64[:, None] * s_pkn + offs_d[None, :] * s_pkd), kv_ok, d_ok,
            True, EVEN_D)
    v = _ld(PV + t * s_pvt + hk64 * s_pvh + (cols64[:, None] * s_pvn + offs_d[None, :] * s_pvd), kv_ok, d_ok,
            True, EVEN_D)
    qk_scale = scale
    if not IEEE:
        qk_scale = scale * 1.4426950408889634
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
    else:
        inv_keep = 1.0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_split = tl.where(n0 + BLOCK_N <= P, 0, L)  # only the ragged last block is masked
    for r in range(r_lo, r_hi):
        b64 = tl.load(Order + r)
        for g in range(GROUP):
            dk, dv = _kv_head(dk, dv, k, v, k, Q, DO, DQA, LseS, RowL, Delta, b64, hk * GROUP + g, Hq,
                              s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_dqab, s_dqah, s_dqam,
                              L * 0, m_split, L, Lp, cols, kv_ok, offs_m, offs_d, d_ok, 0, 0, qk_scale,
                              dropout_p, inv_keep, seed, BLOCK_M, IEEE, False, DROPOUT, EVEN_D, ATOMIC_DQ)
    dk = dk * scale
    d_st = offs_d < BLOCK_D
    if not EVEN_D:
        d_st = d_ok
    zero_n = offs_n * 0
    st_ok = kv_ok & ((zero_n + r_hi) > r_lo)  # (scalar conditions as [BLOCK_N] vectors: masks must be tensors)
    off = cols64[:, None] * D + offs_d[None, :]
    mask = st_ok[:, None] & d_st[None, :]
    if ATOMIC:
        o = (t * Hkv + hk64) * P * D + off
        tl.atomic_add(DPK + o, dk, mask=mask, sem="relaxed")
        tl.atomic_add(DPV + o, dv, mask=mask, sem="relaxed")
    else:
        f0 = tl.load(FirstChunk + t)
        n_t = tl.load(FirstChunk + t + 1) - f0
        slot = tl.where(n_t == 1, t, T + tl.load(PartFirst + t) + (c - f0))
        o = (slot * Hkv + hk64) * P * D + off
        tl.store(DPK + o, dk, mask=mask)
        tl.store(DPV + o, dv, mask=mask)


@triton.jit
def _prefix_reduce(DPK, DPV, FirstChunk, PartFirst, T, Hkv, PD, BLOCK: tl.constexpr):
    """Row t of DPK/DPV (fp32 [T + slots, Hkv, P*D]) = sum of the task's partial rows T + PartFirst[t] +
    [0, n) in order, n its chunk count; 0 for a task no row uses; a one-chunk task (stored by the dK/dV
    kernel) is left alone.  Grid (T * Hkv, cdiv(P*D, BLOCK))."""
    pid = tl.program_id(0)
    t = pid // Hkv
    h = (pid % Hkv).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PD
    n = tl.load(FirstChunk + t + 1) - tl.load(FirstChunk + t)
    s0 = T + tl.load(PartFirst + t)
    acc_k = tl.zeros([BLOCK], tl.float32)
    acc_v = tl.zeros([BLOCK], tl.float32)
    if n > 1:
        for i in range(0, n):
            base = ((s0 + i) * Hkv + h) * PD
            acc_k += tl.load(DPK + base + offs, mask=ok, other=0.0)
            acc_v += tl.load(DPV + base + offs, mask=ok, other=0.0)
    w = ok & ((offs * 0 + n) != 1)
    tl.store(DPK + pid.to(tl.int64) * PD + offs, acc_k, mask=w)
    tl.store(DPV + pid.to(tl.int64) * PD + offs, acc_v, mask=w)


# ----------------------------------------------------------------------------- configs
# Tiles per (arch, dtype family, BLOCK_D) and kernel: "dq" (BLOCK_M queries, BLOCK_N keys, warps, stages) for
# the dQ / statistics kernel; "dkdv" for the sequence dK/dV kernel (BLOCK_M queries, BLOCK_N keys: BLOCK_N
# is the M dimension of every dK/dV GEMM, >= 64 per warpgroup for wgmma), "dkdv_atomic" for it with the
# atomic dQ, "prefix" / "prefix_atomic" for the prefix dK/dV kernel (its row-chunk loop nest costs
# registers: at D = 128 it takes 64 keys over 8 warps).  A missing kind falls back to "dkdv".  A masked
# launch (key padding mask, dropout or a ragged head dim: the inlined Philox and the masks cost
# registers) takes "<kind>_masked", else (dK/dV kinds) "dkdv_masked", where the table has one (see
# pick_tile).  Every entry is AOT-compiled (bwd_specs: "plain" / "causal" on the unmasked tiles, "full"
# on the masked ones); chosen for zero spills on sm_80 / sm_90 under triton 3.9 and 3.6.
_T16_128 = {"dq": (128, 32, 8, 2), "dkdv": (32, 128, 8, 2), "dkdv_atomic": (32, 128, 8, 1),
            "prefix": (32, 64, 8, 2), "prefix_atomic": (32, 64, 8, 2), "dkdv_masked": (32, 64, 8, 2),
            "dkdv_atomic_masked": (32, 64, 8, 1), "prefix_atomic_masked": (32, 64, 8, 1)}
BWD_TILES = {
    90: {
        ("16", 32): {"dq": (64, 64, 4, 2), "dkdv": (64, 128, 8, 2), "dkdv_masked": (32, 64, 8, 2)},
        ("16", 64): {"dq": (64, 64, 4, 2), "dq_masked": (64, 32, 4, 2), "dkdv": (64, 128, 8, 2),
                     "dkdv_atomic": (64, 128, 8, 1), "dkdv_masked": (32, 64, 8, 2)},
        ("16", 128): _T16_128,
        ("16", 256): {"dq": (16, 32, 4, 1), "dq_masked": (16, 32, 8, 1), "dkdv": (32, 64, 8, 1),
                      "dkdv_atomic": (32, 32, 8, 1), "prefix": (32, 32, 8, 1), "prefix_atomic": (32, 32, 8, 1),
                      "dkdv_masked": (16, 16, 8, 1), "prefix_masked": (16, 32, 8, 1)},
        ("32", 32): {"dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dkdv_masked": (32, 32, 4, 1)},
        ("32", 64): {"dq": (16, 32, 4, 1), "dkdv": (32, 32, 4, 1)},
        ("32", 128): {"dq": (32, 16, 8, 1), "dq_masked": (16, 32, 4, 1), "dkdv": (16, 16, 8, 1)},
        ("32", 256): {"dq": (16, 32, 8, 1), "dkdv": (32, 16, 8, 1)},
    },
}
KINDS = ("dq", "dkdv", "dkdv_atomic", "prefix", "prefix_atomic")
# sm_80: no wgmma, mma.sync accumulators live in registers: narrower tiles (zero spills under 3.9 / 3.6).
BWD_TILES[80] = {
    ("16", 32): {"dq": (32, 32, 4, 2), "dq_masked": (64, 32, 4, 2), "dkdv": (32, 64, 4, 1),
                 "dkdv_atomic": (32, 64, 4, 2), "prefix": (32, 64, 4, 2), "prefix_atomic": (32, 64, 4, 2),
                 "dkdv_masked": (32, 32, 4, 2)},
    ("16", 64): {"dq": (64, 32, 4, 1), "dq_masked": (64, 32, 4, 2), "dkdv": (64, 32, 4, 2),
                 "prefix": (32, 32, 4, 2), "dkdv_masked": (64, 32, 8, 2)},
    ("16", 128): {"dq": (32, 64, 8, 1), "dkdv": (64, 32, 8, 2), "dkdv_atomic_masked": (32, 32, 8, 2),
                  "prefix_atomic_masked": (32, 32, 8, 2)},
    ("16", 256): {"dq": (32, 16, 8, 1), "dq_masked": (16, 32, 8, 1), "dkdv": (32, 32, 8, 1),
                  "dkdv_masked": (16, 32, 8, 1), "prefix_atomic_masked": (16, 16, 8, 2)},
    # fp32 (fp64 score products; statistics and dQ in separate launches): own sm_80 entries
    ("32", 32): {"dq": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1)},
    ("32", 64): {"dq": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dkdv_masked": (16, 16, 8, 2)},
    ("32", 128): {"dq": (16, 32, 8, 1), "dkdv": (16, 16, 8, 1)},
    ("32", 256): {"dq": (16, 32, 8, 1), "dkdv": (32, 16, 8, 1)},
}
ARCHS = tuple(sorted(BWD_TILES))
REDUCE_CONFIG = (1024, 4, 1)       # BLOCK, warps, stages
PREFIX_PROGRAMS = 256              # target prefix dK/dV programs (sets the rows per chunk)
# Feature constexprs of the shipped AOT variants: "plain" (prefix, nothing else: the unmasked hot loops
# the static targets are about) and "causal" (+ causal) on the unmasked tiles, "full" (every optional
# feature on, ragged head dim: most registers) on the masked tiles.  The prefix dK/dV kernel has no causal
# or padding-mask constexpr: "causal" would compile its "plain" again, so it ships "plain" and "full".
BWD_VARIANTS = {
    "plain": dict(CAUSAL=False, HAS_MASK=False, DROPOUT=False, HAS_PREFIX=True, EVEN_D=True),
    "causal": dict(CAUSAL=True, HAS_MASK=False, DROPOUT=False, HAS_PREFIX=True, EVEN_D=True),
    "full": dict(CAUSAL=True, HAS_MASK=True, DROPOUT=True, HAS_PREFIX=True, EVEN_D=False),
}


def dq_launches(ieee: bool, atomic_dq: bool) -> tuple:
    """(STATS, COMPUTE_DQ) of each _attn_bwd_dq launch, in order: 16-bit one launch (statistics, then
    dQ unless it is added atomically by the dK/dV kernels); fp32 statistics, then a dQ launch."""
    return ((True, False), (False, True)) if ieee else ((True, not atomic_dq),)


def masked_launch(flags: dict) -> bool:
    """A launch (feature constexprs) that takes the masked tiles: padding mask, dropout or ragged head dim."""
    return bool(flags["HAS_MASK"] or flags["DROPOUT"] or not flags["EVEN_D"])


def device_arch(device) -> Optional[int]:
    """Key of BWD_TILES for a CUDA device (90 for sm_90 / sm_100, else 80); None on CPU (interpreter)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(dev)
    return 90 if major in (9, 10) else 80


def pick_tile(tiles: dict, kind: str, masked: bool):
    """The entry of one BWD_TILES table for ``kind``: masked launches try "<kind>_masked" (then
    "dkdv_masked" for a dK/dV kind) first; a dK/dV kind without an entry of its own takes "dkdv"."""
    chain = [kind] if kind == "dq" else [kind, "dkdv"]
    if masked:
        chain = [c + "_masked" for c in chain] + chain
    for c in chain:
        if c in tiles:
            return tiles[c]
    raise KeyError(kind)


def bwd_config(kind: str, dtype: torch.dtype, block_d: int, arch: Optional[int] = 90, masked: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kind`` (see KINDS) on ``arch`` (None: the
    interpreter, which runs the sm_90 tiles) for a masked (see masked_launch) or unmasked launch.
    CONFIG_OVERRIDE[kind], or CONFIG_OVERRIDE["dkdv"] for every dK/dV kind, replaces it (tests)."""
    if kind in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kind]
    if kind != "dq" and "dkdv" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["dkdv"]
    return pick_tile(BWD_TILES[arch or 90][(family(dtype), block_d)], kind, masked)


# Head-dim strides are 1 at every launch (align_inputs for the inputs; the outputs the launcher
# allocates): Triton turns an integer argument equal to 1 into a constexpr, so the specs have them as 1.
BWD_UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_dod", "s_dqd", "s_dkd", "s_dvd", "s_ms")


def _units(fn) -> dict:
    return {n: 1 for n in BWD_UNIT_STRIDES if n in fn.arg_names}


def bwd_specs() -> list[KernelSpec]:
    """Every (arch, kernel, dtype, BLOCK_D, variant) the launcher can pick, as AOT compile units."""
    specs = []
    for archs, table in _spec_tables():
        arch, atag = archs[0], spec_tag(archs[0])
        for dtype, tname in _TL_DTYPES.items():
            p = "*" + tname
            ieee = dtype == torch.float32
            f32 = "*fp32"
            sig_q = make_signature(_attn_bwd_dq, {
                "Q": p, "K": p, "V": p, "PK": p, "PV": p, "PIDX": "*i64", "KPM": "*u8", "DO": p, "Lse": f32,
                "LseS": f32, "RowL": f32, "Delta": f32, "DQ": p, "scale": "fp32", "dropout_p": "fp32",
                "seed": "i64"}, skip=BWD_UNIT_STRIDES)
            sig_kv = make_signature(_attn_bwd_dkdv, {
                "Q": p, "K": p, "V": p, "KPM": "*u8", "DO": p, "LseS": f32, "RowL": f32, "Delta": f32,
                "DK": p, "DV": p, "DQA": f32, "scale": "fp32", "dropout_p": "fp32", "seed": "i64"},
                skip=BWD_UNIT_STRIDES)
            sig_pf = make_signature(_attn_bwd_dkdv_prefix, {
                "Q": p, "PK": p, "PV": p, "DO": p, "LseS": f32, "RowL": f32, "Delta": f32, "Order": "*i64",
                "ChunkTask": "*i64", "ChunkLo": "*i64", "ChunkHi": "*i64", "FirstChunk": "*i64",
                "PartFirst": "*i64", "DPK": f32, "DPV": f32, "DQA": f32,
                "scale": "fp32", "dropout_p": "fp32", "seed": "i64"}, skip=BWD_UNIT_STRIDES)
            for bd in BLOCK_DS:
                tiles = table[(family(dtype), bd)]
                for vname, var in BWD_VARIANTS.items():
                    feats = dict(IEEE=ieee, EVEN_D=var["EVEN_D"] or ieee, DROPOUT=var["DROPOUT"])
                    masked = masked_launch(var)
                    bm, bn, w, st = pick_tile(tiles, "dq", masked)
                    launches = sorted(set(dq_launches(ieee, False) + dq_launches(ieee, True)))
                    for stats, dq_on in launches:
                        kname = "dq" if dq_on else "stats"
                        specs.append(KernelSpec(
                            name=f"prefix_attn_bwd_{kname}[{atag},d={bd},{tname},{vname}]", fn=_attn_bwd_dq,
                            signature=sig_q, constexprs={
                                "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, **feats, "CAUSAL": var["CAUSAL"],
                                "HAS_MASK": var["HAS_MASK"], "HAS_PREFIX": var["HAS_PREFIX"],
                                "STATS": stats, "COMPUTE_DQ": dq_on, **_units(_attn_bwd_dq)},
                            num_warps=w, num_stages=st, expect_wgmma=not ieee and bm >= 64 and bn >= 16,
                            **_arch_kw(archs, _attn_bwd_dq)))
                    for atomic in (False, True):  # deterministic / atomic launches
                        sfx = ",atomic" if atomic else ""
                        if not (ieee and atomic):  # fp32 computes dQ in the dQ pass: no atomic dK/dV kernel
                            bm, bn, w, st = pick_tile(tiles, "dkdv_atomic" if atomic else "dkdv", masked)
                            specs.append(KernelSpec(
                                name=f"prefix_attn_bwd_dkdv[{atag},d={bd},{tname},{vname}{sfx}]",
                                fn=_attn_bwd_dkdv, signature=sig_kv, constexprs={
                                    "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, **feats, "CAUSAL": var["CAUSAL"],
                                    "HAS_MASK": var["HAS_MASK"], "ATOMIC_DQ": atomic, **_units(_attn_bwd_dkdv)},
                                num_warps=w, num_stages=st, expect_wgmma=not ieee and bn >= 64,
                                **_arch_kw(archs, _attn_bwd_dkdv)))
                        if vname == "causal":
                            continue  # no causal constexpr in the prefix kernel: same as "plain"
                        bm, bn, w, st = pick_tile(tiles, "prefix_atomic" if atomic else "prefix", masked)
                        specs.append(KernelSpec(
                            name=f"prefix_attn_bwd_dkdv_prefix[{atag},d={bd},{tname},{vname}{sfx}]",
                            fn=_attn_bwd_dkdv_prefix, signature=sig_pf,
                            constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, **feats,
                                        "ATOMIC_DQ": atomic and not ieee, "ATOMIC": atomic,
                                        **_units(_attn_bwd_dkdv_prefix)},
                            num_warps=w, num_stages=st, expect_wgmma=not ieee and bn >= 64,
                            **_arch_kw(archs, _attn_bwd_dkdv_prefix)))
            blk, w, st = REDUCE_CONFIG
            specs.append(KernelSpec(
                name=f"prefix_attn_bwd_reduce[{atag},{tname}]", fn=_prefix_reduce,
                signature=make_signature(_prefix_reduce, {"DPK": f32, "DPV": f32, "FirstChunk": "*i64",
                                                          "PartFirst": "*i64"}),
                constexprs={"BLOCK": blk}, num_warps=w, num_stages=st, **_arch_kw(archs)))
    return specs


# element strides a launch specialises as multiples of 16 (rows of 16-element-aligned head dims)
BWD_DIVISIBLE = ("s_qb", "s_qh", "s_qm", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "s_pkt", "s_pkh",
                 "s_pkn", "s_pvt", "s_pvh", "s_pvn", "s_dob", "s_doh", "s_dom", "s_dqb", "s_dqh", "s_dqm",
                 "s_dkb", "s_dkh", "s_dkn", "s_dvb", "s_dvh", "s_dvn", "s_dqab", "s_dqah", "s_dqam", "s_mb")


def _spec_tables():
    """[(archs, table)]: the archs whose BWD_TILES tables are equal share one set of specs."""
    out = []
    for a in ARCHS:
        for archs, table in out:
            if table == BWD_TILES[a]:
                archs.append(a)
                break
        else:
            out.append(([a], BWD_TILES[a]))
    return [(tuple(archs), table) for archs, table in out]


def spec_tag(arch: int) -> str:
    """The arch tag in spec names: "sm80+90" while both archs share one tile table."""
    for archs, _ in _spec_tables():
        if arch in archs:
            return "sm" + "+".join(str(a) for a in archs)
    raise KeyError(arch)


def _arch_kw(archs: tuple, fn=None) -> dict:
    """KernelSpec(archs=..., divisible=...) where KernelSpec has those fields (the archs sharing a tile
    table; the element strides of ``fn`` as launched with 16-element-aligned rows)."""
    fields = KernelSpec.__dataclass_fields__
    kw = {"archs": tuple(archs)} if "archs" in fields else {}
    if fn is not None and "divisible" in fields:
        kw["divisible"] = tuple(n for n in BWD_DIVISIBLE if n in fn.arg_names)
    return kw


# ----------------------------------------------------------------------------- launcher
def _strides(t, n: int = 4):
    """Element strides of the first n dims (0 for size-1 dims, so a broadcast dim costs nothing)."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(n))


def _chunk_table(prefix_index, T: int, B: int, R: int, n_chunks: int):
    """Rows of each task in chunks of at most R (device ops, no host sync).

    Returns (order [B], chunk_task, chunk_lo, chunk_hi [n_chunks], first_chunk [T + 1], part_first [T + 1]):
    chunk c covers order[chunk_lo[c]:chunk_hi[c]] (ascending b, one task); a task's chunks are
    consecutive, first_chunk[t] its first; part_first[t] its first partial slot (tasks of >= 2 chunks)."""
    dev = prefix_index.device
    if T == 1:
        return _one_task_chunk_table(B, R, n_chunks, dev)
    idx = prefix_index.to(torch.int64).clamp(0, T - 1)
    order = torch.sort(idx, stable=True)[1]
    counts = torch.bincount(idx, minlength=T)
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    task_start = torch.cat([zero, torch.cumsum(counts, 0)])
    nck = (counts + R - 1) // R
    first = torch.cat([zero, torch.cumsum(nck, 0)])
    part_first = torch.cat([zero, torch.cumsum(torch.where(nck > 1, nck, 0), 0)])
    kk = torch.arange(n_chunks, dtype=torch.int64, device=dev)
    task = torch.searchsorted(first[1:].contiguous(), kk, right=True)
    live = task < T
    task = task.clamp(max=T - 1)
    lo = task_start[task] + (kk - first[task]) * R
    hi = torch.minimum(lo + R, task_start[task + 1])
    lo = torch.where(live, lo, 0)
    hi = torch.where(live, hi, 0)
    return order, task, lo, hi, first, part_first


def _one_task_chunk_table(B: int, R: int, n_chunks: int, dev):
    """_chunk_table for T = 1 (a shared prefix): the rows in order, no sort / bincount / searchsorted."""
    kk = torch.arange(n_chunks, dtype=torch.int64, device=dev)
    lo = kk * R
    first = torch.arange(0, 2 * n_chunks, n_chunks, dtype=torch.int64, device=dev)  # [0, n_chunks]
    return (torch.arange(B, dtype=torch.int64, device=dev), torch.zeros_like(kk), lo, torch.clamp(lo + R, max=B),
            first, first * int(n_chunks > 1))


def attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *,
                       causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v) in the layouts of q, k, v, prefix_k, prefix_v
    (ops.layout.gradient_like); prefix grads [T, Hkv, P, D], or None without a prefix.  ``out`` is unused."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dev = q.device
    P = 0 if prefix_k is None else prefix_k.shape[2]
    T = 0 if prefix_k is None else prefix_k.shape[0]
    dq, dk, dv = gradient_like(q), gradient_like(k), gradient_like(v)
    pk_in, pv_in = prefix_k, prefix_v  # the caller's tensors (align_inputs may copy): their layouts
    if L == 0 or B == 0 or Hq == 0 or (prefix_k is not None and P == 0):
        if L == 0 or B == 0 or Hq == 0:
            dq.zero_(), dk.zero_(), dv.zero_()
        else:
            dq, dk, dv, _, _ = attention_backward(
                dout, q, k, v, None, None, None, key_padding_mask, out, lse, causal=causal, scale=scale,
                dropout_p=dropout_p, seed=seed, deterministic=deterministic)
        if prefix_k is None:
            return dq, dk, dv, None, None
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    vec = vec_for(q.dtype)
    ieee = q.dtype == torch.float32
    # fp32 with a ragged head dim (D not a BLOCK_D): the ragged-D kernels (fp64 score products, with
    # dropout and masks) spill, so the head dim is zero-padded to BLOCK_D in a copy; zero columns change
    # no score, and the extra gradient columns are dropped
    pad_d = ieee and D != block_d_for(D)
    (dout, q, k, v, prefix_k, prefix_v), Dp = align_inputs((dout, q, k, v, prefix_k, prefix_v), D,
                                                           block_d_for(D) if pad_d else vec)
    Dk = Dp if pad_d else D  # the head dim the kernels see
    # the kernels write dq/dk/dv straight into the caller-layout outputs when their head-dim stride is 1
    outs = []
    for o in (dq, dk, dv):
        direct = (o.stride(-1) == 1 or D == 1) and not pad_d
        outs.append(o if direct else torch.empty((*o.shape[:-1], Dk), dtype=o.dtype, device=dev))
    dq_w, dk_w, dv_w = outs
    pidx_dummy, mask_dummy = _dummies(dev)
    f32 = torch.float32
    has_prefix = P > 0
    if has_prefix:
        pk, pv, pidx = prefix_k, prefix_v, prefix_index
        pks, pvs = _strides(prefix_k), _strides(prefix_v)
    else:
        pk, pv, pidx = q, q, pidx_dummy
        pks = pvs = (0, 0, 0, 1)
    if key_padding_mask is None:
        kpm, ms = mask_dummy, (0, 1)
    else:
        kpm, ms = key_padding_mask.view(torch.uint8), _strides(key_padding_mask, 2)
    arch = device_arch(dev)
    bd = block_d_for(Dp)
    even_d = Dk == bd
    group = Hq // Hkv
    scale, dropout_p, seed = float(scale), float(dropout_p), int(seed)
    feats = dict(IEEE=ieee, CAUSAL=bool(causal), HAS_MASK=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
                 EVEN_D=even_d)
    atomic_dq = not deterministic and not ieee
    masked = masked_launch(feats)
    qbm, qbn, qw, qst = bwd_config("dq", q.dtype, bd, arch, masked)
    kbm, kbn, kw, kst = bwd_config("dkdv_atomic" if atomic_dq else "dkdv", q.dtype, bd, arch, masked)
    pbm, pbn, pw, pst = bwd_config("prefix_atomic" if not deterministic else "prefix", q.dtype, bd, arch, masked)
    lpad = max(qbm, kbm, pbm)
    Lp = triton.cdiv(L, lpad) * lpad
    lse_s = torch.empty((B * Hq, Lp), dtype=f32, device=dev)
    delta = torch.empty((B * Hq, Lp), dtype=f32, device=dev)
    row_l = torch.empty((B * Hq, Lp), dtype=f32, device=dev) if ieee else lse_s
    lse = lse.contiguous()
    qs, ks, vs, dos = _strides(q), _strides(k), _strides(v), _strides(dout)

    for stats, compute_dq in dq_launches(ieee, atomic_dq):
        _attn_bwd_dq[(Lp // qbm, B * Hq)](
            q, k, v, pk, pv, pidx, kpm, dout, lse, lse_s, row_l, delta, dq_w,
            *qs, *ks, *vs, *pks, *pvs, *ms, *dos, *_strides(dq_w),
            Hq, L, Lp, S, P, max(T, 1), Dk, group, scale, dropout_p, seed,
            BLOCK_M=qbm, BLOCK_N=qbn, BLOCK_D=bd, HAS_PREFIX=has_prefix, STATS=stats, COMPUTE_DQ=compute_dq,
            **feats, num_warps=qw, num_stages=qst)

    if atomic_dq:
        dqa = torch.zeros((B, Hq, L, Dk), dtype=f32, device=dev)
        dqas = _strides(dqa)[:3]
    else:
        dqa, dqas = lse_s, (0, 0, 0)
    _attn_bwd_dkdv[(triton.cdiv(S, kbn), B * Hkv)](
        q, k, v, kpm, dout, lse_s, row_l, delta, dk_w, dv_w, dqa,
        *qs, *ks, *vs, *ms, *dos, *_strides(dk_w), *_strides(dv_w), *dqas,
        Hq, Hkv, L, Lp, S, P, Dk, group, scale, dropout_p, seed,
        BLOCK_M=kbm, BLOCK_N=kbn, BLOCK_D=bd, ATOMIC_DQ=atomic_dq, **feats, num_warps=kw, num_stages=kst)

    dpk = dpv = None
    if has_prefix:
        n_pb = triton.cdiv(P, pbn)
        R = max(1, triton.cdiv(B * n_pb * Hkv, PREFIX_PROGRAMS))
        n_chunks = min(B, triton.cdiv(B, R) + T - 1)
        order, c_task, c_lo, c_hi, first, part_first = _chunk_table(prefix_index, T, B, R, n_chunks)
        atomic = not deterministic
        # slots of the tasks split over >= 2 chunks: at most min(n_chunks, 2 * cdiv(B, R)), none if R >= B
        n_slots = 0 if (atomic or R >= B) else min(n_chunks, 2 * triton.cdiv(B, R))
        alloc = torch.zeros if atomic else torch.empty
        dpk_o = alloc((T + n_slots, Hkv, P, Dk), dtype=f32, device=dev)
        dpv_o = alloc((T + n_slots, Hkv, P, Dk), dtype=f32, device=dev)
        _attn_bwd_dkdv_prefix[(n_chunks, n_pb, Hkv)](
            q, prefix_k, prefix_v, dout, lse_s, row_l, delta, order, c_task, c_lo, c_hi, first, part_first,
            dpk_o, dpv_o, dqa,
            *qs, *pks, *pvs, *dos, *dqas,
            Hq, Hkv, L, Lp, P, T, Dk, group, scale, dropout_p, seed,
            BLOCK_M=pbm, BLOCK_N=pbn, BLOCK_D=bd, IEEE=ieee, DROPOUT=feats["DROPOUT"], EVEN_D=even_d,
            ATOMIC_DQ=atomic_dq, ATOMIC=atomic, num_warps=pw, num_stages=pst)
        if not atomic:  # sums the split tasks' partials, zeros the tasks no row uses
            blk, w, st = REDUCE_CONFIG
            _prefix_reduce[(T * Hkv, triton.cdiv(P * Dk, blk))](
                dpk_o, dpv_o, first, part_first, T, Hkv, P * Dk, BLOCK=blk, num_warps=w, num_stages=st)
        dpk = gradient_like(pk_in).copy_(dpk_o[:T, ..., :D])
        dpv = gradient_like(pv_in).copy_(dpv_o[:T, ..., :D])
    if atomic_dq:
        dq_w.copy_(dqa.mul_(scale))
    for o, w_ in ((dq, dq_w), (dk, dk_w), (dv, dv_w)):
        if o is not w_:
            o.copy_(w_[..., :D])
    return dq, dk, dv, dpk, dpv
