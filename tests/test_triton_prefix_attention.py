"""Triton prefix-attention backend (softprompt_kernels.triton.prefix_attention) under the interpreter.

Calls the backend functions directly and compares forward (out, lse) and all five gradients with
the float64 reference under the DESIGN §4 tolerance rule.  Every tensor the backend allocates
with ``torch.empty`` is poisoned with NaN first, so an element a kernel forgets to write shows up.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from softprompt_kernels.ops.layout import empty_output
from softprompt_kernels.reference import prefix_attention_reference
from softprompt_kernels.testing import compare
from softprompt_kernels.triton import prefix_attention as tpa
from softprompt_kernels.triton import prefix_attention_bwd as tbwd
from softprompt_kernels.triton import prefix_attention_fwd as tfwd

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (16, 40, 64, 80, 96, 128, 256)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors (torch.empty: 0x7f-filled integer ones) here."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.uint8):
            t.fill_(0x7F)
        return t

    real_empty_like = torch.empty_like

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
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


def check_case(c, *, ref_case=None, dropout_p=0.0, seed=0, deterministic=True):
    """Forward and every gradient of the kernels on ``c`` against the float64 reference under the
    tolerance rule; the reference runs on ``ref_case`` (default ``c``: e.g. the same case with garbage
    replaced by finite values)."""
    out, lse, grads = kernel_run(c, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
    c = ref_case or c
    mask = None
    if dropout_p > 0:
        q, k = c["q"], c["k"]
        P = 0 if c["pk"] is None else c["pk"].shape[2]
        mask = tpa.dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], P, k.shape[2], dropout_p, q.device)
    o64, l64, g64 = reference_run(c, torch.float64, dropout_p=dropout_p, dropout_mask=mask)
    olp, llp, glp = reference_run(c, dropout_p=dropout_p, dropout_mask=mask)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype and out.stride() == empty_output(c["q"]).stride()  # the op's layout
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


# ----------------------------------------------------------------------------- forward semantics
def forward_run(c, *, dropout_p=0.0, seed=0, scale=None):
    return tpa.attention_forward(c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"],
                                 causal=c["causal"], scale=c["scale"] if scale is None else scale,
                                 dropout_p=dropout_p, seed=seed)


def check_forward(c, *, ref_case=None, dropout_p=0.0, seed=0):
    """Forward only (out, lse) against the float64 reference under the tolerance rule; the reference
    runs on ``ref_case`` (default ``c``: e.g. the same case with garbage replaced by finite values)."""
    out, lse = forward_run(c, dropout_p=dropout_p, seed=seed)
    r = ref_case or c
    mask = None
    if dropout_p > 0:
        q, k = c["q"], c["k"]
        P = 0 if c["pk"] is None else c["pk"].shape[2]
        mask = tpa.dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], P, k.shape[2], dropout_p, q.device)
    args = (r["q"], r["k"], r["v"], r["pk"], r["pv"], r["idx"], r["kpm"])
    kw = dict(causal=r["causal"], scale=r["scale"], dropout_p=dropout_p, dropout_mask=mask)
    o64, l64 = prefix_attention_reference(*[None if t is None or not t.is_floating_point() else t.double()
                                            for t in args[:5]], *args[5:], **kw)
    olp, llp = prefix_attention_reference(*args, **kw)
    res = [compare("out", out, olp, o64), compare("lse", lse, llp, l64)]
    bad = [str(x) for x in res if not x.ok]
    assert not bad, c["desc"] + "\n" + "\n".join(bad)
    return out, lse


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("shape", [(16, 16, 0), (33, 33, 16), (1, 40, 17), (5, 37, 31), (48, 64, 32), (40, 40, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_loop_split_boundaries(monkeypatch, blocks, shape, causal):
    """Unmasked/masked block split at and around block multiples of L, S and P (decode S > L,
    a one-row tile, a prefix that ends exactly on or one past a block), shared and per-row prefixes."""
    bm, bn = blocks
    monkeypatch.setitem(tfwd.CONFIG_OVERRIDE, "fwd", (bm, bn, 4, 1))
    L, S, P = shape
    for i, dtype in enumerate((torch.bfloat16, torch.float32)):
        c = make_case(300 + L + S + P + bm + 3 * bn + i, dtype, L=L, S=S, P=P, D=32, causal=causal, mask=False,
                      form="row" if i else "shared")
        check_forward(c)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nan_in_a_visible_score_propagates(dtype):
    """A NaN / inf in a visible score makes exactly the reference's rows NaN (SDPA semantics); the
    other rows are unaffected.  (The old kernel turned such rows into silent zeros.)"""
    for P, causal, mask in ((7, False, False), (0, True, True), (40, True, False)):
        c = make_case(400 + P, DTYPES[dtype], P=P, L=37, S=45, D=64, causal=causal, mask=mask, B=2, Hkv=1, group=2)
        q, k = c["q"].clone(), c["k"].clone()
        q[0, 1, 3, 5] = float("nan")                   # one row: every score NaN
        k[1, 0, 9, 2] = float("inf")                   # one key: +-inf / NaN for every row that sees it
        c = dict(c, q=q, k=k)
        out, lse = forward_run(c)
        args = [None if t is None else t.double() for t in (c["q"], c["k"], c["v"], c["pk"], c["pv"])]
        o64, l64 = prefix_attention_reference(*args, c["idx"], c["kpm"], causal=causal, scale=c["scale"])
        nan_rows = torch.isnan(o64).any(-1)
        assert nan_rows[0, 1, 3] and nan_rows[1].any() and not nan_rows.all()
        assert torch.equal(torch.isnan(out).any(-1), nan_rows), c["desc"]
        assert torch.isnan(out[nan_rows]).all()
        assert torch.equal(torch.isnan(lse), torch.isnan(l64)), c["desc"]
        assert torch.equal(torch.isposinf(lse), torch.isposinf(l64)) and torch.isposinf(l64).any(), c["desc"]
        ok = ~nan_rows
        assert not torch.isnan(out[ok]).any() and torch.isfinite(lse[ok]).all()
        olp, llp = prefix_attention_reference(c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"],
                                              causal=causal, scale=c["scale"])
        for r in (compare("out", out[ok], olp[ok], o64[ok]), compare("lse", lse[ok], llp[ok], l64[ok])):
            assert r.ok, c["desc"] + "\n" + str(r)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_visible_scores_minus_inf_is_nan_not_a_dead_row(dtype):
    """Visible scores that are all -inf: the reference's softmax is NaN; only a row with no visible
    column is a zero row.  Without a prefix, with and without a padding mask."""
    for mask in (False, True):
        c = make_case(410 + mask, DTYPES[dtype], P=0, L=20, S=20, D=32, causal=False, mask=mask, B=1, Hkv=1,
                      group=1, fully_masked=False)
        q, k = c["q"].clone(), c["k"].clone()
        k[..., 0] = 1.0
        q[0, 0, 4, 0] = float("-inf")                  # row 4: every visible score is -inf
        c = dict(c, q=q, k=k)
        out, lse = forward_run(c)
        o64, l64 = prefix_attention_reference(c["q"].double(), c["k"].double(), c["v"].double(), None, None, None,
                                              c["kpm"], causal=False, scale=c["scale"])
        assert torch.isnan(o64[0, 0, 4]).all() and torch.isneginf(l64[0, 0, 4])   # softmax NaN, logsumexp -inf
        assert torch.isnan(out[0, 0, 4]).all() and torch.isneginf(lse[0, 0, 4])
        others = torch.ones(20, dtype=torch.bool)
        others[4] = False
        assert not torch.isnan(out[0, 0, others]).any()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nan_scale_gives_nan_rows_and_zero_dead_rows(dtype):
    c = make_case(420, DTYPES[dtype], P=0, L=19, S=23, D=64, causal=False, mask=True, fully_masked=True, B=2)
    out, lse = forward_run(c, scale=float("nan"))
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()       # row 0 of the batch sees nothing
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    c = make_case(421, DTYPES[dtype], P=5, L=9, S=9, D=32, causal=True, mask=True)
    out, lse = forward_run(c, scale=float("nan"))
    assert torch.isnan(out).all() and torch.isnan(lse).all()


def _poison_padded_keys_values(c, S):
    """``c`` with NaN keys and inf / NaN values at padded positions, k / v slices of a NaN-filled buffer."""
    D = c["k"].shape[3]
    big_k = torch.full((*c["k"].shape[:2], S + 13, D), float("nan"), dtype=c["k"].dtype)
    big_v = big_k.clone()
    big_k[:, :, :S], big_v[:, :, :S] = c["k"], c["v"]
    k, v = big_k[:, :, :S], big_v[:, :, :S]
    pad = ~c["kpm"][:, None, :, None]
    k.masked_fill_(pad, float("nan"))
    v.masked_fill_(pad & (torch.arange(D) % 2 == 0), float("inf"))
    v.masked_fill_(pad & (torch.arange(D) % 2 == 1), float("nan"))
    return dict(c, k=k, v=v)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_and_values_contribute_nothing_whatever_they_hold(dtype, causal):
    """NaN / inf / huge values at padded key positions (key_padding_mask False) change nothing: the
    result equals the reference on the same inputs with finite values there.  Also memory past S
    (k, v slices of a NaN-filled buffer).  (The old kernel multiplied padded values by p = 0.)"""
    for P in (0, 9):
        c = make_case(430 + P + causal, DTYPES[dtype], P=P, L=29, S=41, D=80, causal=causal, mask=True, B=2)
        c["kpm"][:, -1] = False
        c["kpm"][:, 0] = True
        garbage = _poison_padded_keys_values(c, 41)
        out, lse = check_forward(garbage, ref_case=c)
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_and_values_contribute_nothing_to_the_gradients(dtype, causal, deterministic):
    """The backward too: with NaN / inf at padded key positions (key_padding_mask False) the kernels'
    out, lse, dq, dk, dv, dprefix_k, dprefix_v match the float64 reference on the clean inputs under
    the tolerance rule (dk / dv of padded keys are 0 there), none of them NaN.  (The old backward
    poisoned dq, dk and dprefix_k.)"""
    for P in (0, 9):
        c = make_case(470 + P + causal, DTYPES[dtype], P=P, L=29, S=41, D=80, causal=causal, mask=True, B=2)
        c["kpm"][:, -1] = False
        c["kpm"][:, 0] = True
        garbage = _poison_padded_keys_values(c, 41)
        out, lse, grads = check_case(garbage, ref_case=c, deterministic=deterministic)
        for name, g in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads):
            assert g is None or not torch.isnan(g).any(), name


def test_out_of_range_prefix_index_is_clamped_in_kernel():
    """The kernel never reads outside prefix_k: an index past T - 1 (or negative) reads task T - 1 (0)."""
    c = make_case(440, torch.float16, P=11, L=8, S=8, D=32, form="task", B=3)
    T = c["pk"].shape[0]
    bad = dict(c, idx=torch.tensor([T + 5, -3, 2 ** 40], dtype=torch.int64))
    fixed = dict(c, idx=torch.tensor([T - 1, 0, T - 1], dtype=torch.int64))
    o1, l1 = forward_run(bad)
    o2, l2 = forward_run(fixed)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_negative_and_zero_scale(dtype):
    for scale in (-0.2, 0.0):
        c = make_case(450, DTYPES[dtype], P=33, L=35, S=40, D=64, causal=True, mask=True)
        check_forward(dict(c, scale=scale))


def test_forward_writes_a_strided_out_tensor():
    """``out=`` is written through its strides (e.g. a [B, L, H, D] buffer viewed as [B, H, L, D])."""
    c = make_case(460, torch.bfloat16, P=4, L=13, S=17, D=96, B=2, Hkv=1, group=2)
    B, Hq, L, D = c["q"].shape
    buf = torch.full((B, L, Hq, D), float("nan"), dtype=torch.bfloat16)
    o, lse = tpa.attention_forward(c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"], causal=c["causal"],
                                   scale=c["scale"], dropout_p=0.0, seed=0, out=buf.transpose(1, 2))
    assert o.data_ptr() == buf.data_ptr()
    ref, ref_lse = forward_run(c)
    assert torch.equal(buf.transpose(1, 2), ref) and torch.equal(lse, ref_lse)


def test_launch_flags_pick_the_specialisation():
    """The launcher turns every optional feature into a constexpr (no dropout code without dropout)."""
    f = tfwd.fwd_flags
    assert f(D=80, block_d=128, P=0, causal=True, has_mask=False, dropout_p=0.0, scale=0.1) == dict(
        CAUSAL=True, HAS_MASK=False, DROPOUT=False, HAS_PREFIX=False, EVEN_D=False, NEG_SCALE=False)
    assert f(D=64, block_d=64, P=3, causal=False, has_mask=True, dropout_p=0.1, scale=-1.0) == dict(
        CAUSAL=False, HAS_MASK=True, DROPOUT=True, HAS_PREFIX=True, EVEN_D=True, NEG_SCALE=True)
    assert set(tfwd.FWD_VARIANTS["plain"]) == set(f(D=64, block_d=64, P=1, causal=False, has_mask=False,
                                                     dropout_p=0.0, scale=1.0))
    # tile table: the main one only without a padding mask, dropout or a ragged head dim
    base = dict(D=64, block_d=64, P=1, causal=True, has_mask=False, dropout_p=0.0, scale=1.0)
    assert not tfwd.masked_launch(f(**base))
    for change in (dict(D=48), dict(has_mask=True), dict(dropout_p=0.1)):
        assert tfwd.masked_launch(f(**{**base, **change})), change


# ----------------------------------------------------------------------------- specs
def test_aot_specs_cover_every_launch_choice():
    specs = tpa.aot_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for dt in ("fp16", "bf16", "fp32"):
        for bd in tfwd.BLOCK_DS:
            for arch in (80, 90):
                assert any(s.name.startswith(f"prefix_attn_fwd[d={bd},{dt}") and arch in s.archs
                           for s in specs), (bd, dt, arch)
    # the forward ships one tile per (arch, dtype family, BLOCK_D): its specs compile that tile for that arch
    dt_of = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for s in specs:
        if s.name.startswith("prefix_attn_fwd["):
            bd, dt, arch = s.name[len("prefix_attn_fwd[d="):].split(",")[:3]
            arch = int(arch[2:])
            assert s.archs == (arch,)
            c = s.constexprs
            table = tfwd.FWD_MASKED_TILES if tfwd.masked_launch(c) else tfwd.FWD_TILES
            assert (c["BLOCK_M"], c["BLOCK_N"], s.num_warps, s.num_stages) == \
                table[arch][(tfwd.family(dt_of[dt]), int(bd))]
    # every 16-bit forward kernel must get wgmma on sm_90
    for s in specs:
        if s.name.startswith("prefix_attn_fwd["):
            assert s.expect_wgmma == ("fp16" in s.name or "bf16" in s.name), s.name

    # the backward: every (arch, kernel, dtype, BLOCK_D, variant) the launcher can pick
    for dt in ("fp16", "bf16", "fp32"):
        for bd in tfwd.BLOCK_DS:
            for arch in tbwd.ARCHS:
                tag = tbwd.spec_tag(arch)
                for var in tbwd.BWD_VARIANTS:
                    for kind in ("dq", "dkdv", "dkdv_prefix"):
                        if kind == "dkdv_prefix" and var == "causal":  # no causal constexpr there
                            assert f"prefix_attn_bwd_{kind}[{tag},d={bd},{dt},{var}]" not in names
                            continue
                        assert f"prefix_attn_bwd_{kind}[{tag},d={bd},{dt},{var}]" in names
                        if (dt != "fp32" and kind != "dq") or kind == "dkdv_prefix":
                            assert f"prefix_attn_bwd_{kind}[{tag},d={bd},{dt},{var},atomic]" in names
                    assert f"prefix_attn_bwd_stats[{tag},d={bd},{dt},{var}]" in names  # fp32: its own launch
    # each backward spec compiles the tile the launcher picks for its variant on its archs
    kinds = {"dq": "dq", "stats": "dq", "dkdv": "dkdv", "dkdv_prefix": "prefix"}
    for s in specs:
        if s.name.startswith("prefix_attn_bwd_") and "reduce" not in s.name:
            kind, rest = s.name[len("prefix_attn_bwd_"):].split("[")
            _tag, bd, dt, var = rest.rstrip("]").split(",")[:4]
            k = kinds[kind] + ("_atomic" if s.name.endswith(",atomic]") and kind != "dq" else "")
            for arch in s.archs:
                c = s.constexprs
                assert (c["BLOCK_M"], c["BLOCK_N"], s.num_warps, s.num_stages) == tbwd.bwd_config(
                    k, dt_of[dt], int(bd[2:]), arch, tbwd.masked_launch(tbwd.BWD_VARIANTS[var])), s.name
    # every 16-bit backward GEMM kernel with d <= 128 must get wgmma on sm_90 (the AOT test checks the PTX)
    for s in specs:
        if ("bwd" in s.name and "reduce" not in s.name and "fp32" not in s.name and "d=256" not in s.name
                and 90 in s.archs):
            assert s.expect_wgmma, s.name


def test_forward_tile_tables():
    """sm_90 16-bit tiles are at least 128 x 64 up to D = 128; padding-mask / dropout launches take
    the masked table; the interpreter gets small tiles."""
    for bd in (32, 64, 128):
        bm, bn, w, st = tfwd.FWD_TILES[90][("16", bd)]
        assert bm >= 128 and bn >= 64, bd
        assert tfwd.fwd_config(torch.float16, bd, 90) == (bm, bn, w, st)
        assert tfwd.fwd_config(torch.float16, bd, 90, masked=True) == tfwd.FWD_MASKED_TILES[90][("16", bd)]
    assert tfwd.fwd_config(torch.bfloat16, 128, None) == tfwd.CPU_TILES["16"]
    assert tfwd.device_arch("cpu") is None


# ----------------------------------------------------------------------------- backward variants
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("i", range(4))
def test_atomic_mode_random_cases(dtype, i):
    """deterministic=False (16-bit: dQ by fp32 atomics inside the dK/dV pass; prefix grads by atomics)
    under the same 2x rule, every feature drawn at random."""
    check_case(make_case(2000 + i, DTYPES[dtype], mask=bool(i % 2)), dropout_p=0.2 if i == 3 else 0.0, seed=5,
               deterministic=False)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("form", ["shared", "task"])
def test_prefix_rows_split_over_chunks(monkeypatch, form, deterministic):
    """Few target programs: each task's rows split over several chunks (fp32 partials + ordered
    reduction, or atomics), a task no row uses gets exact zeros; repeat runs give the same bits."""
    monkeypatch.setattr(tbwd, "PREFIX_PROGRAMS", 1)
    c = make_case(24, torch.bfloat16, P=19, form=form, B=5, D=40, L=10, S=13, Hkv=1, group=2, causal=True, mask=True)
    if form == "task":
        c["pk"], c["pv"] = (torch.cat([t, t[:1]]) for t in (c["pk"], c["pv"]))  # task T-1: no row
    _, _, g1 = check_case(c, deterministic=deterministic)
    if form == "task":
        assert (g1[3][-1] == 0).all() and (g1[4][-1] == 0).all()
    if deterministic:
        _, _, g2 = kernel_run(c)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_shipped_sm90_tiles_under_the_interpreter(monkeypatch):
    """The interpreter runs the sm_90 tiles by default; also run a case over several key and query blocks
    of them with every feature on (bf16, D=128: the (32, 128) dK/dV tile)."""
    assert tbwd.bwd_config("dkdv", torch.bfloat16, 128, None) == tbwd.BWD_TILES[90][("16", 128)]["dkdv"]
    assert tbwd.bwd_config("dkdv", torch.bfloat16, 128, None, masked=True) == \
        tbwd.pick_tile(tbwd.BWD_TILES[90][("16", 128)], "dkdv", True)
    c = make_case(25, torch.bfloat16, P=130, D=128, L=70, S=140, B=1, Hkv=1, group=2, causal=True, mask=True,
                  form="shared")
    check_case(c, dropout_p=0.1, seed=4, deterministic=False)


@pytest.mark.parametrize("D,deterministic", [(64, True), (128, False)])
def test_shipped_sm80_tiles_under_the_interpreter(monkeypatch, D, deterministic):
    """The sm_80 tiles (own table: no wgmma, narrower) over several key and query blocks, every feature on."""
    monkeypatch.setattr(tbwd, "device_arch", lambda device: 80)
    assert tbwd.BWD_TILES[80] != tbwd.BWD_TILES[90]
    c = make_case(27, torch.bfloat16, P=70, D=D, L=70, S=75, B=1, Hkv=1, group=2, causal=True, mask=True,
                  form="shared")
    check_case(c, dropout_p=0.1, seed=5, deterministic=deterministic)


@pytest.mark.parametrize("D,form", [(200, "task"), (129, "shared"), (80, "shared"), (20, "task")])
def test_fp32_ragged_head_dim_is_padded_to_block_d(D, form):
    """fp32 with a ragged head dim: the launcher zero-pads it to BLOCK_D (the ragged-D fp32 kernels
    spill) and drops the extra columns; every gradient against the reference with every feature on,
    q / k given in [B, L, H, D] storage (their gradients keep it)."""
    rng = np.random.default_rng(28)
    c = make_case(28 + D, torch.float32, P=19, D=D, L=21, S=33, B=2, Hkv=1, group=2, causal=True, mask=True,
                  form=form)
    c["q"], c["k"] = (_tensor(rng, tuple(t.shape), torch.float32, "bxhd") for t in (c["q"], c["k"]))
    _, _, (dq, dk, dv, dpk, dpv) = check_case(c, dropout_p=0.2, seed=6)
    assert dq.shape[-1] == D and dpk.shape == c["pk"].shape and dpv.shape == c["pv"].shape
    assert dq.stride() == c["q"].stride() and dk.stride() == c["k"].stride()


def test_one_task_chunk_table_equals_the_sorted_one():
    """T = 1 skips the sort / bincount / searchsorted: same table as the general path."""
    for B in (1, 2, 5, 8):
        for R in (1, 2, 3, 8):
            n_chunks = min(B, -(-B // R))
            idx = torch.zeros(B, dtype=torch.int64)
            fast = tbwd._chunk_table(idx, 1, B, R, n_chunks)
            general = tbwd._chunk_table(idx, 2, B, R, n_chunks + 1)  # task 1 has no rows: one empty chunk
            names = ("order", "task", "lo", "hi", "first", "part_first")
            for name, a, b in zip(names, fast, general):
                if name in ("first", "part_first"):
                    b = b[:2]
                elif name in ("task", "lo", "hi"):
                    b = b[:n_chunks]
                assert torch.equal(a, b), (B, R, name, a, b)


def test_gradients_keep_the_input_layouts():
    """dq/dk/dv come back with the strides of dense permuted q/k/v ([B, L, H, D] storage) and contiguous
    for non-dense inputs (a head-dim slice of a wider buffer)."""
    rng = np.random.default_rng(26)
    c = make_case(26, torch.float16, P=5, D=64, L=9, S=11, B=2, Hkv=2, group=2)
    c["q"], c["k"], c["v"] = (_tensor(rng, tuple(t.shape), torch.float16, lay)
                              for t, lay in ((c["q"], "bxhd"), (c["k"], "bxhd"), (c["v"], "wide")))
    _, _, (dq, dk, dv, _, _) = check_case(c)
    assert dq.stride() == c["q"].stride() and dk.stride() == c["k"].stride()
    assert dv.is_contiguous()


# ----------------------------------------------------------------------------- issue 10: non-finite inputs
def _backward_only(c, *, deterministic=True, **over):
    """Backward on ``c`` with some inputs replaced (``over``), forward statistics from ``c`` itself."""
    out, lse = tpa.attention_forward(c["q"], c["k"], c["v"], c["pk"], c["pv"], c["idx"], c["kpm"],
                                     causal=c["causal"], scale=c["scale"], dropout_p=0.0, seed=0)
    x = dict(c, **over)
    return tpa.attention_backward(x["dout"], x["q"], x["k"], x["v"], x["pk"], x["pv"], x["idx"], x["kpm"],
                                  out, lse, causal=c["causal"], scale=c["scale"], dropout_p=0.0, seed=0,
                                  deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_nonfinite_padded_keys_values_contribute_nothing(dtype, deterministic):
    """NaN / inf in key-padding-masked keys and values change no gradient bit (also with no prefix)."""
    for P in (7, 0):
        c = make_case(27 + P, DTYPES[dtype], P=P, D=40, L=12, S=20, B=2, Hkv=1, group=2, causal=False, mask=True)
        c["kpm"][:, 3] = False
        clean = _backward_only(c, deterministic=deterministic)
        pad = ~c["kpm"][:, None, :, None]
        bad_k = torch.where(pad, torch.tensor(float("nan"), dtype=c["k"].dtype), c["k"])
        bad_v = torch.where(pad, torch.tensor(float("inf"), dtype=c["v"].dtype), c["v"])
        dirty = _backward_only(c, deterministic=deterministic, k=bad_k, v=bad_v)
        for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv"), clean, dirty):
            if a is None:
                continue
            assert not torch.isnan(b).any(), name
            assert torch.equal(a, b) if deterministic else torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_nan_in_a_visible_score_stays_in_its_row():
    c = make_case(29, torch.float16, P=4, D=32, L=6, S=8, B=2, Hkv=1, group=1, causal=False, mask=False,
                  form="row")
    q = c["q"].clone()
    q[1, 0, 2, 5] = float("nan")
    c["q"] = q
    out, lse = tpa.attention_forward(q, c["k"], c["v"], c["pk"], c["pv"], c["idx"], None,
                                     causal=False, scale=c["scale"], dropout_p=0.0, seed=0)
    dq, dk, dv, dpk, dpv = tpa.attention_backward(c["dout"], q, c["k"], c["v"], c["pk"], c["pv"], c["idx"], None,
                                                  out, lse, causal=False, scale=c["scale"], dropout_p=0.0,
                                                  seed=0, deterministic=True)
    assert torch.isnan(dq[1, 0, 2]).all()
    assert torch.isfinite(dq[0]).all() and torch.isfinite(dq[1, 0, :2]).all() and torch.isfinite(dq[1, 0, 3:]).all()
    assert torch.isnan(dk[1]).all() and torch.isfinite(dk[0]).all()
    assert torch.isnan(dpk[1]).all() and torch.isfinite(dpk[0]).all()


@pytest.mark.parametrize("deterministic", [True, False])
def test_out_of_range_prefix_index_is_clamped_in_backward_kernels(deterministic):
    """The kernels never read outside the prefix tensors whatever prefix_index holds (clamped to [0, T))."""
    c = make_case(30, torch.float16, P=9, D=32, L=7, S=9, B=3, Hkv=1, group=1, form="task")
    T = c["pk"].shape[0]
    wild = torch.tensor([-3, T + 5, 2**40], dtype=torch.int64)
    clamped = wild.clamp(0, T - 1)
    ref = _backward_only(dict(c, idx=clamped), deterministic=deterministic)
    got = _backward_only(dict(c, idx=clamped), deterministic=deterministic, idx=wild)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_backward_fake_matches_the_layouts_the_backend_returns():
    """The registered fake of the backward op gives dq/dk/dv the strides the Triton backend returns
    (torch.compile trusts the fake's strides)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = make_case(31, torch.float16, P=0, D=64, L=5, S=7, B=2, Hkv=1, group=2)
    q = c["q"].transpose(1, 2).contiguous().transpose(1, 2)  # [B, L, H, D] storage
    with FakeTensorMode() as mode:
        fq, fk, fv, fo = (mode.from_tensor(t) for t in (q, c["k"], c["v"], c["dout"]))
        lse = torch.empty(q.shape[:3], dtype=torch.float32)
        g = torch.ops.softprompt_kernels.prefix_attention_bwd(fo, fq, fk, fv, None, None, None, None, None, fo,
                                                              lse, False, 0.125, 0.0, True, "triton")
    assert g[0].stride() == q.stride() and g[1].stride() == c["k"].stride()
