"""Triton prefix attention: forward kernel, dropout keep-mask kernel and their launchers.

Layouts (any strides, element units, no copies): q [B, Hq, L, D]; k, v [B, Hkv, S, D]; prefix_k,
prefix_v [T, Hkv, P, D] read through prefix_index [B] (no batch stride; clamped to [0, T) in the
kernel); key_padding_mask bool [B, S].  Outputs: out [B, Hq, L, D] (q.dtype; contiguous unless the
caller passes ``out``), lse [B, Hq, L] float32 contiguous (natural log, -inf for a row that sees
nothing, NaN / +inf where a visible score is).  One online softmax runs first over the P prefix
columns, then over the S sequence columns (causal bottom-right aligned: column j visible for row i
iff j <= i + S - L); blocks every row of the tile sees run with no mask arithmetic.
Static loop figures: ``python -m softprompt_kernels.triton.aot`` (``extra["loops"]``, sass_stats).
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.layout import empty_output
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
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b (fp32 accumulator updated in place by the tensor-core dot); IEEE forbids tf32."""
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
def _fwd_loop(acc, l_i, m_i, seen, q, k_ptrs, v_ptrs, s_kn, s_vn, kpm_ptr, s_ms,
              lo, hi, n_valid, col_base, offs_m, offs_n, offs_d, D, vis_off,
              qk_scale, dropout_p, seed, bh,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, NEG_SCALE: tl.constexpr,
              TRACK_SEEN: tl.constexpr):
    """Online-softmax update over the key blocks [lo, hi) of one key source.

    k_ptrs, v_ptrs: [BLOCK_N, BLOCK_D] pointers of the source's key block 0.  MASKED=False: every
    column of every block is visible to every row (prefix blocks, sequence blocks left of the causal
    diagonal): no mask arithmetic, scale folded into one FMA.  MASKED=True: column j (source index)
    is visible for row i iff j < n_valid, (CAUSAL) j <= i + vis_off and (HAS_MASK) kpm[j]; masked
    scores become -inf by tl.where and padded values load as 0, so whatever they hold adds nothing.
    Returns (acc, l_i, m_i, seen); seen (TRACK_SEEN) ORs "row has a visible column"."""
    k_ptrs += lo.to(tl.int64) * s_kn
    v_ptrs += lo.to(tl.int64) * s_vn
    d_ok = offs_d < D
    for start in range(lo, hi, BLOCK_N):
        if MASKED:
            cols = start + offs_n
            col_ok = cols < n_valid
            if EVEN_D:
                k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            kv_ok = col_ok
            if HAS_MASK:
                km = tl.load(kpm_ptr + cols.to(tl.int64) * s_ms, mask=col_ok, other=0)
                kv_ok = col_ok & (km != 0)
            qk = _sdot(q, tl.trans(k), IEEE)
            vis = kv_ok[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + vis_off)
            s = tl.where(vis, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = _exp(s - m_new[:, None], IEEE)
            if TRACK_SEEN:
                seen = seen | (tl.max(vis.to(tl.int32), 1) > 0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            qk = _sdot(q, tl.trans(k), IEEE)
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = _exp(tl.fma(qk, qk_scale, -m_new[:, None]), IEEE)
        alpha = _exp(m_i - m_new, IEEE)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], (col_base + start + offs_n)[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        if MASKED:
            if EVEN_D:
                v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot_acc(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
        k_ptrs += BLOCK_N * s_kn
        v_ptrs += BLOCK_N * s_vn
    return acc, l_i, m_i, seen


@triton.jit
def _attn_fwd(Q, K, V, PK, PV, PIDX, KPM, Out, Lse,
              s_qb, s_qh, s_qm, s_qd,
              s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd,
              s_pkt, s_pkh, s_pkn, s_pkd,
              s_pvt, s_pvh, s_pvn, s_pvd,
              s_mb, s_ms,
              s_ob, s_oh, s_om, s_od,
              Hq, L, S, P, T, D, GROUP,
              scale, dropout_p, seed,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              IEEE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              DROPOUT: tl.constexpr, HAS_PREFIX: tl.constexpr, EVEN_D: tl.constexpr,
              NEG_SCALE: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), B * Hq).  Strides in elements (Triton specialises the multiples of 16
    and the unit ones at launch); batch/head offsets in int64.  Writes Out [B, Hq, L, D] through its
    strides and Lse [B, Hq, L] (contiguous, natural log, -inf for a row that sees nothing).

    Key loop: prefix full blocks (unmasked), prefix tail (column bound), sequence blocks fully
    visible to the whole row tile (unmasked), then the diagonal / ragged / padded sequence blocks
    (masked).  HAS_PREFIX means P > 0; EVEN_D means BLOCK_D == D."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    rows64 = offs_m.to(tl.int64)
    kv_off = offs_n[:, None] * s_kn + offs_d[None, :] * s_kd

    q_ptrs = Q + b64 * s_qb + h64 * s_qh + rows64[:, None] * s_qm + offs_d[None, :] * s_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    qk_scale = scale * _log_domain(IEEE)
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, tl.float32)  # finite: exp(m_i - m_new) is never NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    seen = tl.zeros([BLOCK_M], tl.int1)
    TRACK_SEEN: tl.constexpr = HAS_MASK and not HAS_PREFIX

    if HAS_PREFIX:  # combined column c = j; never masked except the ragged tail
        t = tl.minimum(tl.maximum(tl.load(PIDX + b), 0), T - 1).to(tl.int64)  # in bounds whatever it holds
        pk_ptrs = PK + t * s_pkt + hk64 * s_pkh + (offs_n[:, None] * s_pkn + offs_d[None, :] * s_pkd)
        pv_ptrs = PV + t * s_pvt + hk64 * s_pvh + (offs_n[:, None] * s_pvn + offs_d[None, :] * s_pvd)
        p_full = P // BLOCK_N * BLOCK_N
        acc, l_i, m_i, seen = _fwd_loop(
            acc, l_i, m_i, seen, q, pk_ptrs, pv_ptrs, s_pkn, s_pvn, KPM, 0, P * 0, p_full, P, 0,
            offs_m, offs_n, offs_d, D, 0, qk_scale, dropout_p, seed, bh,
            BLOCK_N, BLOCK_D, IEEE, False, False, False, DROPOUT, EVEN_D, NEG_SCALE, False)
        acc, l_i, m_i, seen = _fwd_loop(
            acc, l_i, m_i, seen, q, pk_ptrs, pv_ptrs, s_pkn, s_pvn, KPM, 0, p_full, P, P, 0,
            offs_m, offs_n, offs_d, D, 0, qk_scale, dropout_p, seed, bh,
            BLOCK_N, BLOCK_D, IEEE, True, False, False, DROPOUT, EVEN_D, NEG_SCALE, False)

    # sequence columns: combined column c = P + j; row i sees j <= i + (S - L) when causal
    vis_off = S - L
    k_ptrs = K + b64 * s_kb + hk64 * s_kh + kv_off
    v_ptrs = V + b64 * s_vb + hk64 * s_vh + (offs_n[:, None] * s_vn + offs_d[None, :] * s_vd)
    s_full = S // BLOCK_N * BLOCK_N
    n_hi = S
    if CAUSAL:
        # columns <= m0 + vis_off are visible to every row of the tile; none beyond the last row's bound
        s_full = tl.minimum(s_full, tl.maximum(m0 + vis_off + 1, 0) // BLOCK_N * BLOCK_N)
        n_hi = tl.minimum(S, tl.maximum(tl.minimum(m0 + BLOCK_M, L) + vis_off, 0))
    if HAS_MASK:
        s_full = 0
    acc, l_i, m_i, seen = _fwd_loop(
        acc, l_i, m_i, seen, q, k_ptrs, v_ptrs, s_kn, s_vn, KPM, s_ms, S * 0, s_full, S, P,
        offs_m, offs_n, offs_d, D, vis_off, qk_scale, dropout_p, seed, bh,
        BLOCK_N, BLOCK_D, IEEE, False, False, False, DROPOUT, EVEN_D, NEG_SCALE, False)
    acc, l_i, m_i, seen = _fwd_loop(
        acc, l_i, m_i, seen, q, k_ptrs, v_ptrs, s_kn, s_vn, KPM + b64 * s_mb, s_ms, s_full, n_hi, S, P,
        offs_m, offs_n, offs_d, D, vis_off, qk_scale, dropout_p, seed, bh,
        BLOCK_N, BLOCK_D, IEEE, True, CAUSAL, HAS_MASK, DROPOUT, EVEN_D, NEG_SCALE, TRACK_SEEN)

    # a row that sees no column (only possible without a prefix) gives 0 and lse = -inf; every other
    # row is normalised as is, so a NaN / inf in a visible score or a NaN scale propagates (NaN row)
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
    else:
        inv_keep = 1.0
    if IEEE:  # fp32: one correctly rounded division, like a plain softmax
        out = (acc / l_i[:, None]) * inv_keep
        lse = m_i + tl.log(l_i)
    else:
        out = acc * (inv_keep / l_i)[:, None]
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    lse = tl.where(m_i == float("inf"), m_i, lse)  # a +inf score: lse +inf (the out row is NaN), as logsumexp
    if not HAS_PREFIX:
        if TRACK_SEEN:
            live = seen
        elif CAUSAL:
            live = (offs_m + vis_off >= 0) & (S > 0)
        else:
            live = (offs_m * 0 + S) > 0
        out = tl.where(live[:, None], out, 0.0)
        lse = tl.where(live, lse, float("-inf"))
    o_ptrs = Out + b64 * s_ob + h64 * s_oh + rows64[:, None] * s_om + offs_d[None, :] * s_od
    if EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
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


# Forward tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (arch, dtype family, BLOCK_D), chosen
# at launch from the device's compute capability.  Every entry is AOT-compiled for its arch (specs)
# and must have zero spills there under triton 3.9 and 3.6.  Launches with a key padding mask,
# dropout (Philox per score) or a ragged head dim (D < BLOCK_D: masked loads) take
# FWD_MASKED_TILES: the large tiles spill there.  "cpu": the interpreter (small, fast).
FWD_TILES = {
    90: {
        ("16", 32): (128, 128, 8, 2),
        ("16", 64): (128, 128, 8, 2),
        ("16", 128): (128, 64, 8, 2),
        ("16", 256): (64, 32, 8, 2),
        ("32", 32): (32, 32, 4, 1),
        ("32", 64): (32, 16, 4, 1),
        ("32", 128): (32, 32, 8, 1),
        ("32", 256): (16, 32, 8, 1),
    },
    80: {
        ("16", 32): (128, 64, 8, 2),
        ("16", 64): (128, 64, 8, 2),
        ("16", 128): (128, 32, 8, 2),
        ("16", 256): (64, 32, 8, 2),
        ("32", 32): (32, 32, 4, 2),
        ("32", 64): (32, 16, 4, 1),
        ("32", 128): (32, 32, 8, 1),
        ("32", 256): (16, 32, 8, 1),
    },
}
FWD_MASKED_TILES = {
    90: {
        ("16", 32): (128, 32, 8, 2),
        ("16", 64): (128, 32, 8, 2),
        ("16", 128): (128, 32, 8, 2),
        ("16", 256): (64, 16, 8, 1),
        ("32", 32): (32, 32, 4, 2),
        ("32", 64): (32, 16, 4, 1),
        ("32", 128): (32, 16, 8, 1),
        ("32", 256): (16, 16, 8, 1),
    },
    80: {
        ("16", 32): (128, 32, 4, 2),
        ("16", 64): (128, 32, 8, 2),
        ("16", 128): (64, 32, 8, 2),
        ("16", 256): (64, 32, 8, 2),
        ("32", 32): (32, 32, 4, 2),
        ("32", 64): (32, 16, 4, 1),
        ("32", 128): (32, 16, 8, 1),
        ("32", 256): (16, 32, 8, 1),
    },
}
CPU_TILES = {"16": (32, 32, 4, 1), "32": (32, 32, 4, 1)}
ARCHS = tuple(FWD_TILES)
# The sm_90 table in its old name (16-bit and fp32 rows), for callers that predate FWD_TILES.
FWD_CONFIGS = FWD_TILES[90]
BLOCK_DS = (32, 64, 128, 256)
MASK_CONFIG = (32, 64, 4, 1)

# test hook: {"fwd": (BM, BN, warps, stages)} replaces the table (interpreter tests only)
CONFIG_OVERRIDE: dict = {}


def family(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def device_arch(device) -> Optional[int]:
    """Key of FWD_TILES for a CUDA device (90 for Hopper/Blackwell datacenter parts, else 80); None
    on a CPU tensor (the interpreter)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(dev)
    return 90 if major in (9, 10) else 80


def fwd_config(dtype: torch.dtype, block_d: int, arch: Optional[int] = 90, masked: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses on ``arch`` (None: interpreter);
    ``masked``: the launch has a key padding mask, dropout or a ragged head dim (``masked_launch``)."""
    if "fwd" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["fwd"]
    if arch is None:
        return CPU_TILES[family(dtype)]
    return (FWD_MASKED_TILES if masked else FWD_TILES)[arch][(family(dtype), block_d)]


def make_signature(fn, types: dict, default: str = "i32", skip=()) -> dict:
    """Signature for every non-constexpr argument of ``fn`` not in ``skip``: ``types`` overrides ``default``."""
    params = inspect.signature(fn.fn).parameters.values()
    return {p.name: types.get(p.name, default) for p in params if p.annotation is not tl.constexpr
            and p.annotation != "tl.constexpr" and p.name not in skip}


# The launchers always pass a unit head-dim stride (align_inputs guarantees it) and Triton turns an
# integer argument equal to 1 into a constexpr at launch, so the shipped specs have them as constexpr 1.
UNIT_STRIDES = ("s_qd", "s_kd", "s_vd", "s_pkd", "s_pvd", "s_dod")
# The forward's own: also the output's head-dim stride and a contiguous key_padding_mask's.
FWD_UNIT_STRIDES = UNIT_STRIDES + ("s_od", "s_ms")


def unit_strides(fn, names=UNIT_STRIDES) -> dict:
    params = inspect.signature(fn.fn).parameters
    return {n: 1 for n in names if n in params}


# AOT variants of the forward's feature constexprs: "plain" (a prefix, nothing optional: the
# unmasked loops the static targets are about) and "causal" (+ causal) on FWD_TILES;
# "full" (causal, padding mask, dropout, ragged D, no prefix so the padded-row tracking is in: the
# most registers) on FWD_MASKED_TILES.
FWD_VARIANTS = {
    "plain": dict(CAUSAL=False, HAS_MASK=False, DROPOUT=False, HAS_PREFIX=True, EVEN_D=True, NEG_SCALE=False),
    "causal": dict(CAUSAL=True, HAS_MASK=False, DROPOUT=False, HAS_PREFIX=True, EVEN_D=True, NEG_SCALE=False),
    "full": dict(CAUSAL=True, HAS_MASK=True, DROPOUT=True, HAS_PREFIX=False, EVEN_D=False, NEG_SCALE=False),
}


def masked_launch(flags: dict) -> bool:
    """A launch takes FWD_MASKED_TILES when it has a padding mask, dropout or a ragged head dim."""
    return bool(flags["HAS_MASK"] or flags["DROPOUT"] or not flags["EVEN_D"])


def fwd_specs(tiles=None, masked_tiles=None) -> list[KernelSpec]:
    """One spec per (dtype, BLOCK_D, arch, variant); archs = the arch whose table ships the tile.
    ``tiles`` / ``masked_tiles`` replace FWD_TILES / FWD_MASKED_TILES (tile searches)."""
    tiles = FWD_TILES if tiles is None else tiles
    masked_tiles = FWD_MASKED_TILES if masked_tiles is None else masked_tiles
    specs = []
    for dtype, tname in _TL_DTYPES.items():
        p = "*" + tname
        sig = make_signature(_attn_fwd, {
            "Q": p, "K": p, "V": p, "PK": p, "PV": p, "PIDX": "*i64", "KPM": "*u8",
            "Out": p, "Lse": "*fp32", "scale": "fp32", "dropout_p": "fp32", "seed": "i64"},
            skip=FWD_UNIT_STRIDES)
        strides = tuple(n for n in sig if n.startswith("s_"))
        for bd in BLOCK_DS:
            for arch in ARCHS:
                for var, flags in FWD_VARIANTS.items():
                    table = masked_tiles if masked_launch(flags) else tiles
                    if arch not in table or (family(dtype), bd) not in table[arch]:
                        continue
                    bm, bn, w, st = table[arch][(family(dtype), bd)]
                    specs.append(KernelSpec(
                        name=f"prefix_attn_fwd[d={bd},{tname},sm{arch},{var}]", fn=_attn_fwd, signature=sig,
                        constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IEEE": dtype == torch.float32,
                                    **flags, **unit_strides(_attn_fwd, FWD_UNIT_STRIDES)},
                        num_warps=w, num_stages=st, expect_wgmma=dtype != torch.float32 and bm >= 64,
                        archs=(arch,), divisible=strides))
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
    """Make every tensor meet the 16-byte alignment contract of the backward kernels.

    Returns (tensors, Dp).  The common case (unit head-dim stride, D and strides multiples of
    16 bytes: any contiguous or [B, L, H, D]-transposed input with D % 8 == 0) passes through
    with no copy.  Otherwise the head dim is zero-padded to Dp (a multiple of vec) in a copy;
    zero columns change no score and the extra output columns are dropped by the caller.
    (The forward takes element strides and needs none of this.)
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


def estrides(t, n: int = 4):
    """First n strides of t in elements (size-1 dims get 0, so they never multiply an index)."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(n))


def fwd_flags(*, D: int, block_d: int, P: int, causal: bool, has_mask: bool, dropout_p: float,
              scale: float) -> dict:
    """The feature constexprs of ``_attn_fwd`` for one launch."""
    return dict(CAUSAL=bool(causal), HAS_MASK=bool(has_mask), DROPOUT=float(dropout_p) > 0.0, HAS_PREFIX=P > 0,
                EVEN_D=block_d == D, NEG_SCALE=float(scale) < 0.0)


def attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                      causal: bool, scale: float, dropout_p: float, seed: int, out=None):
    """Returns (out [B, Hq, L, D] q.dtype, lse [B, Hq, L] float32 contiguous, natural log).

    Any input strides (no copies).  ``out``: an optional [B, Hq, L, D] q.dtype tensor written
    through its strides; by default ``ops.layout.empty_output(q)`` (contiguous when q is, else a
    [B, Hq, L, D] view of [B, L, Hq, D] storage: the layout the op returns, so it is never copied)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if out is None:
        out = empty_output(q)
    if B == 0 or Hq == 0 or L == 0:
        return out, lse
    P = 0 if prefix_k is None else prefix_k.shape[2]
    pidx_dummy, mask_dummy = _dummies(q.device)
    if P == 0:
        pk, pv, pidx, T = q, q, pidx_dummy, 1
        pks = pvs = (0, 0, 0, 1)
    else:
        pk, pv, pidx, T = prefix_k, prefix_v, prefix_index, prefix_k.shape[0]
        pks, pvs = estrides(prefix_k), estrides(prefix_v)
    if key_padding_mask is None:
        kpm, ms = mask_dummy, (0, 1)
    else:
        kpm, ms = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    bd = block_d_for(D)
    flags = fwd_flags(D=D, block_d=bd, P=P, causal=causal, has_mask=key_padding_mask is not None,
                      dropout_p=dropout_p, scale=scale)
    bm, bn, w, st = fwd_config(q.dtype, bd, device_arch(q.device), masked=masked_launch(flags))
    grid = (triton.cdiv(L, bm), B * Hq)
    dropout_p = float(dropout_p)
    _attn_fwd[grid](
        q, k, v, pk, pv, pidx, kpm, out, lse,
        *estrides(q), *estrides(k), *estrides(v), *pks, *pvs, *ms, *estrides(out),
        Hq, L, S, P, T, D, Hq // Hkv,
        float(scale), dropout_p, int(seed),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=q.dtype == torch.float32,
        **flags,
        num_warps=w, num_stages=st)
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


__all__ = ["attention_forward", "block_d_for", "dropout_keep_mask", "fwd_config", "fwd_specs"]
