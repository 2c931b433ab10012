"""Triton kernels + launchers of the fused prefix MLP (backend interface: ``ops/prefix_mlp.py``).

Two kernels cover the five GEMMs (fp32 accumulation; fp32 dots use ``input_precision="ieee"``):

``_mlp_mm_kernel``   C[M, N] = A[M, K] @ B[K, N] with a fused epilogue
    * forward GEMM1 (EPI=1): ``pre = x @ w1.T + b1`` -> store ``pre`` (saved) and ``act(pre)``;
    * forward GEMM2 (EPI=0): ``act(pre) @ w2.T + b2`` stored straight into ``out [G = L*2*Hkv, P, D]``
      (column n = g*D + d -> ``out[g, p, d]``): each program owns a d-chunk of one group g, so the
      store is contiguous and there is no permute copy;
    * backward dH (EPI=2, A_SPLIT_K): ``dpre = (dOut_flat @ w2) * act'(pre)``, ``dOut_flat[p, g*D + d]``
      read from the ``[G, P, D]`` gradient as (group, d-chunk) K-steps; the epilogue also writes the
      recomputed ``act(pre)`` for dW2;
    * backward dx (EPI=0): ``dx = dpre @ w1``.
``_mlp_wgrad_kernel`` dW[M, N] = G[:, M]^T @ X (K = P) and, in the ``pid_n == 0`` column of programs,
    ``db[M] = sum_p G[p, M]``: dW2/db2 (G = dOut in the ``[G, P, D]`` layout) and dW1/db1.
    Deterministic: no atomics anywhere.

Saved memory: only the pre-activation ``[P, H1]`` (input dtype).  ``act(pre)`` is a
temporary of each pass: written by GEMM1's epilogue for GEMM2, and recomputed by the dH
epilogue for dW2.  For ``identity`` pre == act(pre) and one buffer serves both.

The kernels hard-wire unit stride in every operand's last dim (launchers copy otherwise).
ALIGNED (E, H1, D and all strides multiples of 8) lets the compiler prove 16-byte
vectors (cp.async / wgmma pipelines); ragged sizes use the ALIGNED=False variant.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel_spec import KernelSpec

ACT_IDS = {"identity": 0, "tanh": 1, "relu": 2, "gelu": 3}


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # odd series near 0 avoids the cancellation in 1 - e (error O(x^9) for |x| < 1/16)
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    return tl.where(ax < 0.0625, small, tl.where(x < 0.0, -t, t))


@triton.jit
def _act(x, ACT: tl.constexpr):
    y = x
    if ACT == 1:
        y = _tanh(x)
    elif ACT == 2:
        y = tl.where(x > 0.0, x, 0.0)
    elif ACT == 3:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / d x evaluated at the pre-activation x (relu: 0 at x == 0, as torch)."""
    g = tl.full(x.shape, 1.0, tl.float32)
    if ACT == 1:
        t = _tanh(x)
        g = 1.0 - t * t
    elif ACT == 2:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        g = cdf + x * pdf
    return g


@triton.jit
def _cast(x, dst_ty: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dst_ty); under UPCAST (interpreter, bf16) round to nearest even by hand, because the
    interpreter's fp32 -> bf16 cast truncates (the GPU cast rounds to nearest even)."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dst_ty)
    return y


@triton.jit
def _mlp_mm_kernel(
    A, B, C, BIAS, PRE, AOUT,
    M, K, C_GROUPS, C_D, A_D,
    stride_am, stride_ag, stride_b, stride_cm, stride_cg,
    ACT: tl.constexpr, EPI: tl.constexpr, HAS_BIAS: tl.constexpr, A_SPLIT_K: tl.constexpr,
    B_KMAJOR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]) then epilogue EPI; N = C_GROUPS * C_D.

    Column n = g*C_D + d is stored at ``C + m*scm + g*scg + d``: with C_GROUPS = 1 a plain
    row-major matrix, with (G, D) the ``[G, P, D]`` prefix layout.  Each program owns one
    d-chunk of one group, so its stores are contiguous.
    A[m, k]: ``m*sam + k``; with A_SPLIT_K, k = g*A_D + d lives at ``m*sam + g*sag + d`` and
    the K loop walks (group, d-chunk) pairs so every load is contiguous.
    B[k, n]: ``k + n*sb`` if B_KMAJOR else ``k*sb + n``.
    EPI 0: C = acc (+bias).  EPI 1: PRE = acc + bias (if ACT != identity), C = act(PRE rounded).
    EPI 2: C = acc * act'(PRE); AOUT = act(PRE) (if ACT != identity).  PRE/AOUT: row-major [M, N].
    """
    if ALIGNED:  # launcher-checked: these are multiples of 8; (x // 8) * 8 tells the compiler so
        K = (K // 8) * 8
        C_D = (C_D // 8) * 8
        A_D = (A_D // 8) * 8
        stride_am = (stride_am // 8) * 8
        stride_ag = (stride_ag // 8) * 8
        stride_b = (stride_b // 8) * 8
        stride_cm = (stride_cm // 8) * 8
        stride_cg = (stride_cg // 8) * 8
    pid_n = tl.program_id(0)  # the many (group, d-chunk) tiles on the 2^31-wide axis
    pid_m = tl.program_id(1)
    n_chunks = tl.cdiv(C_D, BLOCK_N)
    grp = pid_n // n_chunks
    offs_d = (pid_n - grp * n_chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = grp * C_D + offs_d
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_d < C_D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if A_SPLIT_K:
        k_chunks = tl.cdiv(A_D, BLOCK_K)
        for t in range(0, (K // A_D) * k_chunks):
            kg = t // k_chunks
            dd = (t - kg * k_chunks) * BLOCK_K + rk
            mask_k = dd < A_D
            kb = kg * A_D + dd
            a = tl.load(A + (offs_m[:, None] * stride_am + kg * stride_ag + dd[None, :]),
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if B_KMAJOR:
                b_ptrs = B + (kb[:, None] + offs_n[None, :] * stride_b)
            else:
                b_ptrs = B + (kb[:, None] * stride_b + offs_n[None, :])
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # interpreter only: its dot reads bf16 bit patterns as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
    else:
        a_ptrs = A + (offs_m[:, None] * stride_am + rk[None, :])
        if B_KMAJOR:
            b_ptrs = B + (rk[:, None] + offs_n[None, :] * stride_b)
            b_step = BLOCK_K
        else:
            b_ptrs = B + (rk[:, None] * stride_b + offs_n[None, :])
            b_step = BLOCK_K * stride_b
        for k0 in range(0, K, BLOCK_K):
            mask_k = rk < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += b_step

    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPI == 1:
        pre = _cast(acc, C.dtype.element_ty, UPCAST).to(tl.float32)  # the rounded pre the backward will see
        if ACT != 0:
            p_off = offs_m[:, None] * (C_GROUPS * C_D) + offs_n[None, :]
            tl.store(PRE + p_off, _cast(pre, PRE.dtype.element_ty, UPCAST), mask=mask)
        res = _act(pre, ACT)
    elif EPI == 2:
        p_off = offs_m[:, None] * (C_GROUPS * C_D) + offs_n[None, :]
        pre = tl.load(PRE + p_off, mask=mask, other=0.0).to(tl.float32)
        res = acc * _act_grad(pre, ACT)
        if ACT != 0:
            tl.store(AOUT + p_off, _cast(_act(pre, ACT), AOUT.dtype.element_ty, UPCAST), mask=mask)
    else:
        res = acc
    c_off = offs_m[:, None] * stride_cm + grp * stride_cg + offs_d[None, :]
    tl.store(C + c_off, _cast(res, C.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _mlp_wgrad_kernel(
    G, X, DW, DB,
    N, K, G_D,
    stride_gk, stride_gg, stride_xk,
    WITH_DB: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """DW[m, n] = sum_k G[k, m] X[k, n] (row-major [M, N]);  DB[m] = sum_k G[k, m] (pid_n == 0).

    Row m = g*G_D + d of DW reads G column ``k*sgk + g*sgg + d`` (the [G, P, D] layout; a
    plain [K, M] matrix is one group with G_D = M).  Each program owns one d-chunk of one
    group (grid axis 0 = groups * cdiv(G_D, BLOCK_M)).  X[k, n] at ``k*sxk + n``.
    """
    if ALIGNED:  # launcher-checked: these are multiples of 8; (x // 8) * 8 tells the compiler so
        N = (N // 8) * 8
        G_D = (G_D // 8) * 8
        stride_gk = (stride_gk // 8) * 8
        stride_gg = (stride_gg // 8) * 8
        stride_xk = (stride_xk // 8) * 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m_chunks = tl.cdiv(G_D, BLOCK_M)
    grp = pid_m // m_chunks
    offs_d = (pid_m - grp * m_chunks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = grp * G_D + offs_d
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = offs_d < G_D
    mask_n = offs_n < N
    g_base = G + grp * stride_gg
    g_ptrs = g_base + (offs_d[:, None] + rk[None, :] * stride_gk)
    x_ptrs = X + (rk[:, None] * stride_xk + offs_n[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = rk < K - k0
        a = tl.load(g_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(x_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # interpreter only: its dot reads bf16 bit patterns as integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        g_ptrs += BLOCK_K * stride_gk
        x_ptrs += BLOCK_K * stride_xk
    tl.store(DW + (offs_m[:, None] * N + offs_n[None, :]), _cast(acc, DW.dtype.element_ty, UPCAST),
             mask=mask_m[:, None] & mask_n[None, :])
    if WITH_DB:
        if pid_n == 0:  # a second, cheap pass over this program's G columns
            dsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                a = tl.load(g_base + (offs_d[:, None] + kk[None, :] * stride_gk),
                            mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
                dsum += tl.sum(a.to(tl.float32), axis=1)
            tl.store(DB + offs_m, _cast(dsum, DB.dtype.element_ty, UPCAST), mask=mask_m)


# ----------------------------------------------------------------------------- configs

# role -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).  16-bit, aligned: 64-row tiles
# with 4 warps (one warpgroup -> wgmma on sm_90).  "out" tiles one head's D columns (64
# divides the usual head dims); "dh" walks D-chunks of 32 along K and keeps a narrow tile for
# its heavier epilogue.  fp32 (FMA dots, "ieee"): one config.  Unaligned sizes (scalar loads,
# no cp.async pipelining possible): short K steps, 8 warps, no prefetch stage, which keeps
# every variant well under 255 registers on Triton 3.6 and 3.9.
_CFG_16 = {
    "hidden": (64, 128, 64, 4, 3),
    "out": (64, 64, 64, 4, 3),
    "dh": (64, 64, 32, 4, 3),
    "dx": (64, 128, 64, 4, 3),
    "wgrad": (64, 128, 64, 4, 3),
}
_CFG_FP32 = (64, 64, 32, 4, 2)
_CFG_UNALIGNED = (64, 64, 16, 8, 1)


def _config(role: str, dtype: torch.dtype, aligned: bool):
    if not aligned:
        return _CFG_UNALIGNED
    return _CFG_FP32 if dtype == torch.float32 else _CFG_16[role]


def _upcast(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET the interpreter's dot reads bf16 bit patterns as integers: feed it fp32."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _rowmajor(t: Optional[Tensor]) -> Optional[Tensor]:
    """Unit stride in the last dim (the kernels hard-wire it); copies only when needed."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _mm(role, a, b, c, bias, pre, aout, M, K, c_groups, c_d, a_d, stride_am, stride_ag, stride_b, stride_cm,
        stride_cg, *, act, epi, a_split_k, b_kmajor, aligned):
    bm, bn, bk, warps, stages = _config(role, c.dtype, aligned)
    if triton.cdiv(M, bm) > 65535:
        raise ValueError(f"prefix_mlp (triton): P = {M} rows exceed the grid limit")
    grid = (c_groups * triton.cdiv(c_d, bn), triton.cdiv(M, bm))
    _mlp_mm_kernel[grid](
        a, b, c, bias if bias is not None else c, pre if pre is not None else c, aout if aout is not None else c,
        M, K, c_groups, c_d, a_d, stride_am, stride_ag, stride_b, stride_cm, stride_cg,
        ACT=act, EPI=epi, HAS_BIAS=bias is not None, A_SPLIT_K=a_split_k, B_KMAJOR=b_kmajor,
        IEEE=c.dtype == torch.float32, UPCAST=_upcast(c.dtype), ALIGNED=aligned, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )


def _wgrad(g, groups, g_d, stride_gk, stride_gg, x, dw, db, N, K, aligned):
    """Always computes db too (a scratch buffer when there is no bias): one compiled variant."""
    bm, bn, bk, warps, stages = _config("wgrad", dw.dtype, aligned)
    grid = (groups * triton.cdiv(g_d, bm), triton.cdiv(N, bn))
    _mlp_wgrad_kernel[grid](
        g, x, dw, db, N, K, g_d, stride_gk, stride_gg, x.stride(0),
        WITH_DB=True, IEEE=dw.dtype == torch.float32, UPCAST=_upcast(dw.dtype), ALIGNED=aligned,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )


def _empty(shape, like: Tensor) -> Tensor:
    """Every buffer the launchers allocate (tests patch this to poison them with NaN)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _aligned(*ints) -> bool:
    """Every size / stride a multiple of 8 elements: the kernels may assume 16-byte vectors."""
    return all(int(v) % 8 == 0 for v in ints)


def _check_int32(*tensors):
    for t in tensors:
        if t is not None and t.numel() >= 2**31:
            raise ValueError(f"prefix_mlp (triton): tensor of {t.numel()} elements exceeds int32 indexing")


# ----------------------------------------------------------------------------- launchers

def mlp_forward(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], *,
    num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor]:
    """x [P, E], w1 [H1, E], w2 [N = L*2*Hkv*D, H1] -> (out [L, 2, Hkv, P, D] contiguous, pre [P, H1])."""
    x, w1, b1, w2, b2 = map(_rowmajor, (x, w1, b1, w2, b2))
    _check_int32(x, w1, w2)
    P, E = x.shape
    H1 = w1.shape[0]
    D = head_dim
    G = num_layers * 2 * num_kv_heads
    act = ACT_IDS[activation]
    al = _aligned(E, H1, D, x.stride(0), w1.stride(0), w2.stride(0))
    # a missing bias is a zero vector: one compiled variant per kernel instead of two
    b1 = b1 if b1 is not None else torch.zeros((H1,), dtype=x.dtype, device=x.device)
    b2 = b2 if b2 is not None else torch.zeros((G * D,), dtype=x.dtype, device=x.device)
    hidden = _empty((P, H1), x)
    pre = hidden if act == 0 else _empty((P, H1), x)
    _mm("hidden", x, w1, hidden, b1, pre, None, P, E, 1, H1, 1, x.stride(0), 0, w1.stride(0), H1, 0,
        act=act, epi=1, a_split_k=False, b_kmajor=True, aligned=al)
    out = _empty((G, P, D), x)
    _check_int32(out)
    _mm("out", hidden, w2, out, b2, None, None, P, H1, G, D, 1, H1, 0, w2.stride(0), D, P * D,
        act=0, epi=0, a_split_k=False, b_kmajor=True, aligned=al)
    return out.view(num_layers, 2, num_kv_heads, P, D), pre


def _grad_out_gpd(grad_out: Tensor, G: int, P: int, D: int) -> Tensor:
    """grad_out seen as [G, P, D] with unit stride along D (copies only if that is impossible)."""
    try:
        g = grad_out.view(G, P, D)
    except RuntimeError:
        g = grad_out.reshape(G, P, D)
    return _rowmajor(g)


def mlp_backward(
    grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, pre: Tensor, *,
    has_b2: bool, num_layers: int, num_kv_heads: int, head_dim: int, activation: str,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """grad_out [L, 2, Hkv, P, D] -> (dx, dw1, db1 | None, dw2, db2 | None), each in its input's dtype."""
    x, w1, w2 = map(_rowmajor, (x, w1, w2))
    pre = pre.contiguous()
    P, E = x.shape
    H1 = w1.shape[0]
    D = head_dim
    G = num_layers * 2 * num_kv_heads
    N = G * D
    act = ACT_IDS[activation]
    g = _grad_out_gpd(grad_out, G, P, D)
    _check_int32(x, w1, w2, g)
    sg, sp = g.stride(0), g.stride(1)
    al = _aligned(E, H1, D, sg, sp, x.stride(0), w1.stride(0), w2.stride(0))
    # dpre = (dOut_flat @ w2) * act'(pre); the epilogue also rewrites hidden = act(pre) for dW2
    dpre = _empty((P, H1), x)
    hidden = pre if act == 0 else _empty((P, H1), x)
    _mm("dh", g, w2, dpre, None, pre, hidden, P, N, 1, H1, D, sp, sg, w2.stride(0), H1, 0,
        act=act, epi=2, a_split_k=True, b_kmajor=False, aligned=al)
    dw2 = _empty((N, H1), w2)
    db2 = _empty((N,), w2)
    _wgrad(g, G, D, sp, sg, hidden, dw2, db2, H1, P, al)
    dw1 = _empty((H1, E), w1)
    db1 = _empty((H1,), w1)
    _wgrad(dpre, 1, H1, H1, 0, x, dw1, db1, E, P, al)
    dx = _empty((P, E), x)
    _mm("dx", dpre, w1, dx, None, None, None, P, H1, 1, E, 1, H1, 0, w1.stride(0), E, 0,
        act=0, epi=0, a_split_k=False, b_kmajor=False, aligned=al)
    return dx, dw1, (db1 if b1 is not None else None), dw2, (db2 if has_b2 else None)


# ----------------------------------------------------------------------------- AOT

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, constexpr, config) combination the launchers above can launch.

    ALIGNED=True is the usual case (E, H1, D and the strides multiples of 8); ALIGNED=False is
    the ragged fallback with the small config.  16-bit aligned specs must get wgmma on sm_90.
    """
    specs = []
    for dtype, ty in _TY.items():
        for aligned in (True, False):
            wg = dtype != torch.float32 and aligned
            flags = dict(IEEE=dtype == torch.float32, UPCAST=False, ALIGNED=aligned)
            tag = f"{ty}{'' if aligned else ',unaligned'}"
            mm_sig = {n: f"*{ty}" for n in ("A", "B", "C", "BIAS", "PRE", "AOUT")}
            mm_sig.update({n: "i32" for n in ("M", "K", "C_GROUPS", "C_D", "A_D", "stride_am", "stride_ag",
                                              "stride_b", "stride_cm", "stride_cg")})
            variants = []  # (name, role, constexprs)
            for aname, aid in ACT_IDS.items():
                variants.append((f"hidden[{aname}]", "hidden",
                                 dict(ACT=aid, EPI=1, HAS_BIAS=True, A_SPLIT_K=False, B_KMAJOR=True)))
                variants.append((f"dhidden[{aname}]", "dh",
                                 dict(ACT=aid, EPI=2, HAS_BIAS=False, A_SPLIT_K=True, B_KMAJOR=False)))
            variants.append(("out", "out", dict(ACT=0, EPI=0, HAS_BIAS=True, A_SPLIT_K=False, B_KMAJOR=True)))
            variants.append(("dx", "dx", dict(ACT=0, EPI=0, HAS_BIAS=False, A_SPLIT_K=False, B_KMAJOR=False)))
            for name, role, cx in variants:
                bm, bn, bk, warps, stages = _config(role, dtype, aligned)
                specs.append(KernelSpec(f"prefix_mlp_{name}[{tag}]", _mlp_mm_kernel, mm_sig,
                                        {**cx, **flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                        num_warps=warps, num_stages=stages, expect_wgmma=wg))
            wg_sig = {n: f"*{ty}" for n in ("G", "X", "DW", "DB")}
            wg_sig.update({n: "i32" for n in ("N", "K", "G_D", "stride_gk", "stride_gg", "stride_xk")})
            bm, bn, bk, warps, stages = _config("wgrad", dtype, aligned)
            specs.append(KernelSpec(f"prefix_mlp_wgrad[{tag}]", _mlp_wgrad_kernel, wg_sig,
                                    {"WITH_DB": True, **flags, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                    num_warps=warps, num_stages=stages, expect_wgmma=wg))
    return specs
