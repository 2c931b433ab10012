"""Triton prefix attention: forward kernel, dropout keep-mask kernel and their launchers.

Layouts (any strides): q [B, Hq, L, D]; k, v [B, Hkv, S, D]; prefix_k, prefix_v [T, Hkv, P, D]
read through prefix_index [B] (no batch stride); key_padding_mask bool [B, S].
Outputs: out [B, Hq, L, D] (q.dtype, contiguous), lse [B, Hq, L] float32 (natural log).
One online softmax runs first over the P prefix columns, then over the S sequence columns
(causal bottom-right aligned: column j visible for row i iff j <= i + S - L).
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from .kernel_spec import KernelSpec

# The Triton interpreter multiplies bf16 tiles as their raw uint16 storage (triton 3.9), so under
# TRITON_INTERPRET=1 bf16 dot operands are widened to fp32 first (exact: same products, fp32 sums).
# Compiled kernels never take this branch.
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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
    """Score-type product (Q K^T, dO V^T) in fp32.  fp32 kernels accumulate it in fp64 and round
    once: these values feed exp() and the dP - Delta cancellation, where fp32 accumulation error
    (~sqrt(D) ulps of |S|) would dominate everything else; 16-bit kernels use the tensor-core dot."""
    if IEEE:
        r = tl.dot(a.to(tl.float64), b.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
    else:
        r = _dot(a, b, IEEE)
    return r


@triton.jit
def _exp(x, IEEE: tl.constexpr):
    """Softmax exponential: natural exp for fp32 (IEEE) kernels, exp2 of log2-scaled scores otherwise.

    fp32 keeps scores, lse and exponent in the natural-log domain so that no extra rounding of
    lse * log2(e) enters the recomputed probabilities (it would cost several fp32 ulps)."""
    if IEEE:
        r = tl.exp(x)
    else:
        r = tl.exp2(x)
    return r


@triton.jit
def _log_domain(IEEE: tl.constexpr):
    """Factor from natural-log units to the kernels' exponent domain (1 or log2(e))."""
    if IEEE:
        r: tl.constexpr = 1.0
    else:
        r: tl.constexpr = 1.4426950408889634
    return r


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p):
    """Keep decision for query rows x combined columns (broadcastable int32 blocks).

    Philox-4x32 keyed by the 64-bit seed with counter (c, i, b*Hq + h, 0): no index ever
    multiplies another, so it is exact for any size.  Keep iff uniform >= dropout_p.
    """
    zero = rows * 0 + cols * 0
    c0 = cols + zero
    c1 = rows + zero
    c2 = zero + bh
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, c2, zero)
    u = tl.uint_to_uniform_float(r0)
    return u >= dropout_p


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
               n_hi, n_valid, col_base, offs_m, offs_n, offs_d, d_ok,
               qk_scale, vis_off, kpm_base, s_ms, mask_on,
               dropout_p, seed, bh,
               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update over key columns [0, n_hi) of one key source (prefix or sequence).

    Column j is visible for row i iff j < n_valid, j <= i + vis_off and (not mask_on or kpm[j])."""
    for start_n in range(0, n_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_valid
        cols64 = cols.to(tl.int64)
        kt = tl.load(k_base + cols64[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = _sdot(q, kt, IEEE) * qk_scale
        km = tl.load(kpm_base + cols64 * s_ms, mask=col_ok & ((cols * 0 + mask_on) != 0), other=1)
        vis = (col_ok & (km != 0))[None, :] & (cols[None, :] <= offs_m[:, None] + vis_off)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(s - m_safe[:, None], IEEE)
        alpha = _exp(m_i - m_safe, IEEE)
        l_i = l_i * alpha + tl.sum(p, 1)
        if dropout_p > 0.0:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (col_base + cols)[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + cols64[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, PK, PV, PIDX, KPM, Out, Lse,
              s_qb, s_qh, s_qm, s_qd,
              s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd,
              s_pkt, s_pkh, s_pkn, s_pkd,
              s_pvt, s_pvh, s_pvn, s_pvd,
              s_mb, s_ms,
              s_ob, s_oh, s_om,
              Hq, L, S, P, D, GROUP, causal, has_mask,
              scale, dropout_p, seed,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              IEEE: tl.constexpr, VEC: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), B * Hq).  The launcher guarantees that D and every non-unit stride
    are multiples of VEC (16 bytes) and the head-dim strides are 1, so tiles load as 16-byte vectors."""
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
    s_ob = s_ob * VEC
    s_oh = s_oh * VEC
    s_om = s_om * VEC
    D = D * VEC
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    d_ok = offs_d < D
    rows64 = offs_m.to(tl.int64)

    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + rows64[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale * _log_domain(IEEE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # prefix columns: combined column c = j, never masked except the ragged tail
    if P > 0:
        t = tl.load(PIDX + b).to(tl.int64)
        hk64 = hk.to(tl.int64)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, PK + t * s_pkt + hk64 * s_pkh,
                                   PV + t * s_pvt + hk64 * s_pvh, s_pkn, s_pkd, s_pvn, s_pvd,
                                   P, P, 0, offs_m, offs_n, offs_d, d_ok,
                                   qk_scale, 1 << 30, KPM, 0, 0,
                                   dropout_p, seed, bh, BLOCK_N, IEEE)
    # sequence columns: combined column c = P + j
    vis_off = S * 0 + (1 << 30)
    n_hi = S
    if causal != 0:
        vis_off = S - L
        n_hi = tl.maximum(tl.minimum(S, (pid_m + 1) * BLOCK_M + vis_off), 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K + b64 * s_kb + hk.to(tl.int64) * s_kh,
                               V + b64 * s_vb + hk.to(tl.int64) * s_vh, s_kn, s_kd, s_vn, s_vd,
                               n_hi, S, P, offs_m, offs_n, offs_d, d_ok,
                               qk_scale, vis_off, KPM + b64 * s_mb, s_ms, has_mask,
                               dropout_p, seed, bh, BLOCK_N, IEEE)

    has_any = l_i > 0.0
    inv_keep = 1.0
    if dropout_p > 0.0:
        inv_keep = 1.0 / (1.0 - dropout_p)
    l_safe = tl.where(has_any, l_i, 1.0)
    if IEEE:  # fp32: one correctly rounded division, like a plain softmax
        out = (acc / l_safe[:, None]) * inv_keep
    else:
        out = acc * (inv_keep / l_safe)[:, None]
    out = tl.where(has_any[:, None], out, 0.0)
    if IEEE:
        lse = m_i + tl.log(l_safe)
    else:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    lse = tl.where(has_any, lse, float("-inf"))
    tl.store(Out + b64 * s_ob + h.to(tl.int64) * s_oh + rows64[:, None] * s_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- keep mask
@triton.jit
def _dropout_mask_kernel(Mask, Hq, L, C, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mask uint8 [B, Hq, L, C] contiguous, C = P + S.  Grid (cdiv(L, BLOCK_M), B * Hq)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    base = Mask + (bh.to(tl.int64) * L + offs_m.to(tl.int64)[:, None]) * C
    for start in range(0, C, BLOCK_N):
        cols = start + offs_n
        keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], dropout_p)
        tl.store(base + cols[None, :], keep.to(tl.uint8), mask=(offs_m < L)[:, None] & (cols < C)[None, :])


# ----------------------------------------------------------------------------- configs
def vec_for(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the alignment the launchers guarantee for D and every stride."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def block_d_for(D: int) -> int:
    """Padded head dim: next power of two, at least 32 (D = 16 runs half-masked in the 32 configs)."""
    return max(32, triton.next_power_of_2(D))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (dtype family, BLOCK_D)
FWD_CONFIGS = {
    ("16", 32): (64, 64, 4, 2),
    ("16", 64): (64, 64, 4, 3),
    ("16", 128): (128, 32, 8, 2),
    ("16", 256): (64, 32, 8, 2),  # 8 warps: 4 warps spill under triton 3.6
    # fp32 (fp64 score dots): picked for zero spills on sm_80 / sm_90 under triton 3.9 and 3.6
    ("32", 32): (32, 32, 4, 2),
    ("32", 64): (32, 16, 4, 1),
    ("32", 128): (32, 32, 8, 1),
    ("32", 256): (16, 32, 8, 1),
}
BLOCK_DS = (32, 64, 128, 256)
MASK_CONFIG = (32, 64, 4, 1)

# test hook: {"fwd": (BM, BN, warps, stages)} replaces the table (interpreter tests only)
CONFIG_OVERRIDE: dict = {}


def family(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def fwd_config(dtype: torch.dtype, block_d: int):
    return CONFIG_OVERRIDE.get("fwd", FWD_CONFIGS[(family(dtype), block_d)])


def make_signature(fn, types: dict, default: str = "i32", skip=()) -> dict:
    """Signature for every non-constexpr argument of ``fn`` not in ``skip``: ``types`` overrides ``default``."""
    params = inspect.signature(fn.fn).parameters.values()
    return {p.name: types.get(p.name, default) for p in params if p.annotation is not tl.constexpr
            and p.annotation != "tl.constexpr" and p.name not in skip}


# The launchers always pass a unit head-dim stride (align_inputs guarantees it) and Triton turns an
# integer argument equal to 1 into a constexpr at launch, so the shipped specs have them as constexpr 1.
UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_dod")


def unit_strides(fn) -> dict:
    names = inspect.signature(fn.fn).parameters
    return {n: 1 for n in UNIT_STRIDES if n in names}


def fwd_specs() -> list[KernelSpec]:
    specs = []
    for dtype, tname in _TL_DTYPES.items():
        p = "*" + tname
        sig = make_signature(_attn_fwd, {
            "Q": p, "K": p, "V": p, "PK": p, "PV": p, "PIDX": "*i64", "KPM": "*u8",
            "Out": p, "Lse": "*fp32", "scale": "fp32", "dropout_p": "fp32", "seed": "i64"}, skip=UNIT_STRIDES)
        for bd in BLOCK_DS:
            bm, bn, w, st = FWD_CONFIGS[(family(dtype), bd)]
            specs.append(KernelSpec(
                name=f"prefix_attn_fwd[d={bd},{tname}]", fn=_attn_fwd, signature=sig,
                constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IEEE": dtype == torch.float32,
                            "VEC": vec_for(dtype),
                            **unit_strides(_attn_fwd)},
                num_warps=w, num_stages=st, expect_wgmma=dtype != torch.float32 and bm >= 64))
    bm, bn, w, st = MASK_CONFIG
    specs.append(KernelSpec(
        name="prefix_attn_dropout_mask", fn=_dropout_mask_kernel,
        signature=make_signature(_dropout_mask_kernel, {"Mask": "*u8", "dropout_p": "fp32", "seed": "i64"}),
        constexprs={"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st))
    return specs


# ----------------------------------------------------------------------------- launchers
def _dummies(device):
    return (torch.zeros(1, dtype=torch.int64, device=device), torch.ones(1, dtype=torch.uint8, device=device))


def _aligned(t, vec: int) -> bool:
    """Unit head-dim stride, 16-byte aligned base, every other stride a multiple of vec."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    if t.data_ptr() % 16:
        return False
    return all(st % vec == 0 or n == 1 for st, n in zip(t.stride()[:-1], t.shape[:-1]))


def align_inputs(tensors, D: int, vec: int):
    """Make every tensor meet the kernels' 16-byte alignment contract (see _attn_fwd).

    Returns (tensors, Dp).  The common case (unit head-dim stride, D and strides multiples of
    16 bytes: any contiguous or [B, L, H, D]-transposed input with D % 8 == 0) passes through
    with no copy.  Otherwise the head dim is zero-padded to Dp (a multiple of vec) in a copy;
    zero columns change no score and the extra output columns are dropped by the caller.
    """
    Dp = -(-D // vec) * vec
    out = []
    for t in tensors:
        if t is None or (Dp == D and _aligned(t, vec)):
            out.append(t)
            continue
        c = torch.zeros((*t.shape[:-1], Dp), dtype=t.dtype, device=t.device)
        c[..., :D] = t
        out.append(c)
    return out, Dp


def vstrides(t, vec: int, n: int = 3):
    """First n strides of t in units of vec (size-1 dims get 0)."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) // vec for i in range(n))


def attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                      causal: bool, scale: float, dropout_p: float, seed: int):
    """Returns (out [B, Hq, L, D] q.dtype contiguous, lse [B, Hq, L] float32)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B == 0 or Hq == 0 or L == 0:
        return torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device), lse
    vec = vec_for(q.dtype)
    P = 0 if prefix_k is None else prefix_k.shape[2]
    if P == 0:
        prefix_k = prefix_v = None
    (q, k, v, prefix_k, prefix_v), Dp = align_inputs((q, k, v, prefix_k, prefix_v), D, vec)
    out = torch.empty((B, Hq, L, Dp), dtype=q.dtype, device=q.device)
    pidx_dummy, mask_dummy = _dummies(q.device)
    if P == 0:
        pk, pv, pidx = q, q, pidx_dummy
        pks = pvs = (0, 0, 0)
    else:
        pk, pv, pidx = prefix_k, prefix_v, prefix_index
        pks, pvs = vstrides(prefix_k, vec), vstrides(prefix_v, vec)
    if key_padding_mask is None:
        kpm, ms = mask_dummy, (0, 0)
    else:
        kpm, ms = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    bd = block_d_for(Dp)
    bm, bn, w, st = fwd_config(q.dtype, bd)
    grid = (triton.cdiv(L, bm), B * Hq)
    _attn_fwd[grid](
        q, k, v, pk, pv, pidx, kpm, out, lse,
        *vstrides(q, vec), 1, *vstrides(k, vec), 1, *vstrides(v, vec), 1, *pks, 1, *pvs, 1, *ms,
        *vstrides(out, vec),
        Hq, L, S, P, Dp // vec, Hq // Hkv, int(bool(causal)), int(key_padding_mask is not None),
        float(scale), float(dropout_p), int(seed),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=q.dtype == torch.float32, VEC=vec,
        num_warps=w, num_stages=st)
    if Dp != D:
        out = out[..., :D].contiguous()
    return out, lse


def dropout_keep_mask(seed, B, Hq, L, P, S, dropout_p, device):
    """bool [B, Hq, L, P + S]: exactly the keep decisions the kernels make."""
    C = P + S
    mask = torch.empty((B, Hq, L, C), dtype=torch.bool, device=device)
    if mask.numel() == 0:
        return mask
    bm, bn, w, st = MASK_CONFIG
    _dropout_mask_kernel[(triton.cdiv(L, bm), B * Hq)](
        mask.view(torch.uint8), Hq, L, C, float(dropout_p), int(seed),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    return mask


__all__ = ["attention_forward", "block_d_for", "dropout_keep_mask", "fwd_specs"]
