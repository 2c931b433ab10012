"""The tolerance rule of DESIGN.md §4, shared by the tests and the self-check.

A fused result passes when its max error against a float64 reference is at most twice
the error that PyTorch's own attention in the same low precision makes against that
reference: the larger of plain PyTorch math and ``F.scaled_dot_product_attention`` on the
concatenated K/V (``sdpa_concat_baseline``; callers pass both to ``compare``), plus an epsilon of twice the rounding error of the reference itself in the
low-precision dtype, computed as FlashAttention's tests do (so a comparison never
demands more than the dtype can represent).

Absolute floor where the reference is exactly zero.  The relative part of the rule
gives no room at an element whose float64 reference is exactly 0 (e.g. a gradient
that cancels exactly, or a tensor that is zero everywhere): the rounding noise of any
low-precision sum that lands there would fail, and when the plain baseline happens to
be exact the bound is 0.  At such elements the bound is therefore at least

    floor = ZERO_FLOOR_ULPS * finfo(low-precision dtype).eps * scale

with ``ZERO_FLOOR_ULPS = 8`` and ``scale`` the magnitude of the inputs the element is
computed from (callers pass it, e.g. ``max|v|`` for an attention output or
``max|dout| * max|k|`` for a gradient); by default ``scale`` is ``max|ref|`` over the
tensor, or 1 when the reference is zero everywhere (unit-scale test inputs).  For
float32 and unit inputs the floor is ~9.5e-7: a 6e-7 error at an exact zero passes,
a 1e-3 one fails.  Elements with a nonzero reference keep the plain rule, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


ZERO_FLOOR_ULPS = 8.0


@dataclass
class Comparison:
    """``err`` / ``bound``: error and bound at the element with the largest error-to-bound
    ratio (so ``err / bound`` is the worst ratio and ``ok`` means every element passes);
    ``baseline`` = max |plain - f64|, ``floor`` = the absolute floor used where f64 == 0."""
    name: str
    err: float        # |ours - f64| at the worst element
    baseline: float   # max |PyTorch's own low-precision result - f64| (largest over the baselines given)
    bound: float      # 2 * baseline + eps there (at least ``floor`` where f64 == 0)
    floor: float = 0.0
    max_err: float = 0.0  # max |ours - f64| over all elements

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        return (f"{self.name}: err {self.err:.3e} <= bound {self.bound:.3e} (baseline {self.baseline:.3e}, "
                f"zero-reference floor {self.floor:.3e}, max err {self.max_err:.3e}) {flag}")


def compare(name: str, ours: Tensor, plain: Union[Tensor, Sequence[Tensor]], ref64: Tensor, *,
            scale: float | None = None) -> Comparison:
    """Apply the tolerance rule; infinities must match exactly, NaN always fails.

    ``plain``: PyTorch's own low-precision result, or several (plain math and SDPA on the
    concatenated K/V): the baseline is the largest of their errors (NaN elements of a
    baseline, e.g. SDPA on a fully masked row, are ignored).
    ``scale``: magnitude of the inputs behind ``ref64`` for the zero-reference floor
    (module docstring); default ``max|ref64|``, or 1 when it is zero everywhere.
    """
    plains = [plain] if isinstance(plain, Tensor) else list(plain)
    ours, ref64 = ours.detach(), ref64.detach()
    if ours.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    o, r = ours.double(), ref64.double()
    if torch.isnan(o).any():
        return Comparison(name, float("nan"), 0.0, 0.0)
    inf = torch.isinf(r)
    if not torch.equal(torch.isinf(o), inf) or not torch.equal(o[inf], r[inf]):
        return Comparison(name, float("inf"), 0.0, 0.0)
    o, r = o[~inf], r[~inf]
    if r.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0)
    e = (o - r).abs()
    baseline = max((p.detach().double()[~inf] - r).abs().nan_to_num(0.0).max().item() for p in plains)
    # FlashAttention's epsilon: twice the rounding error the low-precision dtype makes
    # on the reference itself (at magnitudes of at least 0.3).
    lowp = ours.dtype if ours.dtype != torch.float64 else torch.float32
    r_lp = r.to(lowp)
    eps = 2.0 * ((r_lp + 0.3 - 0.3).double() - r).abs().max().item()
    bound = 2.0 * baseline + eps
    if scale is None:
        top = r.abs().max().item()
        scale = top if top > 0 else 1.0
    floor = ZERO_FLOOR_ULPS * torch.finfo(lowp).eps * float(scale)
    per_elem = torch.full_like(r, bound).masked_fill_(r == 0, max(bound, floor))  # float64
    ratio = torch.where(per_elem > 0, e / per_elem.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(e > 0, torch.full_like(e, float("inf")), torch.zeros_like(e)))
    worst = int(ratio.argmax())
    return Comparison(name, e[worst].item(), baseline, per_elem[worst].item(), floor, e.max().item())


def assert_close(name: str, ours: Tensor, plain: Union[Tensor, Sequence[Tensor]], ref64: Tensor, *,
                 scale: float | None = None) -> Comparison:
    c = compare(name, ours, plain, ref64, scale=scale)
    assert c.ok, str(c)
    return c


def sdpa_concat_baseline(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
                         prefix_v: Optional[Tensor] = None, prefix_index: Optional[Tensor] = None,
                         key_padding_mask: Optional[Tensor] = None, *, causal: bool = False,
                         scale: Optional[float] = None) -> Tensor:
    """What users run today: ``F.scaled_dot_product_attention`` on the concatenated K/V.

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]``; prefix ``[T, Hkv, P, D]`` + ``prefix_index [B]``
    (or None); bool visibility mask ``[B, 1, L, P + S]`` from the reference (prefix always
    visible, bottom-right causal, padding) and K/V heads repeated for GQA, as transformers'
    SDPA path does under PEFT's mask. Differentiable; returns ``out [B, Hq, L, D]``
    (SDPA may give NaN on a row that sees nothing: ``compare`` ignores NaN baseline elements).
    """
    from .reference.attention import visibility_mask

    B, Hq, L, D = q.shape
    S = k.shape[2]
    P = 0
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        idx = torch.zeros(B, dtype=torch.long, device=q.device) if prefix_index is None else prefix_index.long()
        k = torch.cat([prefix_k[idx], k], dim=2)
        v = torch.cat([prefix_v[idx], v], dim=2)
        P = prefix_k.shape[-2]
    mask = visibility_mask(B, L, S, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    G = Hq // k.shape[1]
    if G > 1:  # transformers' repeat_kv: with a mask it does not pass enable_gqa to SDPA
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
