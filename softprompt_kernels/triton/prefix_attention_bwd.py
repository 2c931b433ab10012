"""Triton prefix attention backward: delta preprocess, dK/dV kernel, dQ kernel, prefix-gradient reduction.

Inputs as in the forward (any strides) plus dout [B, Hq, L, D], out, lse [B, Hq, L] float32.
dK/dV grid: (cdiv(S, BLOCK_N) + cdiv(P, BLOCK_N), B * Hkv): a program owns one sequence key block
or one prefix key block of row b, and loops over the GQA group's query heads and query blocks.
Prefix gradients: per-row fp32 partials [B, Hkv, P, D] reduced per task in a fixed order
(deterministic), or fp32 atomics into [T, Hkv, P, D].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel_spec import KernelSpec
from .prefix_attention_fwd import (
    _TL_DTYPES,
    BLOCK_DS,
    CONFIG_OVERRIDE,
    UNIT_STRIDES,
    _dot,
    _dropout_keep,
    _dummies,
    _exp,
    _log_domain,
    _sdot,
    align_inputs,
    block_d_for,
    family,
    make_signature,
    unit_strides,
    vec_for,
    vstrides,
)


@triton.jit
def _bwd_preprocess(O, DO, Delta, s_ob, s_oh, s_om, s_dob, s_doh, s_dom, s_dod, Hq, L, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """Delta [B, Hq, L] fp32 = rowsum(dO * O).  Grid (cdiv(L, BLOCK_M), B * Hq); O has unit d-stride."""
    s_ob = s_ob * VEC
    s_oh = s_oh * VEC
    s_om = s_om * VEC
    s_dob = s_dob * VEC
    s_doh = s_doh * VEC
    s_dom = s_dom * VEC
    D = D * VEC
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < L
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        msk = row_ok[:, None] & (dd < D)[None, :]
        o = tl.load(O + b * s_ob + h * s_oh + rows64[:, None] * s_om + dd[None, :], mask=msk, other=0.0)
        do = tl.load(DO + b * s_dob + h * s_doh + rows64[:, None] * s_dom + dd[None, :] * s_dod,
                     mask=msk, other=0.0)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, acc, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, PK, PV, PIDX, KPM, DO, Lse, Delta, RowL, DK, DV, DPK, DPV,
                   s_qb, s_qh, s_qm, s_qd,
                   s_kb, s_kh, s_kn, s_kd,
                   s_vb, s_vh, s_vn, s_vd,
                   s_pkt, s_pkh, s_pkn, s_pkd,
                   s_pvt, s_pvh, s_pvn, s_pvd,
                   s_mb, s_ms,
                   s_dob, s_doh, s_dom, s_dod,
                   Hq, Hkv, L, S, P, D, GROUP, n_seq_blocks, causal, has_mask, use_atomic,
                   scale, dropout_p, seed,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, VEC: tl.constexpr):
    """DK, DV [B, Hkv, S, D] contiguous (input dtype); DPK, DPV fp32 contiguous: [B, Hkv, P, D]
    partials (use_atomic == 0) or [T, Hkv, P, D] atomic sums (use_atomic == 1)."""
    s_qb = s_qb * VEC
    s_qh = s_qh * VEC
    s_qm = s_qm * VEC
    s_kb = s_kb * VEC
    s_kh = s_kh * VEC
    s_kn = s_kn * VEC
    s_vb = s_vb * VEC
    s_vh = s_vh * VEC
    s_vn = s_vn * VEC
    s_pkt = s_pkt * VEC
    s_pkh = s_pkh * VEC
    s_pkn = s_pkn * VEC
    s_pvt = s_pvt * VEC
    s_pvh = s_pvh * VEC
    s_pvn = s_pvn * VEC
    s_dob = s_dob * VEC
    s_doh = s_doh * VEC
    s_dom = s_dom * VEC
    D = D * VEC
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    is_prefix = pid_n >= n_seq_blocks
    if is_prefix:
        start_n = (pid_n - n_seq_blocks) * BLOCK_N
        t = tl.load(PIDX + b).to(tl.int64)
        k_base = PK + t * s_pkt + hk64 * s_pkh
        v_base = PV + t * s_pvt + hk64 * s_pvh
        skn = s_pkn
        skd = s_pkd
        svn = s_pvn
        svd = s_pvd
        n_valid = P
        col_base = P * 0
        causal_on = causal * 0
        vis_off = S * 0 + (1 << 30)
        mask_on = has_mask * 0
    else:
        start_n = pid_n * BLOCK_N
        t = b64
        k_base = K + b64 * s_kb + hk64 * s_kh
        v_base = V + b64 * s_vb + hk64 * s_vh
        skn = s_kn
        skd = s_kd
        svn = s_vn
        svd = s_vd
        n_valid = S
        col_base = P
        causal_on = causal
        vis_off = S * 0 + (1 << 30)
        if causal != 0:
            vis_off = S - L
        mask_on = has_mask
    cols = start_n + offs_n
    cols64 = cols.to(tl.int64)
    col_ok = cols < n_valid
    kv_msk = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols64[:, None] * skn + offs_d[None, :] * skd, mask=kv_msk, other=0.0)
    v = tl.load(v_base + cols64[:, None] * svn + offs_d[None, :] * svd, mask=kv_msk, other=0.0)
    km = tl.load(KPM + b64 * s_mb + cols64 * s_ms, mask=col_ok & ((cols * 0 + mask_on) != 0), other=1)
    col_vis = col_ok & (km != 0)

    m_start = 0
    if causal_on != 0:
        m_start = tl.maximum(start_n - vis_off, 0) // BLOCK_M * BLOCK_M
    qk_scale = scale * _log_domain(IEEE)
    inv_keep = 1.0
    if dropout_p > 0.0:
        inv_keep = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        bh64 = bh.to(tl.int64)
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b64 * s_dob + h.to(tl.int64) * s_doh
        for start_m in range(m_start, L, BLOCK_M):
            rows = start_m + offs_m
            rows64 = rows.to(tl.int64)
            row_ok = rows < L
            q_msk = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows64[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_msk, other=0.0)
            do = tl.load(do_base + rows64[:, None] * s_dom + offs_d[None, :] * s_dod, mask=q_msk, other=0.0)
            lse = tl.load(Lse + bh64 * L + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * _log_domain(IEEE)
            delta = tl.load(Delta + bh64 * L + rows, mask=row_ok, other=0.0)
            qkT = _sdot(k, tl.trans(q), IEEE)
            pT = _exp(qkT * qk_scale - lse[None, :], IEEE)
            if IEEE:
                pT = pT / tl.load(RowL + bh64 * L + rows, mask=row_ok, other=1.0)[None, :]
            vis = col_vis[:, None] & row_ok[None, :] & (cols[:, None] <= rows[None, :] + vis_off)
            pT = tl.where(vis, pT, 0.0)
            dpT = _sdot(v, tl.trans(do), IEEE)
            pdT = pT
            if dropout_p > 0.0:
                keep = _dropout_keep(seed, bh, rows[None, :], (col_base + cols)[:, None], dropout_p)
                pdT = tl.where(keep, pT * inv_keep, 0.0)
                dpT = tl.where(keep, dpT * inv_keep, 0.0)
            dv += _dot(pdT.to(do.dtype), do, IEEE)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, IEEE)
    dk = dk * scale
    if is_prefix:
        prow = b64
        if use_atomic != 0:
            prow = t
        off = ((prow * Hkv + hk64) * P + cols64[:, None]) * D + offs_d[None, :]
        if use_atomic != 0:
            tl.atomic_add(DPK + off, dk, mask=kv_msk)
            tl.atomic_add(DPV + off, dv, mask=kv_msk)
        else:
            tl.store(DPK + off, dk, mask=kv_msk)
            tl.store(DPV + off, dv, mask=kv_msk)
    else:
        off = ((b64 * Hkv + hk64) * S + cols64[:, None]) * D + offs_d[None, :]
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=kv_msk)
        tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit
def _dq_inner(dq, q, do, lse, f, delta, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
              n_hi, n_valid, col_base, offs_m, offs_n, offs_d, d_ok,
              qk_scale, vis_off, kpm_base, s_ms, mask_on,
              dropout_p, inv_keep, seed, bh,
              BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """dQ accumulation over key columns [0, n_hi) of one key source (unscaled).
    P = exp(S * qk_scale - lse) (divided by the row sum f for fp32 kernels)."""
    for start_n in range(0, n_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_valid
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + cols64[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols64[None, :] * s_vn + offs_d[:, None] * s_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        km = tl.load(kpm_base + cols64 * s_ms, mask=col_ok & ((cols * 0 + mask_on) != 0), other=1)
        vis = (col_ok & (km != 0))[None, :] & (cols[None, :] <= offs_m[:, None] + vis_off)
        s = _sdot(q, kt, IEEE)
        p = tl.where(vis, _exp(s * qk_scale - lse[:, None], IEEE), 0.0)
        if IEEE:
            p = p / f[:, None]
        dp = _sdot(do, vt, IEEE)
        if dropout_p > 0.0:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (col_base + cols)[None, :], dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(q.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit
def _stats_inner(m_i, l_i, d_i, q, do, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                 n_hi, n_valid, col_base, offs_m, offs_n, offs_d, d_ok,
                 qk_scale, vis_off, kpm_base, s_ms, mask_on,
                 dropout_p, inv_keep, seed, bh,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """fp32 pass: online row max m, sum l of exp(S - m) and d = sum exp(S - m) * dP (dropped, scaled)."""
    for start_n in range(0, n_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_valid
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + cols64[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols64[None, :] * s_vn + offs_d[:, None] * s_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        km = tl.load(kpm_base + cols64 * s_ms, mask=col_ok & ((cols * 0 + mask_on) != 0), other=1)
        vis = (col_ok & (km != 0))[None, :] & (cols[None, :] <= offs_m[:, None] + vis_off)
        s = tl.where(vis, _sdot(q, kt, IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(s - m_safe[:, None], IEEE)
        alpha = _exp(m_i - m_safe, IEEE)
        dp = _sdot(do, vt, IEEE)
        if dropout_p > 0.0:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (col_base + cols)[None, :], dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        d_i = d_i * alpha + tl.sum(p * dp, 1)
        m_i = m_new
    return m_i, l_i, d_i


@triton.jit
def _attn_bwd_dq(Q, K, V, PK, PV, PIDX, KPM, DO, Lse, Delta, RowL, DQ,
                 s_qb, s_qh, s_qm, s_qd,
                 s_kb, s_kh, s_kn, s_kd,
                 s_vb, s_vh, s_vn, s_vd,
                 s_pkt, s_pkh, s_pkn, s_pkd,
                 s_pvt, s_pvh, s_pvn, s_pvd,
                 s_mb, s_ms,
                 s_dob, s_doh, s_dom, s_dod,
                 Hq, L, S, P, D, GROUP, causal, has_mask,
                 scale, dropout_p, seed,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr, VEC: tl.constexpr):
    """DQ [B, Hq, L, D] contiguous.  Grid (cdiv(L, BLOCK_M), B * Hq).  Runs before the dK/dV kernel.

    16-bit: P = exp2(S * scale * log2e - lse * log2e), Delta from the preprocess.
    fp32 (IEEE): a first pass recomputes each row's max m, sum l and Delta = rowsum(P * dP) and stores
    them (Lse <- m, RowL <- l, Delta scratch buffers) for this kernel and the dK/dV kernel; P = exp(S * scale
    - m) / l then has the rounding of plain softmax, whereas exp(S * scale - lse) would carry fp32
    rounding of lse (|lse| ulps), and rowsum(dO * O) the forward's rounding of O, amplified by D."""
    s_qb = s_qb * VEC
    s_qh = s_qh * VEC
    s_qm = s_qm * VEC
    s_kb = s_kb * VEC
    s_kh = s_kh * VEC
    s_kn = s_kn * VEC
    s_vb = s_vb * VEC
    s_vh = s_vh * VEC
    s_vn = s_vn * VEC
    s_pkt = s_pkt * VEC
    s_pkh = s_pkh * VEC
    s_pkn = s_pkn * VEC
    s_pvt = s_pvt * VEC
    s_pvh = s_pvh * VEC
    s_pvn = s_pvn * VEC
    s_dob = s_dob * VEC
    s_doh = s_doh * VEC
    s_dom = s_dom * VEC
    D = D * VEC
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = offs_m.to(tl.int64)
    row_ok = offs_m < L
    d_ok = offs_d < D
    q_msk = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + rows64[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=q_msk, other=0.0)
    do = tl.load(DO + b64 * s_dob + h.to(tl.int64) * s_doh + rows64[:, None] * s_dom + offs_d[None, :] * s_dod,
                 mask=q_msk, other=0.0)
    qk_scale = scale * _log_domain(IEEE)
    inv_keep = 1.0
    if dropout_p > 0.0:
        inv_keep = 1.0 / (1.0 - dropout_p)
    t = tl.load(PIDX + b, mask=P > 0, other=0).to(tl.int64)
    pk_base = PK + t * s_pkt + hk64 * s_pkh
    pv_base = PV + t * s_pvt + hk64 * s_pvh
    k_base = K + b64 * s_kb + hk64 * s_kh
    v_base = V + b64 * s_vb + hk64 * s_vh
    vis_off = S * 0 + (1 << 30)
    n_hi = S
    if causal != 0:
        vis_off = S - L
        n_hi = tl.maximum(tl.minimum(S, (pid_m + 1) * BLOCK_M + vis_off), 0)
    if IEEE:
        m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_r = tl.zeros([BLOCK_M], tl.float32)
        d_r = tl.zeros([BLOCK_M], tl.float32)
        m_r, l_r, d_r = _stats_inner(m_r, l_r, d_r, q, do, pk_base, pv_base,
                                     s_pkn, s_pkd, s_pvn, s_pvd, P, P, 0, offs_m, offs_n, offs_d, d_ok,
                                     qk_scale, 1 << 30, KPM, 0, 0, dropout_p, inv_keep, seed, bh, BLOCK_N, IEEE)
        m_r, l_r, d_r = _stats_inner(m_r, l_r, d_r, q, do, k_base, v_base,
                                     s_kn, s_kd, s_vn, s_vd, n_hi, S, P, offs_m, offs_n, offs_d, d_ok,
                                     qk_scale, vis_off, KPM + b64 * s_mb, s_ms, has_mask,
                                     dropout_p, inv_keep, seed, bh, BLOCK_N, IEEE)
        seen = l_r > 0.0
        f = tl.where(seen, l_r, 1.0)
        lse = tl.where(seen, m_r, float("inf"))
        delta = d_r / f
        tl.store(Lse + bh64 * L + offs_m, lse, mask=row_ok)
        tl.store(RowL + bh64 * L + offs_m, f, mask=row_ok)
        tl.store(Delta + bh64 * L + offs_m, delta, mask=row_ok)
    else:
        lse = tl.load(Lse + bh64 * L + offs_m, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * _log_domain(IEEE)
        f = lse
        delta = tl.load(Delta + bh64 * L + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(dq, q, do, lse, f, delta, pk_base, pv_base,
                   s_pkn, s_pkd, s_pvn, s_pvd, P, P, 0, offs_m, offs_n, offs_d, d_ok,
                   qk_scale, 1 << 30, KPM, 0, 0, dropout_p, inv_keep, seed, bh, BLOCK_N, IEEE)
    dq = _dq_inner(dq, q, do, lse, f, delta, k_base, v_base,
                   s_kn, s_kd, s_vn, s_vd, n_hi, S, P, offs_m, offs_n, offs_d, d_ok,
                   qk_scale, vis_off, KPM + b64 * s_mb, s_ms, has_mask,
                   dropout_p, inv_keep, seed, bh, BLOCK_N, IEEE)
    dq = dq * scale
    tl.store(DQ + (bh64 * L + rows64[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_msk)


@triton.jit
def _prefix_reduce(Part, Order, Starts, Out, Hkv, PD, BLOCK: tl.constexpr):
    """Out[t, h] = sum over r in [Starts[t], Starts[t+1]) of Part[Order[r], h], in that order.

    Part fp32 [B, Hkv, P*D]; Out [T, Hkv, P*D] (prefix dtype).  Grid (T * Hkv, cdiv(P*D, BLOCK))."""
    pid = tl.program_id(0)
    t = pid // Hkv
    h = (pid % Hkv).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PD
    r0 = tl.load(Starts + t)
    r1 = tl.load(Starts + t + 1)
    acc = tl.zeros([BLOCK], tl.float32)
    for r in range(r0, r1):
        row = tl.load(Order + r)
        acc += tl.load(Part + (row * Hkv + h) * PD + offs, mask=ok, other=0.0)
    tl.store(Out + (pid.to(tl.int64) * PD) + offs, acc.to(Out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (dtype family, BLOCK_D)
DKDV_CONFIGS = {  # BLOCK_N (keys) is the M dimension of every dot here: >= 64 for wgmma
    ("16", 32): (32, 64, 4, 1),
    ("16", 64): (32, 64, 4, 1),
    ("16", 128): (16, 64, 8, 1),
    ("16", 256): (32, 32, 8, 1),
    # fp32 (fp64 score dots): picked for zero spills on sm_80 / sm_90 under triton 3.9 and 3.6
    ("32", 32): (32, 32, 8, 1),
    ("32", 64): (32, 16, 4, 1),
    ("32", 128): (16, 16, 8, 1),
    ("32", 256): (32, 16, 8, 1),
}
DQ_CONFIGS = {
    ("16", 32): (64, 64, 4, 2),
    ("16", 64): (64, 32, 4, 2),
    ("16", 128): (64, 64, 8, 2),
    ("16", 256): (64, 16, 8, 2),
    # fp32 (fp64 score dots): picked for zero spills on sm_80 / sm_90 under triton 3.9 and 3.6
    ("32", 32): (32, 16, 4, 1),
    ("32", 64): (32, 32, 4, 1),
    ("32", 128): (32, 16, 8, 1),
    ("32", 256): (16, 32, 8, 1),
}
PRE_CONFIG = (64, 64, 4, 1)        # BLOCK_M, BLOCK_D (d chunk), warps, stages
REDUCE_CONFIG = (1024, 4, 1)       # BLOCK, warps, stages


def _cfg(kind, table, dtype, bd):
    return CONFIG_OVERRIDE.get(kind, table[(family(dtype), bd)])


def bwd_specs() -> list[KernelSpec]:
    specs = []
    for dtype, tname in _TL_DTYPES.items():
        p = "*" + tname
        ieee = dtype == torch.float32
        common = {"Q": p, "K": p, "V": p, "PK": p, "PV": p, "PIDX": "*i64", "KPM": "*u8", "DO": p,
                  "Lse": "*fp32", "Delta": "*fp32", "RowL": "*fp32", "scale": "fp32", "dropout_p": "fp32", "seed": "i64"}
        sig_kv = make_signature(_attn_bwd_dkdv, {**common, "DK": p, "DV": p, "DPK": "*fp32", "DPV": "*fp32"},
                                skip=UNIT_STRIDES)
        sig_q = make_signature(_attn_bwd_dq, {**common, "DQ": p}, skip=UNIT_STRIDES)
        for bd in BLOCK_DS:
            for kname, fn, sig, table in (("dkdv", _attn_bwd_dkdv, sig_kv, DKDV_CONFIGS),
                                          ("dq", _attn_bwd_dq, sig_q, DQ_CONFIGS)):
                bm, bn, w, st = table[(family(dtype), bd)]
                specs.append(KernelSpec(
                    name=f"prefix_attn_bwd_{kname}[d={bd},{tname}]", fn=fn, signature=sig,
                    constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IEEE": ieee, "VEC": vec_for(dtype),
                                **unit_strides(fn)},
                    num_warps=w, num_stages=st,
                    expect_wgmma=not ieee and (bn if kname == "dkdv" else bm) >= 64))
        bm, bdc, w, st = PRE_CONFIG
        if not ieee:  # fp32 computes delta inside the dQ kernel
            specs.append(KernelSpec(
            name=f"prefix_attn_bwd_preprocess[{tname}]", fn=_bwd_preprocess,
            signature=make_signature(_bwd_preprocess, {"O": p, "DO": p, "Delta": "*fp32"}, skip=UNIT_STRIDES),
            constexprs={"BLOCK_M": bm, "BLOCK_D": bdc, "VEC": vec_for(dtype),
                        **unit_strides(_bwd_preprocess)}, num_warps=w, num_stages=st))
        blk, w, st = REDUCE_CONFIG
        specs.append(KernelSpec(
            name=f"prefix_attn_bwd_reduce[{tname}]", fn=_prefix_reduce,
            signature=make_signature(_prefix_reduce, {"Part": "*fp32", "Order": "*i64", "Starts": "*i64",
                                                      "Out": p}),
            constexprs={"BLOCK": blk}, num_warps=w, num_stages=st))
    return specs


# ----------------------------------------------------------------------------- launcher
def attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *,
                       causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); prefix grads [T, Hkv, P, D] in prefix dtype or None."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dev = q.device
    P = 0 if prefix_k is None else prefix_k.shape[2]
    T = 0 if prefix_k is None else prefix_k.shape[0]
    if L == 0 or B == 0 or Hq == 0 or (prefix_k is not None and P == 0):
        if L == 0 or B == 0 or Hq == 0:
            dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
            dk = torch.zeros((B, Hkv, S, D), dtype=k.dtype, device=dev)
            dv = torch.zeros((B, Hkv, S, D), dtype=v.dtype, device=dev)
        else:
            dq, dk, dv, _, _ = attention_backward(
                dout, q, k, v, None, None, None, key_padding_mask, out, lse, causal=causal, scale=scale,
                dropout_p=dropout_p, seed=seed, deterministic=deterministic)
        if prefix_k is None:
            return dq, dk, dv, None, None
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    if key_padding_mask is not None:
        # Padded keys/values contribute nothing, whatever they hold (DESIGN §2): these kernels multiply
        # a padded key/value by p = 0 (0 * NaN = NaN in dQ, dK, dprefix), so they get zeros in their
        # place: one masked copy of K and V per backward call with a padding mask.
        pad = ~key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    vec = vec_for(q.dtype)
    (dout, q, k, v, prefix_k, prefix_v, out), Dp = align_inputs((dout, q, k, v, prefix_k, prefix_v, out), D, vec)
    dq = torch.empty((B, Hq, L, Dp), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, S, Dp), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, S, Dp), dtype=v.dtype, device=dev)
    pidx_dummy, mask_dummy = _dummies(dev)
    if prefix_k is None:
        pk, pv, pidx = q, q, pidx_dummy
        pks = pvs = (0, 0, 0)
    else:
        pk, pv, pidx = prefix_k, prefix_v, prefix_index
        pks, pvs = vstrides(prefix_k, vec), vstrides(prefix_v, vec)
    if key_padding_mask is None:
        kpm, ms = mask_dummy, (0, 0)
    else:
        kpm, ms = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    ieee = q.dtype == torch.float32
    if ieee:  # scratch row statistics written by the fp32 dQ kernel (the caller's lse is not needed)
        lse = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
        row_l = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    else:
        lse = lse.contiguous()
        row_l = lse
    bd = block_d_for(Dp)
    group = Hq // Hkv
    causal_i, mask_i = int(bool(causal)), int(key_padding_mask is not None)
    scale, dropout_p, seed = float(scale), float(dropout_p), int(seed)
    Dv = Dp // vec

    use_atomic = (not deterministic) and P > 0
    if P == 0:
        dpk_acc = dpv_acc = torch.empty(1, dtype=torch.float32, device=dev)
    elif use_atomic:
        dpk_acc = torch.zeros((T, Hkv, P, Dp), dtype=torch.float32, device=dev)
        dpv_acc = torch.zeros((T, Hkv, P, Dp), dtype=torch.float32, device=dev)
    else:
        dpk_acc = torch.empty((B, Hkv, P, Dp), dtype=torch.float32, device=dev)
        dpv_acc = torch.empty((B, Hkv, P, Dp), dtype=torch.float32, device=dev)

    common = (*vstrides(q, vec), 1, *vstrides(k, vec), 1, *vstrides(v, vec), 1, *pks, 1, *pvs, 1, *ms,
              *vstrides(dout, vec), 1)
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    bm, bdc, w, st = PRE_CONFIG
    if not ieee:  # fp32: the dQ kernel computes delta exactly
        _bwd_preprocess[(triton.cdiv(L, bm), B * Hq)](
            out, dout, delta, *vstrides(out, vec), *vstrides(dout, vec), 1, Hq, L, Dv,
            BLOCK_M=bm, BLOCK_D=bdc, VEC=vec, num_warps=w, num_stages=st)

    bm, bn, w, st = _cfg("dq", DQ_CONFIGS, q.dtype, bd)
    _attn_bwd_dq[(triton.cdiv(L, bm), B * Hq)](
        q, k, v, pk, pv, pidx, kpm, dout, lse, delta, row_l, dq, *common,
        Hq, L, S, P, Dv, group, causal_i, mask_i, scale, dropout_p, seed,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, VEC=vec, num_warps=w, num_stages=st)

    bm, bn, w, st = _cfg("dkdv", DKDV_CONFIGS, q.dtype, bd)
    n_seq = triton.cdiv(S, bn)
    _attn_bwd_dkdv[(n_seq + triton.cdiv(P, bn), B * Hkv)](
        q, k, v, pk, pv, pidx, kpm, dout, lse, delta, row_l, dk, dv, dpk_acc, dpv_acc, *common,
        Hq, Hkv, L, S, P, Dv, group, n_seq, causal_i, mask_i, int(use_atomic),
        scale, dropout_p, seed,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, VEC=vec, num_warps=w, num_stages=st)
    if Dp != D:
        dq, dk, dv = (x[..., :D].contiguous() for x in (dq, dk, dv))
    if prefix_k is None:
        return dq, dk, dv, None, None
    if use_atomic:
        dpk, dpv = dpk_acc.to(prefix_k.dtype), dpv_acc.to(prefix_v.dtype)
    else:
        # deterministic per-task reduction: rows of each task in ascending b order
        sorted_idx, order = torch.sort(prefix_index.to(torch.int64), stable=True)
        starts = torch.searchsorted(sorted_idx, torch.arange(T + 1, dtype=torch.int64, device=dev))
        blk, w, st = REDUCE_CONFIG
        PD = P * Dp
        dpk = torch.empty((T, Hkv, P, Dp), dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty((T, Hkv, P, Dp), dtype=prefix_v.dtype, device=dev)
        for part, o in ((dpk_acc, dpk), (dpv_acc, dpv)):
            _prefix_reduce[(T * Hkv, triton.cdiv(PD, blk))](part, order, starts, o, Hkv, PD,
                                                            BLOCK=blk, num_warps=w, num_stages=st)
    if Dp != D:
        dpk, dpv = dpk[..., :D].contiguous(), dpv[..., :D].contiguous()
    return dq, dk, dv, dpk, dpv
