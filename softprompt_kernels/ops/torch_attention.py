"""PyTorch backend of prefix attention: the CPU path.

Implements the backend contract of ``ops/prefix_attention.py``: forward ->
``out [B, Hq, L, D]`` (q's dtype, the layout of ``ops.layout.empty_output``) and
``lse [B, Hq, L]`` float32; backward from ``out`` / ``lse``.

Fused path (CPU tensors, not float64, ``dropout_p == 0``, finite scale): ATen's flash-attention CPU
kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (what
``F.scaled_dot_product_attention`` runs on a CPU) once per key *part*, the parts merged
by their log-sum-exp:

* non-causal: one call on the concatenated ``[prefix, keys]`` (K/V copied, a ``[B, 1, 1,
  P + S]`` mask row for padding). Causal with a prefix and ``P + S <= _JOINT_CAUSAL_KEYS``
  (mask within ``_DENSE_MASK_ELEMENTS``): also one call on ``[prefix, keys]``, with a dense
  additive ``[B | 1, 1, L, P + S]`` mask, unless ``S == L`` and ``P >= _SPLIT_PREFIX_FRACTION * L``
  (``_joint_causal``). Otherwise (longer, or that many prefix keys): a prefix part and a
  sequence part, with no K/V copy and no dense mask. Measured fwd+bwd against SDPA on the
  concatenated K/V (2-core CPU): at P = 100, L = 256 the split ran 1.03-1.08x, the joint call
  0.98-0.99x; at P = 10, L = 128 the joint call ran ahead (the prefix part's own kernel calls
  pass over q, out and dO for 10 keys).
* additive masks (the dense causal one, the padding row) are cached for the last few argument
  sets (``_cached_mask``: sizes, dtype, device and a copy of the padding mask, compared by
  content), so the layers of one forward build them once, as transformers does.
* prefix part: non-causal, never masked; a shared ``[Hkv, P, D]`` prefix goes in as a
  stride-0 ``expand`` over the batch (no copy: the kernel reads strides), a per-row or
  multi-task prefix as ``prefix_k[prefix_index]`` (``[B, Hkv, P, D]``, small). Folding the
  batch into the query length (q as ``[1, H, B*L, D]``) measured the same speed: not used.
* sequence part: ``is_causal`` (the kernel's causal mask is top-left aligned = bottom-right
  when ``S == L``); causal with ``S > L`` as one dense additive ``[B | 1, 1, L, S]`` mask up
  to ``_DENSE_MASK_ELEMENTS`` elements (decoding, short chunks), beyond that split into the
  first ``S - L`` keys (seen by every query) and the last ``L`` (causal); padding as an
  additive ``[B, 1, 1, S]`` row.
* GQA: the kernel takes ``Hq != Hkv`` itself (dK/dV summed over the group).
* bfloat16 / float16 run the kernel in float32 (4x faster here than its bfloat16 path, and
  no rounding of the parts before the merge); the result is rounded once.
Merge: ``lse = logsumexp(lse_parts)``, ``out = sum_p softmax(lse_parts)_p * o_p`` (weights
in float64 on ``[B, Hq, L]``; out in place in one part's output). A part that a row cannot
see (all its keys padded) has ``lse_p = -inf``; a row that sees nothing outputs zeros.
Backward by the split-KV identity: each part's flash backward with the *merged* out and
lse and the same dO gives that part's dQ share, dK and dV; dQ is their sum; prefix
gradients are summed over rows per task (fixed order: deterministic). ``forward_with_parts``
returns the parts the forward ran on, and ``backward_from_parts`` runs on them: the eager
autograd path (ops/prefix_attention.py) saves them in place of k and v, so the
``[prefix, keys]`` K/V is concatenated once per step, not again in the backward.
NaN/inf: the kernel returns zeros and lse 0 for a row whose scores are all -inf *or
NaN* (a NaN q row; a part whose visible keys are all NaN), where DESIGN §2 wants the NaN
to propagate. So the forward checks its *output*: a non-finite out, or a row the kernel
zeroed although it sees keys, reruns with padded keys/values zeroed, then on the
blockwise path. The backward is fused iff ``out`` is finite (so it follows the forward).

Blockwise path, where the fused kernel cannot express the case: ``dropout_p > 0`` (the
ATen CPU flash kernel refuses dropout), a non-finite scale, NaN/inf met as above, float64,
tensors on another device. Blocks of at most ``_BLOCK_ELEMENTS`` scores (batch rows x query rows
x keys; keys in blocks of ``_KEY_BLOCK`` with an online softmax when ``P + S`` is longer),
so memory is bounded in L and S. Causal: query blocks of ``_CAUSAL_Q`` rows and no key
block past the diagonal, unless that leaves a NaN/inf in out (the reference's 0 * inf at
causally hidden values): then it reruns without skipping. Padded keys/values holding
NaN/inf are zeroed first (out of place): masked keys and values contribute nothing.

Dropout mask: drawn per tile of ``_DROP_Q`` query rows x ``min(P + S, _KEY_BLOCK)``
columns of one batch row and head, from a generator seeded by ``(seed, row, head, tile)``,
as 32-bit integers compared with ``round(p * 2**32)`` (p resolved to 2^-32);
``dropout_keep_mask`` rebuilds it, independent of the block sizes the path chose.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .layout import empty_output, output_strides

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Blockwise path: upper bound on the elements of one [rows, Hq, q-block, key-block] score block,
# and the widest key block (longer P + S: online softmax over key blocks).
_BLOCK_ELEMENTS = 1 << 21
_KEY_BLOCK = 1024
# Fused path, causal with S > L: bottom-right causal as one dense additive mask up to this many
# elements (decoding, short chunks); beyond it the keys are split into an all-visible and a causal part.
_DENSE_MASK_ELEMENTS = 1 << 22
# Fused path, causal with a prefix: up to this many keys (P + S) one call on [prefix, keys] with a dense
# mask (also bounded by _DENSE_MASK_ELEMENTS); longer: a prefix part and a causal sequence part, merged.
_JOINT_CAUSAL_KEYS = 1024
# ... except with S == L and P >= _SPLIT_PREFIX_FRACTION * L: then a prefix part and an is_causal part
# (no concatenation, no dense mask) measured faster; with fewer prefix keys the prefix part's own kernel
# calls (each a full pass over q, out and, backward, dO for a few keys) cost more than the joint call.
_SPLIT_PREFIX_FRACTION = 0.25
# Dropout tiles: _DROP_Q query rows x _tile_width(P + S) columns of one batch row and head; the
# blockwise path's query blocks start on multiples of _DROP_Q, its key blocks on multiples of _KEY_BLOCK.
_DROP_Q = 128
# Causal blockwise path (finite inputs): query rows per block, so key blocks past the diagonal are skipped.
_CAUSAL_Q = 128


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------ dropout mask
def _tile_seed(seed: int, b: int, h: int, ti: int, tj: int) -> int:
    """Seed of dropout tile (row b, head h, query tile ti, column tile tj): a splitmix64-style mix."""
    x = (seed * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9 + h * 0xD6E8FEB86659FD93 + ti * 0x94D049BB133111EB
         + tj * 0x2545F4914F6CDD1D + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def _drop_threshold(dropout_p: float) -> int:
    """Signed 32-bit threshold: keep iff bits >= threshold (drop probability round(p * 2^32) / 2^32)."""
    return int(round(dropout_p * 2**32)) - 2**31


def _tile_width(C: int) -> int:
    """Columns of a dropout tile: all P + S columns up to ``_KEY_BLOCK``, else ``_KEY_BLOCK``."""
    return C if C <= _KEY_BLOCK else _KEY_BLOCK


def _keep_block(seed: int, rows: range, Hq: int, i0: int, i1: int, c0: int, c1: int, C: int, dropout_p: float,
                device) -> Tensor:
    """Bool keep mask ``[len(rows), Hq, i1 - i0, c1 - c0]`` of query rows i0:i1, combined columns c0:c1.

    Columns c0:c1 lie in one column tile. Each (row, head, query tile, column tile) tile of
    ``_DROP_Q x _tile_width(C)`` draws from its own generator straight into its contiguous
    slice of one buffer: no copies, one comparison.
    """
    W = _tile_width(C)
    tj = c0 // W
    assert (c1 - 1) // W == tj, "a block of columns spans two dropout tiles"
    ti0, ti1 = i0 // _DROP_Q, (i1 - 1) // _DROP_Q + 1
    bits = torch.empty(len(rows), Hq, (ti1 - ti0) * _DROP_Q, (W + 1) // 2, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device)
    for r, b in enumerate(rows):
        for h in range(Hq):
            for ti in range(ti0, ti1):
                gen.manual_seed(_tile_seed(seed, b, h, ti, tj))
                a = (ti - ti0) * _DROP_Q
                bits[r, h, a:a + _DROP_Q].random_(-2**63, None, generator=gen)  # two 32-bit draws each
    keep = bits.view(torch.int32)[..., :W] >= _drop_threshold(dropout_p)
    a0 = i0 - ti0 * _DROP_Q
    return keep[:, :, a0:a0 + (i1 - i0), c0 - tj * W:c1 - tj * W]


def dropout_keep_mask(seed: int, B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, device) -> Tensor:
    """Bool keep mask ``[B, Hq, L, P + S]`` exactly as this backend draws it."""
    C = P + S
    out = torch.ones(B, Hq, L, C, dtype=torch.bool, device=device)
    if B * Hq * L * C == 0:
        return out
    W = _tile_width(C)
    for c0 in range(0, C, W):
        c1 = min(C, c0 + W)
        out[..., c0:c1] = _keep_block(seed, range(B), Hq, 0, L, c0, c1, C, dropout_p, device)
    return out


# ------------------------------------------------------------------------ path choice
def _finite(t: Optional[Tensor]) -> bool:
    """No NaN/inf in ``t`` (one reduction; a finite sum that overflows reads as non-finite,
    which only sends the call to the blockwise path)."""
    return t is None or t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32)))


def _zero_padded(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
    """k, v with padded-out positions zeroed (out of place) when any of them is non-finite.

    Finite values at padded positions contribute exactly nothing (probability 0, gradient
    0), so they are left alone; NaN/inf there would poison ``P @ V`` (0 * nan).
    Returns ``(k, v, visible_finite, zeroed)``: ``visible_finite`` is False when a visible
    key or value is non-finite, ``zeroed`` says whether k or v was replaced.
    """
    if key_padding_mask is None:
        return k, v, _finite(k) and _finite(v), False
    real = key_padding_mask[:, None, :]  # [B, 1, S]
    out = []
    ok, zeroed = True, False
    for t in (k, v):
        fin = torch.isfinite(t.sum(-1, dtype=torch.float32))  # [B, Hkv, S]
        if not bool(fin.all()):
            if bool((~fin & real).any()):
                ok = False
            t = t.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
            zeroed = True
        out.append(t)
    return out[0], out[1], ok, zeroed


def _fused_possible(q: Tensor, scale: float, dropout_p: float) -> bool:
    # float64 (a ground-truth / test dtype) keeps the plain-math blockwise path: the float64 kernel
    # is no faster, and equivalence tests in float64 compare against plain float64 math
    return q.device.type == "cpu" and q.dtype != torch.float64 and dropout_p == 0.0 and math.isfinite(scale)


# ------------------------------------------------------------------------ fused path
def _unit_last(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` with a unit-stride last dim (the flash kernel reads the head dim so)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dense_mask_fits(B: int, L: int, cols: int, key_padding_mask: Optional[Tensor]) -> bool:
    """Whether a dense ``[B | 1, 1, L, cols]`` mask stays within ``_DENSE_MASK_ELEMENTS``."""
    return (B if key_padding_mask is not None else 1) * L * cols <= _DENSE_MASK_ELEMENTS


# Additive masks of the last few calls: every layer of a forward builds the same one.  Keyed on the
# sizes, dtype and device, and on the key-padding mask's *content* (a copy is kept and compared, so a
# mask edited in place, or a new one at a freed address, never hits a stale entry).  At most
# _MASK_CACHE_ENTRIES masks and _MASK_CACHE_ELEMENTS elements in all (16 MiB of float32) stay held.
_MASK_CACHE: "dict[tuple, tuple[Optional[Tensor], Tensor]]" = {}
_MASK_CACHE_ENTRIES = 4
_MASK_CACHE_ELEMENTS = 1 << 22


def _cached_mask(kind: str, L: int, S: int, P: int, key_padding_mask: Optional[Tensor], dtype, device, build):
    """``build()``, or the mask an earlier call built from the same arguments (never written to by callers)."""
    key = (kind, L, S, P, dtype, device, None if key_padding_mask is None else tuple(key_padding_mask.shape))
    hit = _MASK_CACHE.get(key)
    if hit is not None and (key_padding_mask is None or torch.equal(hit[0], key_padding_mask)):
        return hit[1]
    mask = build()
    _MASK_CACHE.pop(key, None)
    if mask.numel() <= _MASK_CACHE_ELEMENTS:
        while _MASK_CACHE and (len(_MASK_CACHE) >= _MASK_CACHE_ENTRIES or mask.numel() + sum(
                m.numel() for _, m in _MASK_CACHE.values()) > _MASK_CACHE_ELEMENTS):
            del _MASK_CACHE[next(iter(_MASK_CACHE))]  # oldest first
        _MASK_CACHE[key] = (None if key_padding_mask is None else key_padding_mask.clone(), mask)
    return mask


def _padding_row(S: int, P: int, key_padding_mask: Tensor, dtype, device) -> Tensor:
    """Additive ``[B, 1, 1, P + S]`` row: the P prefix columns visible, padded sequence columns -inf."""
    def build():
        mask = torch.zeros(key_padding_mask.shape[0], 1, 1, P + S, dtype=dtype, device=device)
        mask[..., P:].masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        return mask

    return _cached_mask("row", 1, S, P, key_padding_mask, dtype, device, build)


def _causal_mask(L: int, S: int, P: int, key_padding_mask: Optional[Tensor], dtype, device) -> Tensor:
    """Additive ``[B | 1, 1, L, P + S]`` mask: the first P (prefix) columns visible, sequence
    column j visible iff ``j <= i + S - L`` (bottom-right causal) and not padded; -inf elsewhere."""
    return _cached_mask("causal", L, S, P, key_padding_mask, dtype, device,
                        lambda: _build_causal_mask(L, S, P, key_padding_mask, dtype, device))


def _build_causal_mask(L: int, S: int, P: int, key_padding_mask: Optional[Tensor], dtype, device) -> Tensor:
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    vis = (j <= i + (S - L))[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    mask = torch.zeros(vis.shape[0], 1, L, P + S, dtype=dtype, device=device)
    mask[..., P:].masked_fill_(~vis, float("-inf"))
    return mask


def _joint_causal(B: int, L: int, S: int, P: int, key_padding_mask: Optional[Tensor]) -> bool:
    """Causal with a prefix: one call on ``[prefix, keys]`` with a dense mask (True), or a prefix
    part and a causal sequence part (False); see ``_JOINT_CAUSAL_KEYS``, ``_SPLIT_PREFIX_FRACTION``."""
    if not (P > 0 and P + S <= _JOINT_CAUSAL_KEYS and _dense_mask_fits(B, L, P + S, key_padding_mask)):
        return False
    return S > L or P < _SPLIT_PREFIX_FRACTION * L


def _parts(k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal: bool, L: int, dtype):
    """Key parts ``[(k, v, is_causal, additive mask | None, seen | None, kind)]``.

    ``seen``: bool ``[B, 1, 1 | L]``, whether a query row sees any key of the part (None:
    every row does); ``kind``: "prefix", "joint" (prefix + all keys, non-causal) or the
    slice of sequence keys the part covers.
    """
    B, S = k.shape[0], k.shape[2]
    k, v = _unit_last(k, dtype), _unit_last(v, dtype)
    parts = []
    if prefix_k is not None:
        prefix_k, prefix_v = _unit_last(prefix_k, dtype), _unit_last(prefix_v, dtype)
        T, Hkv, P, D = prefix_k.shape
        if T == 1:
            pk, pv = prefix_k.expand(B, Hkv, P, D), prefix_v.expand(B, Hkv, P, D)
        else:
            pk, pv = prefix_k[prefix_index], prefix_v[prefix_index]
        if not causal:
            # nothing to align: one kernel call on [prefix, keys] (a K/V copy, as SDPA users make,
            # but a [B, 1, 1, P + S] mask row instead of a dense mask, and one lse rounding)
            mask = None if key_padding_mask is None else _padding_row(S, P, key_padding_mask, dtype, k.device)
            parts.append((torch.cat([pk, k], 2), torch.cat([pv, v], 2), False, mask, None, "joint"))
            return parts
        if _joint_causal(B, L, S, P, key_padding_mask):
            # short causal: one call on [prefix, keys] with a dense mask (no merge, one backward call);
            # every row sees the prefix, so no row is dead
            mask = _causal_mask(L, S, P, key_padding_mask, dtype, k.device)
            parts.append((torch.cat([pk, k], 2), torch.cat([pv, v], 2), False, mask, None, "joint"))
            return parts
        parts.append((pk, pv, False, None, None, "prefix"))
    if causal and S > L and _dense_mask_fits(B, L, S, key_padding_mask):
        # bottom-right causal as one additive [B | 1, 1, L, S] mask: one part, one lse rounding
        seen = None if key_padding_mask is None else key_padding_mask.cummax(-1).values[:, None, None, S - L:]
        parts.append((k, v, False, _causal_mask(L, S, 0, key_padding_mask, dtype, k.device), seen, slice(0, S)))
        return parts
    spans = [(0, S - L, False), (S - L, S, True)] if causal and S > L else [(0, S, causal)]
    for lo, hi, is_causal in spans:
        if hi == lo:
            continue
        mask = seen = None
        if key_padding_mask is not None:
            real = key_padding_mask[:, lo:hi]  # [B, n]
            mask = _padding_row(hi - lo, 0, real, dtype, k.device)
            # causal (top-left within the part, n == L here): row i sees keys 0..i of the part
            seen = real.cummax(-1).values[:, None, None, :L] if is_causal else real.any(-1)[:, None, None, None]
        parts.append((k[:, :, lo:hi], v[:, :, lo:hi], is_causal, mask, seen, slice(lo, hi)))
    return parts


def _like_q(q: Tensor, x: Tensor, dtype) -> Tensor:
    """``x`` in ``dtype`` with the strides of ``empty_output(q)`` (the layout the op returns; the
    ATen kernel writes its out in q's layout, so for a contiguous q or a ``[B, L, Hq, D]`` view
    that is ``x`` itself), else a copy."""
    if x.stride() == output_strides(q) and x.dtype == dtype:
        return x
    want = empty_output(q)
    return (want if want.dtype == dtype else torch.empty_like(want, dtype=dtype)).copy_(x)


def _fused_forward(q, parts, scale: float):
    """``(out, lse)``, or None when a NaN/inf was met (then the blockwise path runs)."""
    B, Hq, L, D = q.shape
    q_in, q = q, _unit_last(q, _compute_dtype(q.dtype))
    outs, lses = [], []
    for pk, pv, is_causal, mask, seen, _ in parts:
        o, lse = _FLASH(q, pk, pv, 0.0, is_causal, attn_mask=mask, scale=scale)
        lse = lse.float()
        # The kernel returns out 0, lse 0 for a row whose scores are all -inf *or NaN* (a NaN
        # q row, or a part whose visible keys are all NaN): exact zeros on a row that sees
        # keys send the call to the blockwise path (a legitimate lse of exactly 0 only costs time).
        if seen is None:
            if int(torch.count_nonzero(lse)) < lse.numel():  # one op: every row sees keys of this part
                return None
        else:
            if bool(((lse == 0) & seen.squeeze(2)).any()):
                return None
            lse = lse.masked_fill(~seen.squeeze(2), float("-inf"))  # the kernel gives 0 there
        outs.append(o)
        lses.append(lse)
    if len(parts) == 1:
        # a row that sees nothing: the kernel already wrote zeros
        out = _like_q(q_in, outs[0], q_in.dtype)
        return (out, lses[0].contiguous()) if _finite(out) else None
    # merge in float64 ([B, Hq, L] only; few ops: on a shared CPU every parallel op has a fixed
    # cost): the merged lse is rounded once, the weights softmax(lse_parts) sum to 1
    l64 = torch.stack(lses).double()  # [parts, B, Hq, L]
    lse = torch.logsumexp(l64, 0)
    w = torch.softmax(l64, 0).to(q.dtype)
    if any(p[4] is not None for p in parts):
        w = w.nan_to_num_(0.0)  # a row that sees no part: 0/0, its output stays 0
    # in place in the last part's output (fresh, compute dtype, q's layout when q is dense)
    acc = _like_q(q_in, outs[-1], q.dtype)
    acc.mul_(w[-1].unsqueeze(-1))
    for o, wi in zip(outs[:-1], w[:-1]):
        acc.addcmul_(o, wi.unsqueeze(-1))
    if not _finite(acc):  # NaN/inf reached a row: the blockwise path gives the reference's pattern
        return None
    return acc.to(q_in.dtype), lse.float().contiguous()


def _fused_backward(dout, q, parts, out, lse, scale: float, prefix_k, prefix_index, k_shape):
    cdt = _compute_dtype(q.dtype)
    q_dtype = q.dtype
    q, dout, out = _unit_last(q, cdt), _unit_last(dout, cdt), _unit_last(out, cdt)
    lse_k = lse.masked_fill(torch.isneginf(lse), 0.0) if any(p[4] is not None for p in parts) else lse
    dq = None
    dk_parts, dv_parts = [], []
    dpk = dpv = None
    for pk, pv, is_causal, mask, _, kind in parts:
        gq, gk, gv = _FLASH_BWD(dout, q, pk, pv, out, lse_k, 0.0, is_causal, attn_mask=mask, scale=scale)
        if dq is None:
            dq = gq if gq.dtype == cdt else gq.to(cdt)
        else:
            dq.add_(gq)
        if kind in ("prefix", "joint"):
            T, P = prefix_k.shape[0], prefix_k.shape[2]
            dpk = reduce_prefix_grad(gk[:, :, :P].to(cdt), prefix_index, T)
            dpv = reduce_prefix_grad(gv[:, :, :P].to(cdt), prefix_index, T)
            if kind == "joint":
                dk_parts.append(gk[:, :, P:])
                dv_parts.append(gv[:, :, P:])
        else:
            dk_parts.append(gk)
            dv_parts.append(gv)
    dk = dk_parts[0] if len(dk_parts) == 1 else torch.cat(dk_parts, dim=2)
    dv = dv_parts[0] if len(dv_parts) == 1 else torch.cat(dv_parts, dim=2)
    assert tuple(dk.shape) == tuple(k_shape)
    return dq.to(q_dtype), dk, dv, dpk, dpv


# ------------------------------------------------------------------------ blockwise path
def _blocks(B: int, Hq: int, L: int, C: int, causal_skip: bool):
    """(batch rows per chunk, query rows per block, key columns per block)."""
    kb = max(1, min(C, _KEY_BLOCK))
    per_q = Hq * kb
    qb = L if not causal_skip else min(L, _CAUSAL_Q)
    if qb * per_q > _BLOCK_ELEMENTS:
        qb = min(L, max(_DROP_Q, (_BLOCK_ELEMENTS // per_q) // _DROP_Q * _DROP_Q))
    return max(1, _BLOCK_ELEMENTS // max(qb * per_q, 1)), qb, kb


def _joint_kv(k, v, prefix_k, prefix_v, prefix_index, rows: slice, dtype):
    """K and V of rows ``rows`` with the prefix in front: ``[r, Hkv, P + S, D]`` in ``dtype``."""
    kr, vr = k[rows].to(dtype), v[rows].to(dtype)
    if prefix_k is None:
        return kr, vr
    idx = prefix_index[rows]
    return torch.cat([prefix_k[idx].to(dtype), kr], dim=2), torch.cat([prefix_v[idx].to(dtype), vr], dim=2)


def _visible_block(rows: slice, i0: int, i1: int, c0: int, c1: int, L: int, S: int, P: int, causal: bool,
                   key_padding_mask, device) -> Optional[Tensor]:
    """Bool ``[r | 1, 1, i1 - i0, c1 - c0]`` visibility of combined columns c0:c1, or None if all visible."""
    if c1 <= P or (not causal and key_padding_mask is None):
        return None
    j = torch.arange(c0, c1, device=device) - P  # sequence column (negative: prefix)
    vis = torch.ones(1, 1, i1 - i0, c1 - c0, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(i0, i1, device=device)[:, None]
        vis = (j[None, :] <= i + (S - L))[None, None]
    if key_padding_mask is not None:
        real = key_padding_mask[rows]
        first = max(c0, P)  # first sequence column of the block
        pad = torch.ones(real.shape[0], c1 - c0, dtype=torch.bool, device=device)
        pad[:, first - c0:] = real[:, first - P:c1 - P]
        vis = vis & pad[:, None, None, :]
    return vis | (j < 0)


def _dead_rows(rows: slice, i0: int, i1: int, L: int, S: int, P: int, causal: bool, key_padding_mask):
    """Bool ``[r, 1, i1 - i0]``: query rows that see no column at all (P = 0 only), or None."""
    if P > 0 or key_padding_mask is None:
        return None  # causal alone always leaves key 0 visible (S >= L)
    real = key_padding_mask[rows]
    if causal:
        seen = real.cummax(-1).values[:, i0 + S - L:i1 + S - L]
    else:
        seen = real.any(-1, keepdim=True).expand(-1, i1 - i0)
    dead = ~seen[:, None, :]
    return dead if bool(dead.any()) else None


def _group(x: Tensor, rows: slice, i0: int, i1: int, Hkv: int, dtype) -> Tensor:
    """``[B, Hq, L, D]`` -> rows, queries i0:i1 as ``[r, Hkv, G * n, D]`` in ``dtype``."""
    xr = x[rows, :, i0:i1].to(dtype)
    r, Hq, n, D = xr.shape
    return xr.reshape(r, Hkv, (Hq // Hkv) * n, D)


def _masked_scores(qg, kb, scale, vis, G: int, n: int) -> Tensor:
    """Scaled scores ``[r, Hkv, G * n, c]`` with invisible columns at -inf."""
    s = torch.matmul(qg, kb.transpose(-1, -2)).mul_(scale)
    if vis is not None:
        r, h, _, c = s.shape
        s = s.view(r, h, G, n, c).masked_fill_(~vis[:, :, None], float("-inf")).view(r, h, G * n, c)
    return s


def _rows_fill_(x: Tensor, dead: Optional[Tensor], G: int, n: int, value: float) -> Tensor:
    """In place: the query rows ``dead [r, 1, n]`` of ``x [r, Hkv, G * n, ...]`` set to ``value``."""
    if dead is None:
        return x
    r, h = x.shape[:2]
    tail = x.shape[3:]
    x.view(r, h, G, n, *tail).masked_fill_(dead.view(r, 1, 1, n, *([1] * len(tail))), value)
    return x


def _col_limit(i1: int, L: int, S: int, P: int, C: int, causal: bool, skip: bool) -> int:
    """Combined columns a block of queries ending at i1 can see (all C unless skipping causally)."""
    return min(C, P + i1 + (S - L)) if causal and skip else C


def _blockwise_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *, causal, scale, dropout_p,
                       seed, skip):
    """Blockwise ``(out, lse)``; ``skip``: leave out key blocks past the causal diagonal."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    C, G = P + S, Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    out = empty_output(q)  # the layout the op returns
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    nrows, qb, kb = _blocks(B, Hq, L, C, causal and skip)
    for lo in range(0, B, nrows):
        rows = slice(lo, min(B, lo + nrows))
        rng = range(rows.start, rows.stop)
        r = rows.stop - rows.start
        kj, vj = _joint_kv(k, v, prefix_k, prefix_v, prefix_index, rows, cdt)
        if dropout_p > 0.0:
            vj = vj * (1.0 / (1.0 - dropout_p))  # kept probabilities scaled by 1 / (1 - p), folded into V
        for i0 in range(0, L, qb):
            i1 = min(L, i0 + qb)
            n = i1 - i0
            qg = _group(q, rows, i0, i1, Hkv, cdt)
            dead = _dead_rows(rows, i0, i1, L, S, P, causal, key_padding_mask)
            cmax = _col_limit(i1, L, S, P, C, causal, skip)
            if cmax <= kb:  # one key block: a direct softmax (rounds less than exp(s - lse))
                vis = _visible_block(rows, i0, i1, 0, cmax, L, S, P, causal, key_padding_mask, q.device)
                s = _masked_scores(qg, kj[:, :, :cmax], scale, vis, G, n)
                m = torch.logsumexp(s, dim=-1)
                p = _rows_fill_(torch.softmax(s, dim=-1), dead, G, n, 0.0)
                del s
                if dropout_p > 0.0:
                    p.view(r, Hq, n, cmax).mul_(_keep_block(seed, rng, Hq, i0, i1, 0, cmax, C, dropout_p, q.device))
                o = torch.matmul(p, vj[:, :, :cmax])
            else:  # online softmax over key blocks
                m = torch.full((r, Hkv, G * n), float("-inf"), dtype=cdt, device=q.device)
                l_sum = torch.zeros_like(m)
                o = torch.zeros(r, Hkv, G * n, D, dtype=cdt, device=q.device)
                for c0 in range(0, cmax, kb):
                    c1 = min(cmax, c0 + kb)
                    vis = _visible_block(rows, i0, i1, c0, c1, L, S, P, causal, key_padding_mask, q.device)
                    s = _masked_scores(qg, kj[:, :, c0:c1], scale, vis, G, n)
                    m_new = torch.maximum(m, s.amax(-1))
                    m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # no -inf - -inf
                    alpha = torch.exp(m - m_safe)
                    p = torch.exp(s.sub_(m_safe.unsqueeze(-1)))
                    del s
                    l_sum.mul_(alpha).add_(p.sum(-1))
                    if dropout_p > 0.0:
                        p.view(r, Hq, n, c1 - c0).mul_(_keep_block(seed, rng, Hq, i0, i1, c0, c1, C, dropout_p,
                                                                   q.device))
                    o.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, vj[:, :, c0:c1]))
                    m = m_new
                o.div_(l_sum.unsqueeze(-1))
                m = m + torch.log(l_sum)
                _rows_fill_(o, dead, G, n, 0.0)
            _rows_fill_(m, dead, G, n, float("-inf"))
            out[rows, :, i0:i1] = o.view(r, Hq, n, D)
            lse[rows, :, i0:i1] = m.view(r, Hq, n)
    return out, lse


def _blockwise_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *, causal,
                        scale, dropout_p, seed, skip):
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    C, G = P + S, Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    dq = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, S, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hkv, S, D, dtype=v.dtype, device=v.device)
    dpk_rows = torch.empty(B, Hkv, P, D, dtype=cdt, device=q.device) if P else None
    dpv_rows = torch.empty(B, Hkv, P, D, dtype=cdt, device=q.device) if P else None
    drop_scale = 1.0 / (1.0 - dropout_p)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (also with dropout): [n, D] work instead of [n, P + S],
    # except in low precision, where O was rounded and the probabilities give it more exactly
    delta_from_out = q.dtype in (torch.float32, torch.float64)
    fold = math.isfinite(scale)  # apply the softmax scale to dQ / dK at the end, not to every dS block
    nrows, qb, kb = _blocks(B, Hq, L, C, causal and skip)
    for lo in range(0, B, nrows):
        rows = slice(lo, min(B, lo + nrows))
        rng = range(rows.start, rows.stop)
        r = rows.stop - rows.start
        kj, vj = _joint_kv(k, v, prefix_k, prefix_v, prefix_index, rows, cdt)
        dkj = torch.zeros_like(kj)
        dvj = torch.zeros_like(vj)
        for i0 in range(0, L, qb):
            i1 = min(L, i0 + qb)
            n = i1 - i0
            qg = _group(q, rows, i0, i1, Hkv, cdt)
            dog = _group(dout, rows, i0, i1, Hkv, cdt)
            dead = _dead_rows(rows, i0, i1, L, S, P, causal, key_padding_mask)
            cmax = _col_limit(i1, L, S, P, C, causal, skip)
            single = cmax <= kb
            delta = None
            if delta_from_out or not single:
                delta = (dog * _group(out, rows, i0, i1, Hkv, cdt)).sum(-1, keepdim=True)
            if dropout_p > 0.0:
                dog = dog * drop_scale  # the 1 / (1 - p) of kept probabilities, folded into dO
            if not single:  # lse from the forward
                lse_b = lse[rows, :, i0:i1].to(cdt).reshape(r, Hkv, G * n)
                lse_b = _rows_fill_(lse_b.clone(), dead, G, n, 0.0).unsqueeze(-1)
            dq_b = None
            for c0 in range(0, cmax, kb):
                c1 = min(cmax, c0 + kb)
                vis = _visible_block(rows, i0, i1, c0, c1, L, S, P, causal, key_padding_mask, q.device)
                s = _masked_scores(qg, kj[:, :, c0:c1], scale, vis, G, n)
                if single:  # the whole row is at hand: a direct softmax, as in the forward
                    p = _rows_fill_(torch.softmax(s, dim=-1), dead, G, n, 0.0)
                else:
                    p = torch.exp(s.sub_(lse_b))
                del s
                dp = torch.matmul(dog, vj[:, :, c0:c1].transpose(-1, -2))
                if dropout_p > 0.0:
                    keep = _keep_block(seed, rng, Hq, i0, i1, c0, c1, C, dropout_p, q.device)
                    pk = p.view(keep.shape).mul(keep).view(p.shape)
                    dvj[:, :, c0:c1] += torch.matmul(pk.transpose(-1, -2), dog)
                    del pk
                    dp.view(keep.shape).mul_(keep)
                    del keep
                else:
                    dvj[:, :, c0:c1] += torch.matmul(p.transpose(-1, -2), dog)
                if delta is None:
                    # the softmax-backward row term from the probabilities themselves (as autograd does)
                    delta = (p * dp).sum(-1, keepdim=True)
                ds = p.mul_(dp.sub_(delta))  # reuses p's storage; the softmax scale comes later when finite
                del dp
                if not fold:
                    # 0 * nan: a row that sees nothing keeps zero gradients whatever the scale
                    _rows_fill_(ds.mul_(scale), dead, G, n, 0.0)
                g = torch.matmul(ds, kj[:, :, c0:c1])
                dq_b = g if dq_b is None else dq_b.add_(g)
                dkj[:, :, c0:c1] += torch.matmul(ds.transpose(-1, -2), qg)
                del ds
            if dq_b is None:
                dq_b = qg.new_zeros(qg.shape)
            dq[rows, :, i0:i1] = (dq_b.mul_(scale) if fold else dq_b).view(r, Hq, n, D)
        if fold:
            dkj.mul_(scale)
        dk[rows] = dkj[:, :, P:]
        dv[rows] = dvj[:, :, P:]
        if P:
            dpk_rows[rows] = dkj[:, :, :P]
            dpv_rows[rows] = dvj[:, :, :P]
    if not P:
        return dq, dk, dv, None, None
    return (dq, dk, dv,
            reduce_prefix_grad(dpk_rows, prefix_index, prefix_k.shape[0]).to(prefix_k.dtype),
            reduce_prefix_grad(dpv_rows, prefix_index, prefix_v.shape[0]).to(prefix_v.dtype))


# ------------------------------------------------------------------------ backend contract
def attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                      causal: bool, scale: float, dropout_p: float, seed: int):
    """Backend forward: ``out [B, Hq, L, D]`` (q.dtype, strides of ``empty_output(q)``), ``lse [B, Hq, L]`` float32."""
    out, lse, _ = forward_with_parts(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal=causal,
                                     scale=scale, dropout_p=dropout_p, seed=seed)
    return out, lse


def forward_with_parts(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                       causal: bool, scale: float, dropout_p: float, seed: int):
    """``(out, lse, parts)``: the backend forward, plus the key parts the fused path ran on
    (``backward_from_parts`` reuses them: the ``[prefix, keys]`` K/V is not concatenated
    again), or ``parts = None`` after the blockwise path.

    Fused path first, inputs unchecked (finite inputs give a finite output with no silent
    zero row; anything else is caught on the output); if it meets a NaN/inf: again with
    padded keys/values zeroed, then the blockwise path.
    """
    cdt = _compute_dtype(q.dtype)
    if _fused_possible(q, scale, dropout_p):
        parts = _parts(k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, q.shape[2], cdt)
        res = _fused_forward(q, parts, scale)
        if res is None and key_padding_mask is not None:
            k0, v0, _, zeroed = _zero_padded(k, v, key_padding_mask)
            if zeroed:
                parts = _parts(k0, v0, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, q.shape[2], cdt)
                res = _fused_forward(q, parts, scale)
        if res is not None:
            return res[0], res[1], parts
    k, v, _, _ = _zero_padded(k, v, key_padding_mask)
    # Skipping key blocks past the causal diagonal hides a NaN/inf there from the rows that
    # cannot see it, where the reference (and the fused kernel inside a block) computes 0 * inf:
    # a non-finite output therefore reruns without skipping (the last query row sees every key).
    res = _blockwise_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal=causal,
                             scale=scale, dropout_p=dropout_p, seed=seed, skip=causal)
    if causal and not _finite(res[0]):
        res = _blockwise_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal=causal,
                                 scale=scale, dropout_p=dropout_p, seed=seed, skip=False)
    return res[0], res[1], None


def backward_from_parts(dout, q, parts, out, lse, prefix_k, prefix_v, prefix_index, *, scale: float,
                        k_shape, k_dtype):
    """Fused backward on the parts ``forward_with_parts`` returned: dq, dk, dv as the kernel
    gives them (``[B, L | S, H, D]`` storage, dk / dv possibly views into the joint
    ``[prefix, keys]`` gradient: no copy), prefix gradients ``[T, Hkv, P, D]`` (contiguous)."""
    dq, dk, dv, dpk, dpv = _fused_backward(dout, q, parts, out, lse, scale, prefix_k, prefix_index, k_shape)
    if dpk is not None:
        dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    return dq, dk.to(k_dtype), dv.to(k_dtype), dpk, dpv


def attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *,
                       causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool = True):
    """Backend backward: dq, dk, dv and the prefix gradients reduced per task ``[T, Hkv, P, D]``.

    Fused when the forward could have been (a finite ``out``: the forward's blockwise
    fallback leaves a NaN/inf in out, except for a false alarm on clean inputs).
    """
    out_finite = _finite(out)
    if _fused_possible(q, scale, dropout_p) and out_finite:
        k_in = k
        if key_padding_mask is not None and not (_finite(k) and _finite(v)):
            # padded keys/values holding NaN/inf (the forward zeroed them on a retry): zero them
            # (finite values there give the same numbers as zeros, so they are left alone)
            pad = ~key_padding_mask[:, None, :, None]
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        parts = _parts(k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, q.shape[2],
                       _compute_dtype(q.dtype))
        return backward_from_parts(dout, q, parts, out, lse, prefix_k, prefix_v, prefix_index, scale=scale,
                                   k_shape=k_in.shape, k_dtype=k_in.dtype)
    k, v, _, _ = _zero_padded(k, v, key_padding_mask)
    # the forward skipped causally invisible key blocks iff its output came out finite
    return _blockwise_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                               causal=causal, scale=scale, dropout_p=dropout_p, seed=seed,
                               skip=causal and out_finite)


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
