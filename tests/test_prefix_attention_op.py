"""The public prefix_attention op: argument checks, prefix forms, torch.library
registration (opcheck, torch.compile) and the plain-PyTorch backend vs float64."""
import pytest
import torch

from softprompt_kernels import prefix_attention
from softprompt_kernels.ops.prefix_attention import _prefix_attention_fwd, dropout_keep_mask
from softprompt_kernels.reference import prefix_attention_reference
from softprompt_kernels.testing import assert_close, sdpa_concat_baseline


def _rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _normalised(form, B, pk, pv, idx):
    if form == "none":
        return None, None, None
    if form == "shared":
        return pk[None], pv[None], torch.zeros(B, dtype=torch.long)
    if form == "row":
        return pk, pv, torch.arange(B)
    return pk, pv, idx


def _make_case(rng, dtype):
    B = int(rng.integers(1, 4))
    Hkv = int(rng.choice([1, 2, 3]))
    Hq = Hkv * int(rng.choice([1, 2, 4]))
    L = int(rng.integers(1, 40))
    S = L + int(rng.choice([0, 0, int(rng.integers(1, 20))]))
    P = int(rng.choice([0, 1, int(rng.integers(2, 70))]))
    D = int(rng.choice([16, 40, 64, 80, 96]))
    form = str(rng.choice(["none", "shared", "row", "task"])) if P else "none"
    causal = bool(rng.integers(0, 2))
    padded = bool(rng.integers(0, 2))
    q = _rand(B, L, Hq, D, dtype=dtype).detach().transpose(1, 2).requires_grad_()  # non-contiguous
    k, v = _rand(B, Hkv, S, D, dtype=dtype), _rand(B, Hkv, S, D, dtype=dtype)
    pk = pv = idx = None
    if form == "shared":
        pk, pv = _rand(Hkv, P, D, dtype=dtype), _rand(Hkv, P, D, dtype=dtype)
    elif form == "row":
        pk, pv = _rand(B, Hkv, P, D, dtype=dtype), _rand(B, Hkv, P, D, dtype=dtype)
    elif form == "task":
        T = int(rng.integers(1, 4))
        pk, pv = _rand(T, Hkv, P, D, dtype=dtype), _rand(T, Hkv, P, D, dtype=dtype)
        idx = torch.from_numpy(rng.integers(0, T, size=B))
    mask = None
    if padded:
        mask = torch.from_numpy(rng.random((B, S)) > 0.3)
        if P == 0 and rng.random() < 0.5:
            mask[0] = False  # a row that sees nothing: zeros, not NaN
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, idx=idx, mask=mask, causal=causal, form=form, B=B)


def _check_against_reference(c, backend, dtype):
    q, k, v, pk, pv, idx, mask = (c[n] for n in ("q", "k", "v", "pk", "pv", "idx", "mask"))
    out, lse = prefix_attention(q, k, v, pk, pv, prefix_index=idx, causal=c["causal"], key_padding_mask=mask,
                                return_lse=True, backend=backend)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    dout = torch.randn(out.shape, dtype=out.dtype)  # logical-order draw: the case set (and its known misses) is independent of out's layout
    grads = torch.autograd.grad(out, leaves, dout)

    def ref(cast):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        qq, kk, vv = ls[:3]
        ppk, ppv, nidx = _normalised(c["form"], c["B"], *(ls[3:5] if pk is not None else (None, None)), idx)
        o, l = prefix_attention_reference(qq, kk, vv, ppk, ppv, nidx, mask, causal=c["causal"])
        return [o, l, *torch.autograd.grad(o, ls, dout.to(cast))]

    def sdpa(cast):  # PyTorch's own attention on the concatenated K/V: the second baseline (DESIGN §4)
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        qq, kk, vv = ls[:3]
        ppk, ppv, nidx = _normalised(c["form"], c["B"], *(ls[3:5] if pk is not None else (None, None)), idx)
        o = sdpa_concat_baseline(qq, kk, vv, ppk, ppv, nidx, mask, causal=c["causal"])
        return [o, None, *torch.autograd.grad(o, ls, dout.to(cast))]

    r64, plain, sd = ref(torch.float64), ref(dtype), sdpa(dtype)
    names = ["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    for name, ours, p, s, r in zip(names, [out, lse, *grads], plain, sd, r64):
        assert_close(name, ours, [p] if s is None else [p, s], r)


# Former known misses: the old chunked path missed the fp32 backward rule on seeds 141, 171, 235 and 251
# (its GEMMs summed a kv group's G*L rows in one product); on the fused path (ATen flash kernel, merged
# lse rounded once) all 300 seeds pass (measured 2026-12-02, AMD EPYC, torch 2.13). Margins stay thin:
# the flash backward reads p = exp(s - lse), so the lse rounding scales a row's gradients; an
# intermediate merge order missed seed 113 by 1.36x. Listed seeds here would be non-strict xfails.
_TORCH_FP32_BACKWARD_KNOWN_MISSES: set = set()


@pytest.mark.parametrize("seed", [
    pytest.param(s, marks=pytest.mark.xfail(strict=False, reason="known fp32 backward miss, see above"))
    if s in _TORCH_FP32_BACKWARD_KNOWN_MISSES else s
    for s in range(300)
])
def test_torch_backend_matches_float64_reference(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    c = _make_case(rng, torch.float32)
    _check_against_reference(c, "torch", torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_low_precision(dtype):
    import numpy as np

    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        torch.manual_seed(seed)
        _check_against_reference(_make_case(rng, dtype), "torch", dtype)


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = _rand(2, 2, 3, 16), _rand(2, 1, 5, 16), _rand(2, 1, 5, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = prefix_attention(q, k, v, key_padding_mask=mask, return_lse=True, backend="torch")
    out.sum().backward()
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    assert (q.grad[1] == 0).all() and torch.isfinite(q.grad).all()


def test_prefix_gradient_is_summed_over_batch_and_group():
    B, Hq, Hkv, L, P, D = 3, 4, 2, 5, 4, 16
    q, k, v = _rand(B, Hq, L, D), _rand(B, Hkv, L, D), _rand(B, Hkv, L, D)
    pk, pv = _rand(Hkv, P, D), _rand(Hkv, P, D)
    prefix_attention(q, k, v, pk, pv, backend="torch").sum().backward()
    g_shared = pk.grad.clone()
    rows = pk.detach()[None].repeat(B, 1, 1, 1).requires_grad_()
    prefix_attention(q.detach(), k.detach(), v.detach(), rows, pv.detach()[None].repeat(B, 1, 1, 1),
                     backend="torch").sum().backward()
    torch.testing.assert_close(g_shared, rows.grad.sum(0))


def test_torch_compile_fullgraph_matches():
    q, k, v = _rand(2, 4, 7, 16), _rand(2, 2, 9, 16), _rand(2, 2, 9, 16)
    pk, pv = _rand(2, 3, 16), _rand(2, 3, 16)
    mask = torch.rand(2, 9) > 0.2

    def f(q, k, v, pk, pv, mask):
        return prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="torch") * 2

    eager = f(q, k, v, pk, pv, mask)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, pk, pv, mask)
    torch.testing.assert_close(compiled, eager)
    g1 = torch.autograd.grad(eager.sum(), (q, pk))
    g2 = torch.autograd.grad(compiled.sum(), (q, pk))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_opcheck(with_prefix):
    q, k, v = _rand(2, 4, 5, 16), _rand(2, 2, 7, 16), _rand(2, 2, 7, 16)
    pk, pv = (_rand(1, 2, 3, 16), _rand(1, 2, 3, 16)) if with_prefix else (None, None)
    idx = torch.zeros(2, dtype=torch.long) if with_prefix else None
    mask = torch.rand(2, 7) > 0.2
    args = (q, k, v, pk, pv, idx, mask, None, True, 0.25, 0.0, True, "torch")
    torch.library.opcheck(_prefix_attention_fwd, args)


def test_dropout_reproducible_and_uses_one_mask_for_forward_and_backward():
    B, Hq, Hkv, L, S, P, D, p = 2, 2, 1, 6, 8, 3, 16, 0.3
    q, k, v = _rand(B, Hq, L, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    pk, pv = _rand(Hkv, P, D), _rand(Hkv, P, D)
    torch.manual_seed(7)
    out1 = prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, backend="torch")
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64))  # the seed the op draws
    torch.manual_seed(7)
    out2 = prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, backend="torch")
    out3 = prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, backend="torch")
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)
    keep = dropout_keep_mask(seed, B, Hq, L, P, S, p, backend="torch")
    leaves = (q, k, v, pk, pv)
    dout = torch.randn_like(out1)
    grads = torch.autograd.grad(out1, leaves, dout)
    ls = [t.detach().double().requires_grad_() for t in leaves]
    idx = torch.zeros(B, dtype=torch.long)
    ref, _ = prefix_attention_reference(ls[0], ls[1], ls[2], ls[3][None], ls[4][None], idx, causal=True,
                                        dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out1.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, ls, dout.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_dropout_kept_fraction():
    keep = dropout_keep_mask(123, 4, 4, 64, 10, 64, 0.2, backend="torch")
    assert abs(keep.float().mean().item() - 0.8) < 0.01


BAD = [
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q must have 4 dims"),
    (dict(k=torch.randn(2, 2, 6, 8)), ValueError, "k must be"),
    (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "v must have k's shape"),
    (dict(q=torch.randn(2, 3, 5, 16)), ValueError, "multiple of k/v heads"),
    (dict(q=torch.randn(2, 4, 9, 16)), ValueError, "must be >= q length"),
    (dict(k=torch.randn(2, 2, 7, 16, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 16))), TypeError, "q must be one of"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask must be"),
    (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be torch.bool"),
    (dict(prefix_k=torch.randn(3, 4, 16), prefix_v=torch.randn(3, 4, 16)), ValueError, "prefix_k must be"),
    (dict(prefix_k=torch.randn(2, 4, 16)), ValueError, "given together"),
    (dict(prefix_k=torch.randn(2, 4, 16), prefix_v=torch.randn(2, 5, 16)), ValueError, "prefix_v must have"),
    (dict(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16), prefix_index=torch.tensor([0, 3])),
     ValueError, r"prefix_index values must be in \[0, T=3\)"),
    (dict(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16), prefix_index=torch.tensor([0.0, 1.0])),
     TypeError, "prefix_index must be int64"),
    (dict(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16)), ValueError, "per-row"),
    (dict(prefix_index=torch.tensor([0, 0])), ValueError, "without prefix_k"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "needs CUDA tensors"),
    (dict(q=torch.randn(2, 4, 5, 272), k=torch.randn(2, 2, 7, 272), v=torch.randn(2, 2, 7, 272), backend="triton"),
     ValueError, "head dim D=272 is not supported"),
    (dict(q=torch.randn(16385, 4, 1, 16), k=torch.randn(16385, 2, 1, 16), v=torch.randn(16385, 2, 1, 16),
          backend="triton"), ValueError, "grid limit"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD)
def test_bad_input_errors_name_the_argument(bad, exc, msg):
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16))
    args.update(bad)
    kwargs = {n: args.pop(n) for n in list(args) if n not in ("q", "k", "v")}
    kwargs.setdefault("backend", "torch")
    with pytest.raises(exc, match=msg):
        prefix_attention(args["q"], args["k"], args["v"], **kwargs)


# ---------------------------------------------------------------- issue 10 regressions
def _ref_out_grads(q, k, v, pk=None, pv=None, idx=None, mask=None, causal=False, scale=None, dout=None):
    """float64 reference out and grads w.r.t. the given leaves (prefix normalised to [T, ...])."""
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    ls = [t.detach().double().requires_grad_() for t in leaves]
    ppk = ppv = None
    if pk is not None:
        ppk, ppv = ls[3], ls[4]
        if ppk.dim() == 3:
            ppk, ppv, idx = ppk[None], ppv[None], torch.zeros(q.shape[0], dtype=torch.long)
        elif idx is None:
            idx = torch.arange(q.shape[0])
    o, _ = prefix_attention_reference(ls[0], ls[1], ls[2], ppk, ppv, idx, mask, causal=causal, scale=scale)
    if dout is None:
        return o, []
    return o, list(torch.autograd.grad(o, ls, dout.double(), allow_unused=True))


def test_issue10_item1_strided_int64_prefix_index_triton():
    """table[:, 0] of an int64 [B, 2] tensor: the Triton kernel must see [0, 2, 1], not [0, 2, 2]."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, S, P, D, T = 3, 2, 1, 4, 5, 3, 16, 3
    q, k, v = _rand(B, Hq, L, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    pk, pv = _rand(T, Hkv, P, D), _rand(T, Hkv, P, D)
    table = torch.tensor([[0, 2], [2, 0], [1, 1]], dtype=torch.int64)
    idx = table[:, 0]
    assert not idx.is_contiguous()
    dout = torch.randn(B, Hq, L, D)
    for index in (idx, idx.to(torch.int32)):
        out = prefix_attention(q, k, v, pk, pv, prefix_index=index, backend="triton")
        grads = torch.autograd.grad(out, (q, pk, pv), dout)
        ref, rgrads = _ref_out_grads(q, k, v, pk, pv, idx.contiguous(), dout=dout)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        for g, r in zip(grads, (rgrads[0], rgrads[3], rgrads[4])):
            torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("where", ["q", "k", "v_inf", "scale"])
def test_issue10_item2_nan_in_visible_score_is_nan_torch(where):
    torch.manual_seed(0)
    B, Hq, Hkv, L, S, P, D = 2, 2, 1, 4, 6, 2, 16
    q, k, v = _rand(B, Hq, L, D, grad=False), _rand(B, Hkv, S, D, grad=False), _rand(B, Hkv, S, D, grad=False)
    pk, pv = _rand(Hkv, P, D, grad=False), _rand(Hkv, P, D, grad=False)
    scale = None
    if where == "q":
        q[0, 1, 2, 3] = float("nan")
    elif where == "k":
        k[1, 0, 4, 0] = float("inf")  # visible to every row of batch row 1 (not causal)
    elif where == "v_inf":
        v[0, 0, 1, 5] = float("nan")
    else:
        scale = float("nan")
    out = prefix_attention(q, k, v, pk, pv, softmax_scale=scale, backend="torch")
    ref, _ = _ref_out_grads(q, k, v, pk, pv, scale=scale)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (torch.isnan(out).sum(), torch.isnan(ref).sum())
    fin = ~torch.isnan(ref)
    torch.testing.assert_close(out.double()[fin], ref[fin], atol=1e-5, rtol=1e-5)


def test_issue10_item2_dead_row_stays_zero_with_nan_scale():
    """P = 0 and a fully masked row: zeros and zero gradients, even with softmax_scale=nan."""
    q, k, v = _rand(2, 2, 3, 16), _rand(2, 1, 5, 16), _rand(2, 1, 5, 16)
    pk, pv = _rand(1, 0, 16), _rand(1, 0, 16)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, softmax_scale=float("nan"), backend="torch")
    assert torch.isnan(out[0]).all() and (out[1] == 0).all()
    gq, gk, gv = torch.autograd.grad(out[1].sum(), (q, k, v))
    assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()


def test_issue10_item3_prefix_index_range_eager_message():
    q, k, v = _rand(2, 2, 3, 16), _rand(2, 1, 5, 16), _rand(2, 1, 5, 16)
    pk, pv = _rand(3, 1, 2, 16), _rand(3, 1, 2, 16)
    with pytest.raises(ValueError, match=r"prefix_index .*\[0, T=3\).*-1"):
        prefix_attention(q, k, v, pk, pv, prefix_index=torch.tensor([0, -1]), backend="torch")
    with pytest.raises(ValueError, match=r"prefix_index .*\[0, T=3\).*7"):
        prefix_attention(q, k, v, pk, pv, prefix_index=torch.tensor([7, 1]), backend="torch")


def test_issue10_item3_prefix_index_range_checked_under_compile():
    """-1 must not wrap to the last task under torch.compile (the eager check is skipped there)."""
    q, k, v = _rand(2, 2, 3, 16, grad=False), _rand(2, 1, 5, 16, grad=False), _rand(2, 1, 5, 16, grad=False)
    pk, pv = _rand(3, 1, 2, 16, grad=False), _rand(3, 1, 2, 16, grad=False)

    def f(q, k, v, pk, pv, idx):
        return prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="torch")

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(q, k, v, pk, pv, torch.tensor([2, 0])), f(q, k, v, pk, pv, torch.tensor([2, 0])))
    with pytest.raises(RuntimeError, match=r"prefix_index"):
        g(q, k, v, pk, pv, torch.tensor([0, -1]))


@pytest.mark.parametrize("causal", [False, True])
def test_issue10_item5_nan_in_masked_keys_values_contributes_nothing(causal):
    torch.manual_seed(0)
    B, Hq, Hkv, L, S, P, D = 2, 4, 2, 4, 7, 3, 16
    q, k, v = _rand(B, Hq, L, D), _rand(B, Hkv, S, D, grad=False), _rand(B, Hkv, S, D, grad=False)
    pk, pv = _rand(Hkv, P, D), _rand(Hkv, P, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 1] = mask[1, 5:] = False
    k_clean, v_clean = k.clone(), v.clone()
    k_clean[~mask[:, None, :, None].expand_as(k)] = 0.0
    v_clean[~mask[:, None, :, None].expand_as(v)] = 0.0
    k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    v[0, :, 1] = float("inf")
    v[1, :, 5:] = float("nan")
    k.requires_grad_(), v.requires_grad_(), k_clean.requires_grad_(), v_clean.requires_grad_()
    dout = torch.randn(B, Hq, L, D)
    out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    clean = prefix_attention(q, k_clean, v_clean, pk, pv, causal=causal, key_padding_mask=mask, backend="torch")
    cgrads = torch.autograd.grad(clean, (q, k_clean, v_clean, pk, pv), dout)
    torch.testing.assert_close(out, clean)
    for a, b in zip(grads, cgrads):
        torch.testing.assert_close(a, b)
    assert (grads[1][~mask[:, None, :, None].expand_as(k)] == 0).all()


def test_issue10_item6_empty_batch_with_multitask_prefix():
    q, k, v = _rand(0, 2, 3, 16), _rand(0, 1, 5, 16), _rand(0, 1, 5, 16)
    pk, pv = _rand(3, 1, 2, 16), _rand(3, 1, 2, 16)
    out = prefix_attention(q, k, v, pk, pv, prefix_index=torch.zeros(0, dtype=torch.long), backend="torch")
    assert out.shape == (0, 2, 3, 16)
    gq, gpk, gpv = torch.autograd.grad(out.sum(), (q, pk, pv))
    assert gq.shape == q.shape and (gpk == 0).all() and (gpv == 0).all() and gpk.shape == pk.shape


def test_issue10_item6_meta_tensors_with_prefix_index():
    m = dict(device="meta")
    q, k, v = torch.empty(2, 2, 3, 16, **m), torch.empty(2, 1, 5, 16, **m), torch.empty(2, 1, 5, 16, **m)
    pk, pv = torch.empty(3, 1, 2, 16, **m), torch.empty(3, 1, 2, 16, **m)
    out, lse = prefix_attention(q, k, v, pk, pv, prefix_index=torch.zeros(2, dtype=torch.long, **m),
                                return_lse=True, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, 2, 3)


def test_issue10_item6_zero_length_prefix_without_gradient():
    q, k, v = _rand(2, 2, 3, 16), _rand(2, 1, 5, 16), _rand(2, 1, 5, 16)
    pk, pv = _rand(1, 0, 16), _rand(1, 0, 16)
    out = prefix_attention(q, k, v, pk, pv, backend="torch")
    gpk, gpv = torch.autograd.grad(out.sum(), (pk, pv))
    assert gpk.shape == pk.shape and gpv.shape == pv.shape
    torch.testing.assert_close(out, prefix_attention(q, k, v, backend="torch"))


BAD_ISSUE10 = [
    (dict(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 7, 0), v=torch.randn(2, 2, 7, 0)), ValueError,
     r"head dim D=0"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_p must be in"),
    (dict(softmax_scale=torch.tensor(0.25, requires_grad=True)), ValueError, "softmax_scale .*requires grad"),
    (dict(softmax_scale="0.25"), TypeError, "softmax_scale must be"),
    (dict(backend="Torch"), ValueError, r"backend must be one of \('auto', 'triton', 'cuda', 'torch'\)"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD_ISSUE10)
def test_issue10_item6_bad_input_errors_name_the_argument(bad, exc, msg):
    test_bad_input_errors_name_the_argument(bad, exc, msg)


def test_issue10_softmax_scale_tensor_without_grad_is_accepted():
    q, k, v = _rand(2, 2, 3, 16), _rand(2, 1, 5, 16), _rand(2, 1, 5, 16)
    a = prefix_attention(q, k, v, softmax_scale=torch.tensor(0.3), backend="torch")
    torch.testing.assert_close(a, prefix_attention(q, k, v, softmax_scale=0.3, backend="torch"))
