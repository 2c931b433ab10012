"""Triton prefix-attention backend (softprompt_kernels.triton.prefix_attention) under the interpreter.

Calls the backend functions directly and compares forward (out, lse) and all five gradients with
the float64 reference under the DESIGN §4 tolerance rule.  Every tensor the backend allocates
with ``torch.empty`` is poisoned with NaN first, so an element a kernel forgets to write shows up.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from softprompt_kernels.reference import prefix_attention_reference
from softprompt_kernels.testing import compare
from softprompt_kernels.triton import prefix_attention as tpa
from softprompt_kernels.triton import prefix_attention_fwd as tfwd

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (16, 40, 64, 80, 96, 128, 256)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors (and 0x7f-filled integer ones) in these tests."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.uint8):
            t.fill_(0x7F)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


# ----------------------------------------------------------------------------- case builder
def _tensor(rng, shape, dtype, layout):
    """Random normal tensor of ``shape`` [N, H, X, D] in the given memory layout (no copy afterwards)."""
    N, H, X, D = shape
    g = torch.from_numpy(rng.standard_normal((N, X, H, D)).astype(np.float32))
    if layout == "bxhd":  # [B, L, H, D] transposed (HF layout before the transpose)
        return g.to(dtype).transpose(1, 2)
    if layout == "wide":  # a head-dim slice of a wider buffer (row stride 2*D)
        w = torch.zeros((N, H, X, 2 * D), dtype=dtype)
        w[..., :D] = g.transpose(1, 2).to(dtype)
        return w[..., :D]
    return g.transpose(1, 2).contiguous().to(dtype)


def make_case(seed, dtype, *, D=None, P=None, L=None, S=None, causal=None, mask=None, form=None,
              fully_masked=False, group=None, Hkv=None, B=None):
    rng = np.random.default_rng(seed)
    B = B if B is not None else int(rng.integers(1, 4))
    Hkv = Hkv if Hkv is not None else int(rng.choice([1, 2]))
    group = group if group is not None else int(rng.choice([1, 2, 3]))
    Hq = Hkv * group
    L = L if L is not None else int(rng.integers(1, 40))
    S = S if S is not None else L + int(rng.choice([0, int(rng.integers(1, 25))]))
    P = P if P is not None else int(rng.choice([0, 1, int(rng.integers(2, 70))]))
    D = D if D is not None else int(rng.choice(HEAD_DIMS))
    causal = bool(rng.integers(0, 2)) if causal is None else causal
    use_mask = bool(rng.integers(0, 2)) if mask is None else mask
    layouts = ["contig", "bxhd", "wide"]
    q = _tensor(rng, (B, Hq, L, D), dtype, rng.choice(layouts))
    k = _tensor(rng, (B, Hkv, S, D), dtype, rng.choice(layouts))
    v = _tensor(rng, (B, Hkv, S, D), dtype, rng.choice(layouts))
    pk = pv = idx = None
    if P > 0:
        form = form or str(rng.choice(["shared", "row", "task"]))
        T = {"shared": 1, "row": B, "task": int(rng.integers(1, 4))}[form]
        pk = _tensor(rng, (T, Hkv, P, D), dtype, rng.choice(layouts))
        pv = _tensor(rng, (T, Hkv, P, D), dtype, rng.choice(layouts))
        idx = {"shared": torch.zeros(B, dtype=torch.int64), "row": torch.arange(B),
               "task": torch.from_numpy(rng.integers(0, T, size=B)).to(torch.int64)}[form]
    kpm = None
    if use_mask:
        kpm = torch.from_numpy(rng.random((B, S)) > 0.3)
        if fully_masked:
            kpm[0] = False
    scale = float(D ** -0.5) if rng.random() < 0.8 else float(rng.uniform(0.05, 0.3))
    dout = _tensor(rng, (B, Hq, L, D), dtype, rng.choice(layouts))
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, idx=idx, kpm=kpm, causal=causal, scale=scale, dout=dout,
                desc=f"B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} P={P} D={D} causal={causal} mask={use_mask} "
                     f"form={form} {dtype}")


def kernel_run(c, *, dropout_p=0.0, seed=0, deterministic=True):
    out, lse = tpa.attention_forward(c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"],
                                     causal=c["causal"], scale=c["scale"], dropout_p=dropout_p, seed=seed)
    grads = tpa.attention_backward(c["dout"], c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"],
                                   out, lse, causal=c["causal"], scale=c["scale"], dropout_p=dropout_p,
                                   seed=seed, deterministic=deterministic)
    return out, lse, grads


def reference_run(c, to_dtype=None, *, dropout_p=0.0, dropout_mask=None):
    """Reference forward + autograd gradients with every floating input cast to ``to_dtype``."""
    leaves = [None if t is None else t.detach().to(to_dtype or t.dtype).requires_grad_()
              for t in (c["q"], c["k"], c["v"], c["pk"], c["pv"])]
    out, lse = prefix_attention_reference(*leaves, c["idx"], c["kpm"], causal=c["causal"], scale=c["scale"],
                                          dropout_p=dropout_p, dropout_mask=dropout_mask)
    live = [t for t in leaves if t is not None]
    g = torch.autograd.grad(out, live, c["dout"].to(out.dtype), allow_unused=True)
    it = iter(g)
    grads = [None if t is None else next(it) for t in leaves]
    grads = [torch.zeros_like(t) if (t is not None and gr is None) else gr for t, gr in zip(leaves, grads)]
    return out, lse, grads


def check_case(c, *, dropout_p=0.0, seed=0):
    out, lse, grads = kernel_run(c, dropout_p=dropout_p, seed=seed)
    mask = None
    if dropout_p > 0:
        q, k = c["q"], c["k"]
        P = 0 if c["pk"] is None else c["pk"].shape[2]
        mask = tpa.dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], P, k.shape[2], dropout_p, q.device)
    o64, l64, g64 = reference_run(c, torch.float64, dropout_p=dropout_p, dropout_mask=mask)
    olp, llp, glp = reference_run(c, dropout_p=dropout_p, dropout_mask=mask)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype and out.is_contiguous()
    assert lse.dtype == torch.float32
    results = [compare("out", out, olp, o64), compare("lse", lse, llp, l64)]
    for name, ours, plain, ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, glp, g64):
        if ref is None:
            assert ours is None, name
            continue
        assert ours.shape == ref.shape and ours.dtype == plain.dtype, name
        results.append(compare(name, ours, plain, ref))
    bad = [str(r) for r in results if not r.ok]
    assert not bad, c["desc"] + "\n" + "\n".join(bad)
    return out, lse, grads


# ----------------------------------------------------------------------------- random sweep
N_RANDOM = 36  # per dtype


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("i", range(N_RANDOM))
def test_random_cases(dtype, i):
    check_case(make_case(1000 * list(DTYPES).index(dtype) + i, DTYPES[dtype]))


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_head_dim(D, dtype):
    check_case(make_case(77 + D, DTYPES[dtype], D=D, P=13, L=21, S=30, causal=True, mask=True))


@pytest.mark.parametrize("P", [1, 64, 129, 700, 1024])
def test_long_prefix(P):
    dtype = torch.float16 if P % 2 else torch.bfloat16
    check_case(make_case(P, dtype, P=P, L=9, S=17, D=64, B=2, Hkv=1, group=2, form="task"))


@pytest.mark.parametrize("form", ["shared", "row", "task"])
@pytest.mark.parametrize("group", [1, 4])
def test_prefix_forms_and_gqa(form, group):
    c = make_case(5 + group, torch.float16, form=form, group=group, Hkv=2 if group == 1 else 1, B=3, P=37,
                  D=80, L=33, S=41, causal=True, mask=True)
    check_case(c)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fully_masked_rows_without_prefix(dtype):
    c = make_case(3, DTYPES[dtype], P=0, mask=True, fully_masked=True, causal=False, D=64, B=2, L=19, S=23)
    out, lse, (dq, dk, dv, dpk, dpv) = check_case(c)
    assert torch.isneginf(lse[0]).all() and not torch.isnan(out).any()
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert dpk is None and dpv is None


def test_causal_rows_that_see_only_the_prefix():
    # L > S - L: with causal and S == L, row 0 sees only column 0 plus the prefix; masks drop the rest
    c = make_case(11, torch.float16, P=5, L=40, S=40, causal=True, mask=True, D=40)
    c["kpm"][:, 0] = False
    check_case(c)


def test_zero_length_prefix_tensor():
    c = make_case(12, torch.float16, P=3, D=64, L=10, S=12)
    c["pk"], c["pv"] = c["pk"][:, :, :0], c["pv"][:, :, :0]
    out, lse, grads = kernel_run(c)
    c2 = dict(c, pk=None, pv=None, idx=None)
    out2, lse2, grads2 = kernel_run(c2)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads2[:3]))
    assert (grads[3] == 0).all() and grads[3].shape == c["pk"].shape and grads[4].shape == c["pv"].shape


# ----------------------------------------------------------------------------- determinism
def test_deterministic_mode_is_bitwise_repeatable():
    c = make_case(21, torch.bfloat16, P=45, form="task", B=3, D=96, L=30, S=30)
    _, _, g1 = kernel_run(c, deterministic=True)
    _, _, g2 = kernel_run(c, deterministic=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["shared", "task"])
def test_atomic_mode_matches_deterministic(form):
    c = make_case(22, torch.float32, P=30, form=form, B=3, D=32, L=11, S=15, Hkv=1)
    _, _, gd = kernel_run(c, deterministic=True)
    _, _, ga = kernel_run(c, deterministic=False)
    for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv"), gd, ga):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    c16 = make_case(23, torch.float16, P=30, form=form, B=3, D=32, L=11, S=15, Hkv=1)
    _, _, ga16 = kernel_run(c16, deterministic=False)
    assert ga16[3].dtype == torch.float16
    check = kernel_run(c16, deterministic=True)[2]
    torch.testing.assert_close(ga16[3], check[3], rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_gradients_use_the_forward_mask(dtype, p):
    c = make_case(31 + int(10 * p), DTYPES[dtype], P=23, D=64, L=26, S=35, causal=True, mask=True)
    check_case(c, dropout_p=p, seed=1234 + int(100 * p))


def test_dropout_random_cases():
    for i in range(4):
        check_case(make_case(40 + i, torch.float16), dropout_p=0.2, seed=99 + i)


def test_dropout_seed_reproducible():
    c = make_case(50, torch.float16, P=6, D=32, L=12, S=14, B=1, Hkv=1, group=2)
    o1, _, g1 = kernel_run(c, dropout_p=0.3, seed=7)
    o2, _, g2 = kernel_run(c, dropout_p=0.3, seed=7)
    o3, _, _ = kernel_run(c, dropout_p=0.3, seed=8)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.75])
def test_dropout_kept_fraction(p):
    B, Hq, L, P, S = 2, 3, 70, 40, 130
    m = tpa.dropout_keep_mask(2024, B, Hq, L, P, S, p, "cpu")
    assert m.shape == (B, Hq, L, P + S) and m.dtype == torch.bool
    n = m.numel()
    frac = m.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, (frac, 1 - p)
    # no structure: every head, row parity and column block keeps about the same fraction
    for part in (m[:, 0], m[:, :, ::2], m[..., :P], m[..., P:]):
        sig = (p * (1 - p) / part.numel()) ** 0.5
        assert abs(part.float().mean().item() - (1 - p)) < 6 * sig
    assert not torch.equal(m[0, 0], m[0, 1]) and not torch.equal(m[0, 0], m[1, 0])


def test_dropout_mask_is_a_function_of_seed_b_h_i_c():
    small = tpa.dropout_keep_mask(5, 1, 2, 9, 4, 11, 0.4, "cpu")
    big = tpa.dropout_keep_mask(5, 2, 2, 15, 4, 30, 0.4, "cpu")
    assert torch.equal(small, big[:1, :, :9, :15])
    assert not torch.equal(small, tpa.dropout_keep_mask(6, 1, 2, 9, 4, 11, 0.4, "cpu"))
    assert tpa.dropout_keep_mask(5, 1, 2, 9, 4, 11, 0.0, "cpu").all()


# ----------------------------------------------------------------------------- block-size sweep
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_small_blocks_exercise_multi_block_paths(monkeypatch, blocks):
    """Tiny tiles make L, S and P span many blocks (ragged tails, causal skipping, GQA loops)."""
    bm, bn = blocks
    monkeypatch.setitem(tfwd.CONFIG_OVERRIDE, "fwd", (bm, bn, 4, 1))
    monkeypatch.setitem(tfwd.CONFIG_OVERRIDE, "dkdv", (bm, bn, 4, 1))
    monkeypatch.setitem(tfwd.CONFIG_OVERRIDE, "dq", (bm, bn, 4, 1))
    for i, dtype in enumerate((torch.float16, torch.float32)):
        check_case(make_case(60 + i + bm, dtype, L=35, S=45, P=21, D=40, causal=True, mask=True, group=2, Hkv=1),
                   dropout_p=0.25 if i else 0.0, seed=3)


# ----------------------------------------------------------------------------- specs
def test_aot_specs_cover_every_launch_choice():
    specs = tpa.aot_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for dt in ("fp16", "bf16", "fp32"):
        for bd in tfwd.BLOCK_DS:
            for kind in ("fwd", "bwd_dkdv", "bwd_dq"):
                assert f"prefix_attn_{kind}[d={bd},{dt}]" in names
    # every 16-bit GEMM kernel must get wgmma on sm_90 except the d=256 dK/dV one, whose 32-key
    # tiles (needed for zero spills) are below wgmma's 64-row minimum
    for s in specs:
        main = ("fp16" in s.name or "bf16" in s.name) and any(k in s.name for k in ("_fwd[", "_dkdv[", "_dq["))
        assert s.expect_wgmma == (main and "dkdv[d=256" not in s.name), s.name
