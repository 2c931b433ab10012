"""Hypothesis strategies and input builders for the fuzz suite.

A drawn case is a plain frozen dataclass of integers / strings / floats (so hypothesis
shrinks it and prints it readably); ``build_*`` turns it into tensors from its seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from hypothesis import settings
from hypothesis import strategies as st

# Per CI run, sized for the < 60 s budget of the whole fuzz dir on 2 cores (an interpreter
# example with backward costs ~2 s, a torch one ~0.1 s); ``long`` runs 20x these.
TORCH_EXAMPLES = 150  # torch-backend attention examples (+ 60 float32-gradient, + 40 non-finite)
TRITON_EXAMPLES = 8  # Triton-interpreter attention examples (forward strict + gradients)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def examples(ci: int) -> int:
    """Examples for one test: ``ci`` in the ``ci`` profile, 20x that in ``long``."""
    return ci * 20 if settings._current_profile == "long" else ci


# ------------------------------------------------------------------ attention
LAYOUTS = ("contig", "blhd", "bcast", "dstride")  # see _layout


@dataclass(frozen=True)
class AttnCase:
    B: int
    Hkv: int
    G: int
    L: int
    S: int
    P: int
    D: int
    form: str          # none | shared | row | task
    T: int
    index: str         # int64 | int32 | strided
    causal: bool
    mask: str          # none | holes | dead
    q_layout: str
    kv_layout: str
    prefix_layout: str
    magnitude: float
    scale: Optional[float]
    dtype: str
    seed: int

    @property
    def Hq(self) -> int:
        return self.Hkv * self.G

    def repro(self, backend: str) -> str:
        return (f"cd tests && python -c \"from fuzz.strategies import AttnCase, check_attention; "
                f"check_attention(AttnCase(**{asdict(self)!r}), backend={backend!r})\"")


@st.composite
def attention_cases(draw, *, small: bool = False, dtypes=("float32", "float16", "bfloat16")):
    """Shapes incl. ragged sizes, GQA ratios, all prefix forms, layouts, masks, magnitudes."""
    B = draw(st.integers(1, 2 if small else 3))
    Hkv = draw(st.integers(1, 2 if small else 3))
    G = draw(st.sampled_from([1, 2, 4] if small else [1, 2, 3, 4]))
    L = draw(st.integers(1, 12 if small else 17))
    S = L + draw(st.sampled_from([0, 0, 1, 5, 13]))
    P = draw(st.sampled_from([0, 1, 3, 7, 17] if small else [0, 1, 2, 5, 17, 33]))
    D = draw(st.sampled_from([16, 24, 40, 80] if small else [1, 7, 16, 33, 80, 96, 112]))
    form = "none" if P == 0 else draw(st.sampled_from(["none", "shared", "row", "task"]))
    T = draw(st.integers(1, 3)) if form == "task" else 1
    index = draw(st.sampled_from(["int64", "int32", "strided"])) if form == "task" else "int64"
    mask = draw(st.sampled_from(["none", "holes", "dead"]))
    dtype = draw(st.sampled_from(list(dtypes)))
    big = 4.0 if dtype == "float16" else 6.0
    return AttnCase(
        B=B, Hkv=Hkv, G=G, L=L, S=S, P=P, D=D, form=form, T=T, index=index,
        causal=draw(st.booleans()), mask=mask,
        q_layout=draw(st.sampled_from(LAYOUTS)), kv_layout=draw(st.sampled_from(LAYOUTS)),
        prefix_layout=draw(st.sampled_from(["contig", "bcast", "transposed"])),
        magnitude=draw(st.sampled_from([1.0, 1.0, 1e-3, big])),
        scale=draw(st.sampled_from([None, None, 0.05, 1.0])),
        dtype=dtype, seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layout(shape, layout: str, g: torch.Generator, magnitude: float, dt) -> torch.Tensor:
    """A ``dt`` tensor of ``shape`` [B, H, N, D] with the given memory layout (cast before viewing)."""
    B, H, N, D = shape
    r = lambda *s: (torch.randn(*s, generator=g) * magnitude).to(dt)  # noqa: E731
    if layout == "blhd":  # [B, N, H, D] storage seen as [B, H, N, D]
        return r(B, N, H, D).transpose(1, 2)
    if layout == "bcast":  # stride 0 over the batch (or the heads when B == 1)
        return r(1, H, N, D).expand(B, H, N, D) if B > 1 else r(B, 1, N, D).expand(B, H, N, D)
    if layout == "dstride":  # last dim not unit-stride
        return r(B, H, N, 2 * D)[..., ::2]
    return r(B, H, N, D)


def _prefix_layout(shape, layout: str, g: torch.Generator, magnitude: float, dt) -> torch.Tensor:
    r = lambda *s: (torch.randn(*s, generator=g) * magnitude).to(dt)  # noqa: E731
    if layout == "bcast":  # stride 0 over the leading dim
        return r(1, *shape[1:]).expand(*shape)
    if layout == "transposed":  # [..., D, P] storage seen as [..., P, D]
        return r(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    return r(*shape)


def build_attention_inputs(c: AttnCase) -> dict:
    """Tensors of case ``c`` in its dtype and layouts (not requiring grad)."""
    g = torch.Generator().manual_seed(c.seed)
    dt = DTYPES[c.dtype]
    q = _layout((c.B, c.Hq, c.L, c.D), c.q_layout, g, c.magnitude, dt)
    k = _layout((c.B, c.Hkv, c.S, c.D), c.kv_layout, g, c.magnitude, dt)
    v = _layout((c.B, c.Hkv, c.S, c.D), c.kv_layout, g, 1.0, dt)
    pk = pv = idx = norm_idx = None
    if c.form != "none":
        lead = {"shared": (), "row": (c.B,), "task": (c.T,)}[c.form]
        shape = (*lead, c.Hkv, c.P, c.D)
        pk = _prefix_layout(shape, c.prefix_layout, g, c.magnitude, dt)
        pv = _prefix_layout(shape, c.prefix_layout, g, 1.0, dt)
        if c.form == "task":
            vals = torch.randint(0, c.T, (c.B,), generator=g)
            norm_idx = idx = vals
            if c.index == "int32":
                idx = vals.to(torch.int32)
            elif c.index == "strided":  # table[:, 0], with out-of-range neighbours
                idx = torch.stack([vals, torch.full_like(vals, c.T + 5)], 1)[:, 0]
        elif c.form == "shared":
            norm_idx = torch.zeros(c.B, dtype=torch.long)
        else:
            norm_idx = torch.arange(c.B)
    mask = None
    if c.mask != "none":
        mask = torch.rand(c.B, c.S, generator=g) > 0.3
        if c.mask == "dead":
            mask[int(torch.randint(0, c.B, (1,), generator=g))] = False  # a row with no real key
    dout = torch.randn(c.B, c.Hq, c.L, c.D, generator=g).to(dt)
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, idx=idx, norm_idx=norm_idx, mask=mask, dout=dout)


def run_reference(c: AttnCase, x: dict, cast):
    """(out, lse, *grads) of the reference in dtype ``cast`` (prefix normalised to [T, ...])."""
    from softprompt_kernels.reference import prefix_attention_reference

    names = [n for n in ("q", "k", "v", "pk", "pv") if x[n] is not None]
    ls = [x[n].detach().to(cast).requires_grad_() for n in names]
    q, k, v = ls[:3]
    pk = pv = None
    if x["pk"] is not None:
        pk, pv = ls[3], ls[4]
        if c.form == "shared":
            pk, pv = pk[None], pv[None]
    o, lse = prefix_attention_reference(q, k, v, pk, pv, x["norm_idx"], x["mask"], causal=c.causal, scale=c.scale)
    grads = torch.autograd.grad(o, ls, x["dout"].to(cast))
    return [o, lse, *grads]


def run_sdpa(c: AttnCase, x: dict, cast):
    """(out, None, *grads) of ``F.scaled_dot_product_attention`` on the concatenated K/V in ``cast``:
    the second baseline of the DESIGN §4 rule (no lse)."""
    from softprompt_kernels.testing import sdpa_concat_baseline

    names = [n for n in ("q", "k", "v", "pk", "pv") if x[n] is not None]
    ls = [x[n].detach().to(cast).requires_grad_() for n in names]
    q, k, v = ls[:3]
    pk = pv = None
    if x["pk"] is not None:
        pk, pv = ls[3], ls[4]
        if c.form == "shared":
            pk, pv = pk[None], pv[None]
    o = sdpa_concat_baseline(q, k, v, pk, pv, x["norm_idx"], x["mask"], causal=c.causal, scale=c.scale)
    grads = torch.autograd.grad(o, ls, x["dout"].to(cast))
    return [o, None, *grads]


def run_op(c: AttnCase, x: dict, backend: str):
    from softprompt_kernels import prefix_attention

    names = [n for n in ("q", "k", "v", "pk", "pv") if x[n] is not None]
    ls = {n: x[n].detach().requires_grad_() for n in names}
    out, lse = prefix_attention(ls["q"], ls["k"], ls["v"], ls.get("pk"), ls.get("pv"), prefix_index=x["idx"],
                                causal=c.causal, key_padding_mask=x["mask"], softmax_scale=c.scale,
                                return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, [ls[n] for n in names], x["dout"])
    return [out, lse, *grads]


ATTN_NAMES = ["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


def check_attention(c: AttnCase, backend: str = "torch", only=None):
    """Outputs and gradients of ``c`` (those named in ``only``, default all) within the
    DESIGN §4 rule; returns the comparisons."""
    from softprompt_kernels.testing import compare

    x = build_attention_inputs(c)
    ours = run_op(c, x, backend)
    plain = run_reference(c, x, DTYPES[c.dtype])
    sdpa = run_sdpa(c, x, DTYPES[c.dtype])
    ref = run_reference(c, x, torch.float64)
    names = ATTN_NAMES if c.form != "none" else ATTN_NAMES[:5]
    comps = [compare(n, a, [p] if s is None else [p, s], r)
             for n, a, p, s, r in zip(names, ours, plain, sdpa, ref) if only is None or n in only]
    bad = [str(cm) for cm in comps if not cm.ok]
    assert not bad, f"{c}\n" + "\n".join(bad) + "\nrepro:\n" + c.repro(backend)
    return comps


# ------------------------------------------------------------------ prefix MLP
@dataclass(frozen=True)
class MlpCase:
    P: int
    E: int
    H1: int
    layers: int
    H: int
    D: int
    activation: str
    bias: bool
    dtype: str
    w_layout: str  # contig | transposed | dstride
    magnitude: float
    seed: int


@st.composite
def mlp_cases(draw, *, small: bool = False, dtypes=("float32", "float16", "bfloat16")):
    return MlpCase(
        P=draw(st.sampled_from([1, 2, 5, 17, 37] if small else [1, 2, 5, 17, 37, 70])),
        E=draw(st.sampled_from([8, 13, 24, 40] if small else [1, 8, 13, 24, 40, 64])),
        H1=draw(st.sampled_from([8, 19, 32] if small else [1, 8, 19, 32, 48])),
        layers=draw(st.integers(1, 2)), H=draw(st.integers(1, 2)),
        D=draw(st.sampled_from([8, 16, 24] if small else [1, 8, 16, 24, 80])),
        activation=draw(st.sampled_from(["tanh", "relu", "gelu", "identity"])),
        bias=draw(st.booleans()), dtype=draw(st.sampled_from(list(dtypes))),
        w_layout=draw(st.sampled_from(["contig", "transposed", "dstride"])),
        magnitude=draw(st.sampled_from([1.0, 1.0, 1e-2, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_mlp_inputs(c: MlpCase):
    g = torch.Generator().manual_seed(c.seed)
    dt = DTYPES[c.dtype]
    N = c.layers * 2 * c.H * c.D

    def weight(rows, cols, fan_in):
        if c.w_layout == "transposed":
            w = torch.randn(cols, rows, generator=g).t()
        elif c.w_layout == "dstride":
            w = torch.randn(rows, 2 * cols, generator=g)[:, ::2]
        else:
            w = torch.randn(rows, cols, generator=g)
        return (w / fan_in ** 0.5).to(dt)

    x = (torch.randn(c.P, c.E, generator=g) * c.magnitude).to(dt)
    w1, w2 = weight(c.H1, c.E, c.E), weight(N, c.H1, c.H1)
    b1 = (torch.randn(c.H1, generator=g) * 0.5).to(dt) if c.bias else None
    b2 = (torch.randn(N, generator=g) * 0.5).to(dt) if c.bias else None
    grad = torch.randn(c.layers, 2, c.H, c.P, c.D, generator=g).to(dt)
    return [x, w1, b1, w2, b2], grad
