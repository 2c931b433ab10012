"""Test cases and checks shared by the CUDA backend's GPU tests and its host emulation tests.

A case builds q/k/v/prefix/mask with odd sizes and strides; ``check_attention`` runs a
forward/backward pair and applies DESIGN.md's tolerance rule (``softprompt_kernels.testing``)
to out, lse and every gradient against the float64 reference, using the reference in the
same low precision as the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..reference import prefix_attention_reference
from ..testing import Comparison, compare


@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    causal: bool
    mask: bool
    form: str = "shared"     # "none" | "shared" (T=1) | "per_row" (T=B) | "multi" (T=3, one task unused)
    layout: str = "bhld"     # "bhld" contiguous, or "blhd" ([B, L, H, D] transposed: non-contiguous)
    empty_row: bool = False  # key_padding_mask hides every key of row 1 (P must be 0)

    def __str__(self) -> str:
        return (f"B{self.B}_H{self.Hq}x{self.Hkv}_L{self.L}_S{self.S}_P{self.P}_D{self.D}"
                f"{'_causal' if self.causal else ''}{'_mask' if self.mask else ''}_{self.form}_{self.layout}"
                f"{'_emptyrow' if self.empty_row else ''}")


CASES = [
    Case(2, 4, 2, 37, 37, 5, 64, causal=True, mask=False),
    Case(3, 6, 2, 19, 45, 11, 80, causal=True, mask=True, form="multi", layout="blhd"),
    Case(2, 2, 2, 50, 50, 0, 96, causal=False, mask=True, form="none", empty_row=True),
    Case(2, 3, 1, 1, 70, 3, 112, causal=True, mask=True, form="per_row"),
    Case(2, 4, 4, 33, 33, 40, 256, causal=True, mask=False, layout="blhd"),
    Case(2, 2, 1, 17, 17, 7, 32, causal=False, mask=False, form="multi"),
    Case(1, 2, 2, 70, 70, 65, 128, causal=True, mask=True, form="shared"),
]


def _rand(shape, layout: str, dtype, device, gen) -> torch.Tensor:
    """Random tensor of logical shape [X, H, N, D]; "blhd" stores it as [X, N, H, D]."""
    if layout == "blhd":
        X, H, N, D = shape
        return torch.randn((X, N, H, D), generator=gen, device="cpu").to(device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c = case
    q = _rand((c.B, c.Hq, c.L, c.D), c.layout, dtype, device, gen)
    k = _rand((c.B, c.Hkv, c.S, c.D), c.layout, dtype, device, gen)
    v = _rand((c.B, c.Hkv, c.S, c.D), c.layout, dtype, device, gen)
    dout = torch.randn((c.B, c.Hq, c.L, c.D), generator=gen).to(device=device, dtype=dtype)
    pk = pv = idx = None
    if c.form != "none":
        T = {"shared": 1, "per_row": c.B, "multi": 3}[c.form]
        pk = _rand((T, c.Hkv, c.P, c.D), c.layout, dtype, device, gen)
        pv = _rand((T, c.Hkv, c.P, c.D), c.layout, dtype, device, gen)
        if c.form == "shared":
            idx = torch.zeros(c.B, dtype=torch.int64)
        elif c.form == "per_row":
            idx = torch.arange(c.B, dtype=torch.int64)
        else:  # task 1 is never used: its gradient must come back as zeros
            idx = torch.tensor([0, 2] * c.B, dtype=torch.int64)[: c.B]
        idx = idx.to(device)
    kpm = None
    if c.mask:
        kpm = torch.rand((c.B, c.S), generator=gen) > 0.3
        kpm[:, -1] = True  # the causal diagonal of the last row stays visible
        if c.empty_row:
            kpm[1 % c.B] = False
        kpm = kpm.to(device)
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, idx=idx, kpm=kpm, dout=dout)


def _reference(inp: dict, case: Case, scale: float, dtype, dropout_p: float = 0.0, keep=None) -> tuple:
    """out, lse and grads (dq, dk, dv, dpk, dpv) of the reference computed in ``dtype``."""
    names = ["q", "k", "v"] + (["pk", "pv"] if inp["pk"] is not None else [])
    leaves = {n: inp[n].detach().to(dtype).requires_grad_(True) for n in names}
    out, lse = prefix_attention_reference(
        leaves["q"], leaves["k"], leaves["v"], leaves.get("pk"), leaves.get("pv"), inp["idx"], inp["kpm"],
        causal=case.causal, scale=scale, dropout_p=dropout_p, dropout_mask=keep,
    )
    grads = torch.autograd.grad(out, list(leaves.values()), inp["dout"].to(dtype), allow_unused=True)
    grads = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)]
    return out.detach(), lse.detach(), grads


FwdFn = Callable[..., tuple]
BwdFn = Callable[..., tuple]


def check_attention(fwd: FwdFn, bwd: BwdFn, case: Case, dtype: torch.dtype, device, *,
                    deterministic: bool = True, seed: int = 0, dropout_p: float = 0.0,
                    keep_mask: Callable | None = None, poison_padded: bool = False) -> list[Comparison]:
    """Run ``fwd(q, k, v, pk, pv, idx, kpm, causal, scale, dropout_p, dropout_seed) -> (out, lse)`` and
    ``bwd(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal, scale, dropout_p, dropout_seed, deterministic)
    -> 5 grads`` and compare everything with the tolerance rule.  With dropout, ``keep_mask(seed, B, Hq, L,
    P, S, dropout_p, device)`` must give the backend's keep mask; the reference applies it.
    ``poison_padded``: the backend gets k / v holding NaN / inf at padded-out keys (what an
    uninitialised buffer may hold), the reference the clean inputs: masked keys and values must
    contribute nothing, forward or backward (DESIGN §2), so every result equals the clean one.
    Returns the comparisons (all checked)."""
    inp = make_inputs(case, dtype, device, seed)
    k_in, v_in = inp["k"], inp["v"]
    if poison_padded:
        assert inp["kpm"] is not None, "poison_padded needs a case with a key padding mask"
        pad = ~inp["kpm"][:, None, :, None]
        k_in = inp["k"].clone().masked_fill_(pad, float("nan"))  # clone keeps the case's layout
        v_in = inp["v"].clone().masked_fill_(pad, float("inf"))
        v_in[..., 0::2].masked_fill_(pad.expand_as(v_in)[..., 0::2], float("nan"))
    scale = case.D ** -0.5
    dseed = 1000 + seed
    keep = None
    if dropout_p > 0.0:
        keep = keep_mask(dseed, case.B, case.Hq, case.L, case.P, case.S, dropout_p, device)
    out, lse = fwd(inp["q"], k_in, v_in, inp["pk"], inp["pv"], inp["idx"], inp["kpm"], case.causal, scale,
                   dropout_p, dseed)
    grads = bwd(inp["dout"], inp["q"], k_in, v_in, inp["pk"], inp["pv"], inp["idx"], inp["kpm"], out, lse,
                case.causal, scale, dropout_p, dseed, deterministic)
    out64, lse64, g64 = _reference(inp, case, scale, torch.float64, dropout_p, keep)
    outlp, lselp, glp = _reference(inp, case, scale, dtype, dropout_p, keep)
    assert out.dtype == dtype and out.shape == out64.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    comps = [compare("out", out, outlp, out64), compare("lse", lse, lselp.float(), lse64)]
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, g, gl, gr in zip(names, grads, glp, g64):
        assert g is not None, f"{name} missing"
        assert g.dtype == dtype, f"{name} dtype {g.dtype}"
        comps.append(compare(name, g, gl, gr))
    if inp["pk"] is None:
        assert grads[3] is None and grads[4] is None
    if case.empty_row:  # rows that see nothing: zero output, -inf lse, zero dq
        r = 1 % case.B
        assert torch.all(out[r] == 0) and torch.all(torch.isneginf(lse[r])) and torch.all(grads[0][r] == 0)
    if case.form == "multi" and case.B >= 1:  # unused task gets exactly zero gradient
        assert torch.all(grads[3][1] == 0) and torch.all(grads[4][1] == 0)
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{case} {dtype}: " + "; ".join(bad)
    return comps


def emulation_sources(build_dir) -> list[str]:
    """One-line C++ wrappers (``#include`` of each csrc .cu file) in ``build_dir``: the sources of a
    host-emulation build (compiled as C++ with ``-DSPK_EMULATION``)."""
    from ._build import cuda_sources

    wrappers = []
    for src in cuda_sources():
        w = Path(build_dir) / f"emu_{src.stem}.cpp"
        w.write_text(f'#include "{src}"\n')
        wrappers.append(str(w))
    return wrappers
