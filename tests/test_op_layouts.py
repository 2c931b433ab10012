"""Issue 12 item 3: the op's result layouts (no copies on the hot path) and the once-per-forward
prefix_index check.  Backends: torch, and Triton under the interpreter."""
import pytest
import torch

from softprompt_kernels import prefix_attention
from softprompt_kernels.ops.prefix_attention import _prefix_attention_fwd

BACKENDS = ["torch", "triton"]


def _hf_layout(B, H, L, D, dtype=torch.float32):
    """[B, H, L, D] view of [B, L, H, D] storage, as a HF attention module makes q/k/v."""
    return torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_layout_follows_q(backend):
    """out is [B, L, H, D] storage for HF-layout or non-dense q, contiguous for a contiguous q."""
    q, k, v = _hf_layout(2, 4, 5, 16), _hf_layout(2, 2, 7, 16), _hf_layout(2, 2, 7, 16)
    pk, pv = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    out = prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)
    assert out.shape == (2, 4, 5, 16)
    assert out.transpose(1, 2).is_contiguous(), out.stride()  # integration's .contiguous() is a no-op
    dense = prefix_attention(q.contiguous(), k.contiguous(), v.contiguous(), pk, pv, causal=True, backend=backend)
    assert dense.is_contiguous(), dense.stride()  # a contiguous q gets a contiguous out (as from SDPA): no copy
    torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)  # the layout changes no number
    sliced = torch.randn(2, 5, 3, 4, 16)[:, :, 0].transpose(1, 2)  # non-dense q (a slice of a fused qkv)
    out = prefix_attention(sliced, k, v, pk, pv, causal=True, backend=backend)
    assert out.transpose(1, 2).is_contiguous(), out.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contiguous_inputs", [False, True])
def test_gradients_come_back_in_the_inputs_layouts(backend, contiguous_inputs):
    """Triton: dq/dk/dv in the layouts of q/k/v.  Torch backend (eager, CPU): as ATen's flash
    backward returns them (``[B, L | S, H, D]`` storage order, no copy), what SDPA gives too.
    Prefix gradients: the prefix's own layout on both."""
    make = (lambda *s: torch.randn(*s).requires_grad_()) if contiguous_inputs else (
        lambda B, H, L, D: _hf_layout(B, H, L, D))
    q, k, v = make(2, 4, 5, 16), make(2, 2, 7, 16), make(2, 2, 7, 16)
    pk = torch.randn(2, 3, 16).requires_grad_()
    pv = torch.randn(3, 2, 16).transpose(0, 1).requires_grad_()  # permuted prefix: its layout is kept too
    captured = {}
    hooks = [t.register_hook(lambda g, n=n: captured.__setitem__(n, g)) for n, t in
             (("q", q), ("k", k), ("v", v), ("pk", pk), ("pv", pv))]
    out = prefix_attention(q, k, v, pk, pv, backend=backend)
    out.backward(torch.randn_like(out))
    for h in hooks:
        h.remove()
    for name, t in (("pk", pk), ("pv", pv)) + ((("q", q), ("k", k), ("v", v)) if backend == "triton" else ()):
        assert captured[name].stride() == t.stride(), (name, captured[name].stride(), t.stride())
    if backend == "torch":
        assert captured["q"].transpose(1, 2).is_contiguous(), captured["q"].stride()
        for name in ("k", "v"):  # rows of H * D contiguous elements per key (a view into [B, P + S, H, D])
            g = captured[name]
            assert (g.stride(3), g.stride(1), g.stride(2)) == (1, 16, 2 * 16), (name, g.stride())


def test_fake_strides_match_the_real_ones():
    """opcheck compares the fake (meta) result strides with the real ones, for HF-layout inputs."""
    q, k, v = _hf_layout(2, 4, 5, 16), _hf_layout(2, 2, 7, 16), _hf_layout(2, 2, 7, 16)
    pk, pv = torch.randn(1, 2, 3, 16, requires_grad=True), torch.randn(1, 2, 3, 16, requires_grad=True)
    args = (q, k, v, pk, pv, torch.zeros(2, dtype=torch.long), None, None, True, 0.25, 0.0, True, "torch")
    torch.library.opcheck(_prefix_attention_fwd, args)


def test_unchecked_prefix_index_is_asserted_on_device_and_never_read_out_of_range():
    q, k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16)
    pk, pv = torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16)
    good = torch.tensor([2, 0])
    torch.testing.assert_close(
        prefix_attention(q, k, v, pk, pv, prefix_index=good, backend="torch", check_prefix_index=False),
        prefix_attention(q, k, v, pk, pv, prefix_index=good, backend="torch"))
    with pytest.raises(RuntimeError, match="prefix_index"):  # the device-side assert (synchronous on CPU)
        prefix_attention(q, k, v, pk, pv, prefix_index=torch.tensor([0, 3]), backend="torch",
                         check_prefix_index=False)


def test_prefix_state_checks_its_index_once():
    from softprompt_kernels.integrations.transformers import PrefixState

    kv = torch.randn(2, 2, 3, 1, 4, 8)  # [NL, 2, T=3, Hkv, P, D]
    PrefixState(kv, torch.tensor([0, 2, 1]), "torch")
    with pytest.raises(ValueError, match=r"\[0, T=3\).*\[0, 3\]"):
        PrefixState(kv, torch.tensor([0, 3]), "torch")


def test_integration_attention_skips_the_per_layer_host_check(monkeypatch):
    """The HF attention function calls the op with check_prefix_index=False (one check per forward)."""
    from softprompt_kernels.integrations import transformers as tr

    seen = []
    real = tr.prefix_attention
    monkeypatch.setattr(tr, "prefix_attention", lambda *a, **kw: (seen.append(kw["check_prefix_index"]),
                                                                   real(*a, **kw))[1])
    kv = torch.randn(1, 2, 2, 1, 4, 8)
    state = tr.PrefixState(kv, torch.tensor([1, 0]), "torch")
    module = torch.nn.Module()
    setattr(module, tr.LAYER_ATTR, 0)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    out, _ = tr.attention_forward(module, q, k, v, None, **{tr.PREFIX_KWARG: state})
    assert seen == [False] and out.shape == (2, 3, 2, 8) and out.is_contiguous()
