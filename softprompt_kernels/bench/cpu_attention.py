"""Experimental CPU backend of prefix attention (bench only; candidate for ops/torch_attention.py).

Same contract as ``softprompt_kernels/ops/torch_attention.py`` (forward ->
``(out, lse)``, backward from ``out``/``lse``), built so that the sequence part runs in
PyTorch's fused CPU flash-attention kernels and the prefix is never concatenated:

* sequence part: ``aten._scaled_dot_product_flash_attention_for_cpu(q, k, v,
  is_causal, attn_mask)`` -> ``(o_seq, lse_seq)``; the padding mask goes in as an
  additive ``[B, 1, 1, S]`` row (broadcast, never a dense ``[B, 1, L, P+S]`` mask);
* prefix part: the same fused kernel on the prefix, broadcast over the batch as a
  stride-0 ``expand`` (no copy; GQA: the small ``[Hq, P, D]`` head repeat only);
* merge by log-sum-exp: ``lse = logaddexp(lse_seq, lse_pre)``,
  ``out = e^(lse_seq-lse) o_seq + e^(lse_pre-lse) o_pre``.
Backward: the flash backward of the sequence part is called with the MERGED ``out``
and ``lse`` (it then recomputes the merged probabilities of its columns and the
softmax term ``rowsum(dO*O)`` of the whole row, so dQ/dK/dV are exact); the same
for the prefix part, whose per-row prefix gradients are then summed per task.
Falls back to the library's PyTorch backend for dropout, float64 and causal with
``S != L`` (the fused kernel's causal mask is top-left aligned).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import torch_attention as _lib

dropout_keep_mask = _lib.dropout_keep_mask


def _fast_ok(q: Tensor, k: Tensor, causal: bool, dropout_p: float) -> bool:
    return dropout_p == 0.0 and q.dtype != torch.float64 and (not causal or k.shape[2] == q.shape[2])


def _kv_for_heads(k: Tensor, Hq: int) -> Tensor:
    G = Hq // k.shape[1]
    return k if G == 1 else k.repeat_interleave(G, dim=1)


def _additive_mask(key_padding_mask, dtype):
    if key_padding_mask is None:
        return None
    B, S = key_padding_mask.shape
    m = torch.zeros(B, 1, 1, S, dtype=dtype, device=key_padding_mask.device)
    return m.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))


def _seq_seen(key_padding_mask, B: int, L: int, S: int, causal: bool, device) -> Tensor:
    """Bool [B|1, 1, L]: query row sees at least one sequence key (the fused kernel
    returns lse 0, not -inf, for a row that sees none)."""
    if key_padding_mask is None:
        return torch.ones(1, 1, L, dtype=torch.bool, device=device)
    if not causal:
        return key_padding_mask.any(-1)[:, None, None].expand(B, 1, L)
    seen = key_padding_mask.cummax(-1).values  # seen[b, j]: some real key at or before j
    return seen[:, None, S - L:]


def _prefix_rows(prefix, prefix_index, B: int, Hq: int) -> Tensor:
    """[T, Hkv, P, D] -> [B, Hq, P, D] (shared: stride-0 batch expand, no copy)."""
    T, Hkv, P, D = prefix.shape
    G = Hq // Hkv
    if G > 1:
        prefix = prefix[:, :, None].expand(T, Hkv, G, P, D).reshape(T, Hq, P, D)
    if T == 1:
        return prefix.expand(B, Hq, P, D)
    return prefix[prefix_index]


def _flash(q, k, v, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                      scale=scale)


def _flash_bwd(dout, q, k, v, out, lse, causal, mask, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, *,
                      causal: bool, scale: float, dropout_p: float, seed: int):
    if not _fast_ok(q, k, causal, dropout_p):
        return _lib.attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                      causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    B, Hq, L, _ = q.shape
    o_seq, lse_seq = _flash(q, _kv_for_heads(k, Hq), _kv_for_heads(v, Hq), causal,
                            _additive_mask(key_padding_mask, q.dtype), scale)
    seen = _seq_seen(key_padding_mask, B, L, k.shape[2], causal, q.device)
    lse_seq = lse_seq.float().masked_fill(~seen, float("-inf"))  # [B, Hq, L]
    if prefix_k is None:
        out = torch.where(seen[..., None], o_seq, torch.zeros((), dtype=q.dtype)).contiguous()
        return out, lse_seq.contiguous()
    o_pre, lse_pre = _flash(q, _prefix_rows(prefix_k, prefix_index, B, Hq), _prefix_rows(prefix_v, prefix_index, B, Hq),
                            False, None, scale)
    lse_pre = lse_pre.float()
    lse = torch.logaddexp(lse_seq, lse_pre)
    w_seq = torch.exp(lse_seq - lse)[..., None]  # 0 where the row sees no sequence key
    w_pre = torch.exp(lse_pre - lse)[..., None]
    out = o_seq.float().mul_(w_seq).add_(o_pre.float().mul_(w_pre))
    return out.to(q.dtype).contiguous(), lse.contiguous()


def attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, *,
                       causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool = True):
    if not _fast_ok(q, k, causal, dropout_p):
        return _lib.attention_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                                       causal=causal, scale=scale, dropout_p=dropout_p, seed=seed,
                                       deterministic=deterministic)
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    seen = torch.isfinite(lse)
    lse_safe = torch.where(seen, lse, torch.zeros((), dtype=lse.dtype))  # rows that see nothing get dout 0
    dout_m = torch.where(seen[..., None], dout, torch.zeros((), dtype=dout.dtype)).contiguous()
    out = out.contiguous()
    dq, dk, dv = _flash_bwd(dout_m, q, _kv_for_heads(k, Hq), _kv_for_heads(v, Hq), out, lse_safe, causal,
                            _additive_mask(key_padding_mask, q.dtype), scale)
    if G > 1:
        dk = dk.view(B, Hkv, G, S, D).sum(2)
        dv = dv.view(B, Hkv, G, S, D).sum(2)
    if prefix_k is None:
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
    dq_pre, dpk, dpv = _flash_bwd(dout_m, q, _prefix_rows(prefix_k, prefix_index, B, Hq),
                                  _prefix_rows(prefix_v, prefix_index, B, Hq), out, lse_safe, False, None, scale)
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    dpk = dpk.float().view(B, Hkv, G, P, D).sum(2)  # per row, summed over the kv group
    dpv = dpv.float().view(B, Hkv, G, P, D).sum(2)
    if T == 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    else:
        dpk = _lib.reduce_prefix_grad(dpk, prefix_index, T)
        dpv = _lib.reduce_prefix_grad(dpv, prefix_index, T)
    dq = dq.add_(dq_pre)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
