"""The tolerance rule of DESIGN.md §4, shared by the tests and the self-check.

A fused result passes when its max error against a float64 reference is at most twice
the error that plain PyTorch math in the same low precision makes against that
reference, plus an epsilon of twice the rounding error of the reference itself in the
low-precision dtype, computed as FlashAttention's tests do (so a comparison never
demands more than the dtype can represent).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Comparison:
    name: str
    err: float        # max |ours - f64|
    baseline: float   # max |plain low-precision math - f64|
    bound: float      # 2 * baseline + eps

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        return f"{self.name}: err {self.err:.3e} <= bound {self.bound:.3e} (baseline {self.baseline:.3e}) {flag}"


def compare(name: str, ours: Tensor, plain: Tensor, ref64: Tensor) -> Comparison:
    """Apply the tolerance rule; infinities must match exactly, NaN always fails."""
    ours, plain, ref64 = ours.detach(), plain.detach(), ref64.detach()
    if ours.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}")
    o, p, r = ours.double(), plain.double(), ref64.double()
    if torch.isnan(o).any():
        return Comparison(name, float("nan"), 0.0, 0.0)
    inf = torch.isinf(r)
    if not torch.equal(torch.isinf(o), inf) or not torch.equal(o[inf], r[inf]):
        return Comparison(name, float("inf"), 0.0, 0.0)
    o, p, r = o[~inf], p[~inf], r[~inf]
    if r.numel() == 0:
        return Comparison(name, 0.0, 0.0, 0.0)
    err = (o - r).abs().max().item()
    baseline = (p - r).abs().nan_to_num(0.0).max().item()
    # FlashAttention's epsilon: twice the rounding error the low-precision dtype makes
    # on the reference itself (at magnitudes of at least 0.3).
    lowp = ours.dtype if ours.dtype != torch.float64 else torch.float32
    r_lp = r.to(lowp)
    eps = 2.0 * ((r_lp + 0.3 - 0.3).double() - r).abs().max().item()
    return Comparison(name, err, baseline, 2.0 * baseline + eps)


def assert_close(name: str, ours: Tensor, plain: Tensor, ref64: Tensor) -> Comparison:
    c = compare(name, ours, plain, ref64)
    assert c.ok, str(c)
    return c
