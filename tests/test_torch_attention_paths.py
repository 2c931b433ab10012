"""The PyTorch CPU backend's two paths (softprompt_kernels/ops/torch_attention.py): the fused path on
ATen's flash kernel (split / dense-mask / joint parts, NaN detection on the output, the op's out layout) and the
blockwise path (forced here; small block constants exercise query blocks, the online softmax over key
blocks and dropout tiles), all against the float64 reference under the DESIGN §4 rule."""
import numpy as np
import pytest
import torch

from softprompt_kernels import prefix_attention
from softprompt_kernels.ops import torch_attention as ta
from softprompt_kernels.ops.layout import empty_output
from softprompt_kernels.ops.prefix_attention import _prefix_attention_fwd, dropout_keep_mask
from softprompt_kernels.reference import prefix_attention_reference
from softprompt_kernels.testing import compare, sdpa_concat_baseline

from test_prefix_attention_op import _check_against_reference, _make_case, _rand


def _small_blocks(monkeypatch):
    monkeypatch.setattr(ta, "_KEY_BLOCK", 16)
    monkeypatch.setattr(ta, "_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(ta, "_DROP_Q", 8)
    monkeypatch.setattr(ta, "_CAUSAL_Q", 8)


@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_blockwise_path_matches_float64_reference(seed, small, monkeypatch):
    monkeypatch.setattr(ta, "_fused_possible", lambda *a: False)
    if small:
        _small_blocks(monkeypatch)
    rng = np.random.default_rng(1000 + seed)
    torch.manual_seed(seed)
    _check_against_reference(_make_case(rng, torch.float32), "torch", torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blockwise_path_low_precision(dtype, monkeypatch):
    monkeypatch.setattr(ta, "_fused_possible", lambda *a: False)
    _small_blocks(monkeypatch)
    for seed in range(4):
        rng = np.random.default_rng(2000 + seed)
        torch.manual_seed(seed)
        _check_against_reference(_make_case(rng, dtype), "torch", dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_blockwise_small_blocks_matches_reference_with_its_mask(causal, monkeypatch):
    """Several query blocks, key blocks (online softmax) and dropout tiles: the mask the op used is the
    one dropout_keep_mask rebuilds, and out / every gradient follow the reference with that mask."""
    _small_blocks(monkeypatch)
    B, Hq, Hkv, L, S, P, D, p = 2, 4, 2, 21, 27, 5, 16, 0.25
    q, k, v = _rand(B, Hq, L, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    pk, pv = _rand(Hkv, P, D), _rand(Hkv, P, D)
    mask = torch.rand(B, S) > 0.2
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64))
    torch.manual_seed(3)
    out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask, dropout_p=p, backend="torch")
    keep = dropout_keep_mask(seed, B, Hq, L, P, S, p, backend="torch")
    assert 0.6 < keep.float().mean() < 0.9
    dout = torch.randn_like(out)
    leaves = (q, k, v, pk, pv)
    grads = torch.autograd.grad(out, leaves, dout)
    ls = [t.detach().double().requires_grad_() for t in leaves]
    ref, _ = prefix_attention_reference(ls[0], ls[1], ls[2], ls[3][None], ls[4][None], torch.zeros(B, dtype=torch.long),
                                        mask, causal=causal, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, ls, dout.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_dropout_keep_mask_does_not_depend_on_block_sizes(monkeypatch):
    a = dropout_keep_mask(11, 2, 3, 40, 7, 50, 0.3, backend="torch")
    monkeypatch.setattr(ta, "_BLOCK_ELEMENTS", 512)  # other compute blocks, same tiles
    assert torch.equal(a, dropout_keep_mask(11, 2, 3, 40, 7, 50, 0.3, backend="torch"))
    assert not torch.equal(a, dropout_keep_mask(12, 2, 3, 40, 7, 50, 0.3, backend="torch"))


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("form", ["none", "shared", "task"])
def test_fused_causal_s_greater_than_l_dense_mask_and_split(dense, form, monkeypatch):
    """Bottom-right causal with S > L: one dense mask, or (forced) the all-visible + causal split."""
    if not dense:
        monkeypatch.setattr(ta, "_DENSE_MASK_ELEMENTS", 0)
    calls = []
    real = ta._FLASH
    monkeypatch.setattr(ta, "_FLASH", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    rng = np.random.default_rng(7)
    torch.manual_seed(7)  # tensors and dout come from torch's global generator: same cases in any test order
    for _ in range(6):
        c = _make_case(rng, torch.float32)
        L = c["q"].shape[2]
        S = L + 9
        B, Hkv, D = c["k"].shape[0], c["k"].shape[1], c["k"].shape[3]
        c.update(k=_rand(B, Hkv, S, D), v=_rand(B, Hkv, S, D), causal=True, mask=torch.rand(B, S) > 0.3,
                 form=form, idx=None, pk=None, pv=None)
        if form == "shared":
            c.update(pk=_rand(Hkv, 6, D), pv=_rand(Hkv, 6, D))
        elif form == "task":
            c.update(pk=_rand(3, Hkv, 6, D), pv=_rand(3, Hkv, 6, D), idx=torch.from_numpy(rng.integers(0, 3, B)))
        _check_against_reference(c, "torch", torch.float32)
    assert calls and (True in calls) != dense  # the split's causal part is the only is_causal call


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("form", ["shared", "task"])
def test_fused_causal_prefix_joint_call_and_split(joint, form, monkeypatch):
    """Causal with a prefix: ONE kernel call on [prefix, keys] with a dense mask (no is_causal call, no
    merge; forced here for S == L too), or a prefix part + a causal part (past _JOINT_CAUSAL_KEYS, forced).
    Both against float64, forward and backward, with and without padding, S == L and S > L."""
    if joint:
        monkeypatch.setattr(ta, "_SPLIT_PREFIX_FRACTION", float("inf"))
    else:
        monkeypatch.setattr(ta, "_JOINT_CAUSAL_KEYS", 0)
    calls = []
    real = ta._FLASH
    monkeypatch.setattr(ta, "_FLASH", lambda *a, **kw: calls.append((a[1].shape[2], a[4])) or real(*a, **kw))
    rng = np.random.default_rng(11)
    torch.manual_seed(11)
    for i in range(8):
        c = _make_case(rng, torch.float32)
        L = c["q"].shape[2]
        S = L + (0, 5)[i % 2]
        B, Hkv, D = c["k"].shape[0], c["k"].shape[1], c["k"].shape[3]
        mask = (torch.rand(B, S) > 0.3) if i % 4 >= 2 else None
        if mask is not None:
            mask[0] = False  # a row with every key padded still sees the prefix
        c.update(k=_rand(B, Hkv, S, D), v=_rand(B, Hkv, S, D), causal=True, mask=mask, form=form, idx=None)
        if form == "shared":
            c.update(pk=_rand(Hkv, 6, D), pv=_rand(Hkv, 6, D))
        else:
            c.update(pk=_rand(3, Hkv, 6, D), pv=_rand(3, Hkv, 6, D), idx=torch.from_numpy(rng.integers(0, 3, B)))
        calls.clear()
        _check_against_reference(c, "torch", torch.float32)
        if joint:
            assert calls == [(6 + S, False)], calls  # forward: one call on all 6 + S keys
        else:
            assert (6, False) in calls and any(n < 6 + S for n, _ in calls) and len(calls) >= 2, calls


@pytest.mark.parametrize("P,S,grad,joint", [(10, 128, True, True), (32, 128, True, False), (10, 128, False, True),
                                             (32, 128, False, False), (10, 133, False, True), (32, 133, True, True)])
def test_causal_joint_or_split_rule(P, S, grad, joint, monkeypatch):
    """Short causal keys: S == L and P >= L / 4 split into a prefix part and an is_causal part, otherwise one
    joint call, with or without autograd.  The call pattern follows the rule, and the result matches the
    other pattern's."""
    calls = []
    real = ta._FLASH
    monkeypatch.setattr(ta, "_FLASH", lambda *a, **kw: calls.append((a[1].shape[2], a[4])) or real(*a, **kw))
    torch.manual_seed(1)
    B, H, L, D = 2, 2, 128, 16
    q, k, v = _rand(B, H, L, D, grad=grad), _rand(B, H, S, D, grad=grad), _rand(B, H, S, D, grad=grad)
    pk, pv = _rand(H, P, D, grad=grad), _rand(H, P, D, grad=grad)
    out = prefix_attention(q, k, v, pk, pv, causal=True, backend="torch")
    assert calls == ([(P + S, False)] if joint else [(P, False), (S, True)]), calls
    monkeypatch.setattr(ta, "_SPLIT_PREFIX_FRACTION", 0.0 if joint else float("inf"))
    monkeypatch.setattr(ta, "_JOINT_CAUSAL_KEYS", 0 if joint else 1024)
    calls.clear()
    with torch.enable_grad():
        other = prefix_attention(q.detach().requires_grad_(), k, v, pk, pv, causal=True, backend="torch")
    assert len(calls) == (2 if joint else 1), calls
    torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-6)


def test_fused_nan_rows_the_kernel_zeroes_come_out_nan():
    """A NaN q row, and a P = 1 prefix holding NaN: the flash kernel returns zeros with lse 0 there
    (all scores NaN read as 'fully masked'); the op detects it and gives the reference's NaN."""
    torch.manual_seed(0)
    q, k, v = _rand(2, 2, 4, 16, grad=False), _rand(2, 1, 6, 16, grad=False), _rand(2, 1, 6, 16, grad=False)
    pk, pv = _rand(1, 1, 16, grad=False), _rand(1, 1, 16, grad=False)
    qn = q.clone()
    qn[1, 0, 2] = float("nan")
    pkn = pk.clone()
    pkn[0, 0, 3] = float("nan")
    for args in ((qn, k, v, pk, pv), (q, k, v, pkn, pv)):
        for causal in (False, True):
            out = prefix_attention(*args, causal=causal, backend="torch")
            ref, _ = prefix_attention_reference(*(t.double() for t in args[:3]), args[3].double()[None],
                                                args[4].double()[None], causal=causal)
            assert torch.isnan(ref).any()
            assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("layout", ["contig", "blhd"])
def test_out_in_the_op_layout_on_every_path_and_fake_agrees(layout, monkeypatch):
    """The backend itself returns out with the strides of ops.layout.empty_output ([B, L, H, D] storage,
    so the op layer's conform makes no copy and transformers' transpose(1, 2).contiguous() is free), on
    every path (joint, split, blockwise with dropout), whatever q's layout; the fake agrees."""
    B, H, L, D = 2, 3, 5, 16
    q = torch.randn(B, L, H, D).transpose(1, 2) if layout == "blhd" else torch.randn(B, H, L, D)
    k, v = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)
    pk, pv = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    idx = torch.zeros(B, dtype=torch.long)
    want = empty_output(q).stride()
    for causal, dropout, joint_keys in ((False, 0.0, 1024), (True, 0.0, 1024), (True, 0.0, 0), (True, 0.2, 1024)):
        monkeypatch.setattr(ta, "_JOINT_CAUSAL_KEYS", joint_keys)  # 0: the split (prefix part + causal part)
        out, _ = ta.attention_forward(q, k, v, pk, pv, idx, None, causal=causal, scale=0.25,
                                      dropout_p=dropout, seed=3)
        assert out.stride() == want, (causal, dropout, out.stride())
        out = prefix_attention(q, k, v, pk[0], pv[0], causal=causal, dropout_p=dropout, backend="torch")
        assert out.stride() == want, (causal, dropout, out.stride())
    args = (q.requires_grad_(), k, v, pk, pv, idx, None, None, True, 0.25, 0.0, True, "torch")
    torch.library.opcheck(_prefix_attention_fwd, args)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_memory_is_bounded_in_length(causal, monkeypatch):
    """Dropout (blockwise path), L = S = 3000: one row's [L, S] score block would have 9M elements;
    no score-sized product (every temporary of the path is one) exceeds _BLOCK_ELEMENTS (2M).
    Counted on torch.matmul outputs: resident-set peaks are allocator noise at this size."""
    sizes = []
    real = torch.matmul

    def counting(a, b, *args, **kw):
        out = real(a, b, *args, **kw)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", counting)
    L, D = 3000, 16
    q, k, v = _rand(1, 1, L, D), _rand(1, 1, L, D), _rand(1, 1, L, D)
    out = prefix_attention(q, k, v, dropout_p=0.1, causal=causal, backend="torch")
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert sizes and max(sizes) <= ta._BLOCK_ELEMENTS < L * L, (max(sizes), ta._BLOCK_ELEMENTS)
    assert len(sizes) > 10  # several blocks, not one [L, S] product


# (B, Hq, Hkv, L, P, D, causal, padded, prefix form); ragged sizes on purpose
RAGGED_CASES = [
    (2, 4, 2, 37, 11, 64, True, False, "shared"),
    (3, 6, 2, 29, 7, 80, True, True, "shared"),
    (3, 4, 4, 23, 9, 96, False, True, "per-row"),
    (4, 4, 1, 17, 5, 112, True, True, "multi-task"),
    (2, 4, 4, 33, 0, 64, False, True, "none"),
]


def _ragged_case(case, dtype):
    B, Hq, Hkv, L, P, D, causal, padded, form = case
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
    T = {"shared": 1, "per-row": B, "multi-task": 2, "none": 0}[form]
    idx = {"shared": torch.zeros(B, dtype=torch.long), "per-row": torch.arange(B),
           "multi-task": torch.tensor([1, 0, 1, 1][:B]), "none": None}[form]
    pk, pv = (rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)) if T else (None, None)
    mask = None
    if padded:
        mask = torch.rand(B, L, generator=g) > 0.3
        mask[:, -1] = True
        if form == "none":
            mask[1] = False  # a row that sees nothing: zeros, never NaN
    out = prefix_attention(q, k, v, pk, pv, prefix_index=None if form in ("shared", "none") else idx,
                           causal=causal, key_padding_mask=mask, backend="torch") if form != "shared" else \
        prefix_attention(q, k, v, pk[0], pv[0], causal=causal, key_padding_mask=mask, backend="torch")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    got = [out, *torch.autograd.grad(out, leaves, dout)]

    def ref(cast, fn=prefix_attention_reference):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        pkk, pvv = (ls[3], ls[4]) if T else (None, None)
        o = fn(ls[0], ls[1], ls[2], pkk, pvv, idx if T else None, mask, causal=causal)
        o = o[0] if isinstance(o, tuple) else o
        return [o, *torch.autograd.grad(o, ls, dout.to(cast))]

    return got, ref(dtype), ref(dtype, sdpa_concat_baseline), ref(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", RAGGED_CASES)
def test_fused_path_ragged_cases_meet_tolerance_rule(case, dtype):
    """Ragged L / P, D = 80 / 96 / 112, GQA, every prefix form (formerly the bench's experimental backend)."""
    got, plain, sdpa, ref64 = _ragged_case(case, dtype)
    assert not torch.isnan(got[0]).any()
    for name, a, p, sd, r in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], got, plain, sdpa, ref64):
        c = compare(name, a, [p, sd], r)
        assert c.ok, f"{case} {dtype}: {c}"


def test_mask_cache_follows_the_padding_mask_content(monkeypatch):
    """The additive mask is built once for equal arguments (every layer of a forward) and rebuilt when the
    key-padding mask's content differs, including a mask edited in place: results never come from a stale mask."""
    builds = []
    real = ta._build_causal_mask
    monkeypatch.setattr(ta, "_build_causal_mask", lambda *a: builds.append(1) or real(*a))
    monkeypatch.setattr(ta, "_MASK_CACHE", {})
    torch.manual_seed(3)
    B, H, L, P, D = 2, 2, 16, 2, 8  # P < L / 4: the joint call with a dense causal mask
    q, k, v = _rand(B, H, L, D, grad=False), _rand(B, H, L, D, grad=False), _rand(B, H, L, D, grad=False)
    pk, pv = _rand(H, P, D, grad=False), _rand(H, P, D, grad=False)
    kpm = torch.ones(B, L, dtype=torch.bool)

    def run(mask):
        out = prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="torch")
        ref, _ = prefix_attention_reference(q.double(), k.double(), v.double(), pk.double()[None],
                                            pv.double()[None], causal=True, key_padding_mask=mask)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        return out

    first = run(kpm)
    again = run(kpm.clone())  # equal content, another tensor: a hit
    assert len(builds) == 1 and torch.equal(first, again)
    kpm[1, 3:9] = False  # edited in place: a miss, and the new padding is honoured
    edited = run(kpm)
    assert len(builds) == 2 and not torch.equal(first, edited)
    run(None)  # no padding: its own entry
    assert len(builds) == 3
    # held elements are bounded: room for less than the [B, 1, L, P + S] and [1, 1, L, P + S] masks together
    monkeypatch.setattr(ta, "_MASK_CACHE_ELEMENTS", (B + 1) * L * (P + L) - 1)
    kpm[0, 5] = False
    run(kpm)  # a new padding mask: built, and the no-padding entry is evicted to make room
    assert len(builds) == 4 and sum(m.numel() for _, m in ta._MASK_CACHE.values()) <= ta._MASK_CACHE_ELEMENTS
    run(None)
    assert len(builds) == 5
