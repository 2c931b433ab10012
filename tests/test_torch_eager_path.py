"""Issue 11: the eager CPU path of backend "torch" (``_EagerTorchAttention``) against the custom op.

Both run the same backend code; the eager path saves the fused path's key parts from the
forward (no second ``[prefix, keys]`` concatenation, k and v not saved) and returns the
kernel's gradients without a layout copy. Numbers must be identical to the custom op's.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softprompt_kernels import prefix_attention
from softprompt_kernels.ops import prefix_attention as pa
from softprompt_kernels.ops import torch_attention as ta

CASES = [
    # name, B, Hq, Hkv, L, S, P, causal, padded, dtype, prefix form
    ("joint", 3, 4, 4, 9, 9, 5, False, True, torch.float32, "shared"),
    ("joint-causal", 3, 4, 2, 9, 9, 5, True, True, torch.float32, "multi"),
    ("decode-dense", 2, 4, 1, 3, 11, 4, True, False, torch.float32, "per_row"),
    ("bf16", 2, 4, 2, 7, 7, 3, True, True, torch.bfloat16, "shared"),
    ("no-prefix", 2, 2, 2, 6, 6, 0, True, True, torch.float32, "shared"),
    ("dropout", 2, 2, 2, 6, 6, 3, True, False, torch.float32, "shared"),
]


def _inputs(B, Hq, Hkv, L, S, P, padded, dtype, form, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype).requires_grad_()

    q, k, v = rnd(B, Hq, L, 16), rnd(B, Hkv, S, 16), rnd(B, Hkv, S, 16)
    kw = {}
    if form == "shared":
        pk, pv = rnd(Hkv, P, 16), rnd(Hkv, P, 16)
    elif form == "per_row":
        pk, pv = rnd(B, Hkv, P, 16), rnd(B, Hkv, P, 16)
    else:
        pk, pv = rnd(2, Hkv, P, 16), rnd(2, Hkv, P, 16)
        kw["prefix_index"] = torch.arange(B) % 2
    if padded:
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[0, -2:] = False
        kw["key_padding_mask"] = mask
    return (q, k, v, pk, pv), kw


def _run(leaves, kw, causal, dropout_p, seed=7):
    torch.manual_seed(seed)  # the dropout seed
    out = prefix_attention(*leaves, causal=causal, dropout_p=dropout_p, backend="torch", **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out,) + torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("split", [False, True], ids=["joint", "split"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_eager_path_equals_the_custom_op(case, split, monkeypatch):
    name, B, Hq, Hkv, L, S, P, causal, padded, dtype, form = case
    if split:
        monkeypatch.setattr(ta, "_JOINT_CAUSAL_KEYS", 0)  # causal: a prefix part and a sequence part
        monkeypatch.setattr(ta, "_DENSE_MASK_ELEMENTS", 0)
    leaves, kw = _inputs(B, Hq, Hkv, L, S, P, padded, dtype, form)
    dropout_p = 0.2 if name == "dropout" else 0.0
    calls = []
    real = ta.backward_from_parts
    monkeypatch.setattr(ta, "backward_from_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    eager = _run(leaves, kw, causal, dropout_p)
    assert bool(calls) == (dropout_p == 0.0), "the fused path's backward runs from the saved parts"
    monkeypatch.setattr(pa, "_eager_torch_path", lambda *a: False)
    custom = _run(leaves, kw, causal, dropout_p)
    for name_, a, b in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), eager, custom):
        assert a.shape == b.shape and a.dtype == b.dtype, name_
        assert torch.equal(a, b), (name_, (a - b).abs().max())


def test_eager_path_propagates_nan_like_the_custom_op(monkeypatch):
    leaves, kw = _inputs(2, 2, 2, 6, 6, 3, True, torch.float32, "shared")
    with torch.no_grad():
        leaves[2][1, 0, 2, 3] = float("nan")  # a visible value: NaN reaches rows of batch row 1
        leaves[1][0, 1, 5, 0] = float("inf")  # a padded key: contributes nothing
    eager = _run(leaves, kw, True, 0.0)
    assert eager[0][1].isnan().any() and not eager[0][0].isnan().any()
    monkeypatch.setattr(pa, "_eager_torch_path", lambda *a: False)
    custom = _run(leaves, kw, True, 0.0)
    for a, b in zip(eager, custom):
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def test_backward_does_not_concatenate_and_k_v_are_not_saved(monkeypatch):
    """Joint path: the [prefix, keys] K/V of the forward is saved in place of k and v, and
    the backward makes no concatenation (and no layout copy: dq is the kernel's)."""
    monkeypatch.setattr(ta, "_SPLIT_PREFIX_FRACTION", float("inf"))  # P = 5, L = 8: the joint call
    leaves, kw = _inputs(2, 4, 2, 8, 8, 5, True, torch.float32, "shared")
    q, k, v = leaves[:3]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = prefix_attention(*leaves, causal=True, backend="torch", **kw)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert k.untyped_storage().data_ptr() not in storages and v.untyped_storage().data_ptr() not in storages
    assert any(t.shape == (2, 2, 13, 16) for t in saved), [tuple(t.shape) for t in saved]  # the joint K/V
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **kw_: cats.append(1) or real_cat(*a, **kw_))
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert not cats


def test_gradient_checkpointing_recomputes_through_the_eager_path():
    from torch.utils.checkpoint import checkpoint

    leaves, kw = _inputs(2, 4, 2, 8, 8, 5, True, torch.float32, "multi")

    def f(*xs):
        return prefix_attention(*xs, causal=True, backend="torch", **kw).sin()

    plain = torch.autograd.grad(f(*leaves).sum(), leaves)
    ckpt = torch.autograd.grad(checkpoint(f, *leaves, use_reentrant=False).sum(), leaves)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_meta_tensors_see_the_custom_op():
    leaves, kw = _inputs(2, 2, 2, 5, 5, 3, False, torch.float32, "shared")
    with _OpNames() as mode:
        out = prefix_attention(*leaves, causal=True, backend="torch", **kw)
    assert any("softprompt_kernels.prefix_attention_fwd" in n for n in mode.names), mode.names
    plain = prefix_attention(*leaves, causal=True, backend="torch", **kw)
    assert torch.equal(out, plain)
    meta = [t.detach().to("meta") for t in leaves]
    assert prefix_attention(*meta, causal=True, backend="torch").device.type == "meta"
