"""PrefixEncoder: PEFT state-dict compatibility, PEFT's numbers, eval caching, merge, batch independence."""
import pytest
import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder
from torch.utils.flop_counter import FlopCounterMode

from softprompt_kernels.prefix_encoder import PrefixEncoder

P, L, H, D, H1 = 5, 2, 2, 16, 24  # token_dim = H * D = 32


def _config(prefix_projection=True, **kw):
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=H * D, num_layers=L,
                              num_attention_heads=H, encoder_hidden_size=H1, prefix_projection=prefix_projection,
                              **kw)


def _peft_prompt(peft_enc, batch):
    """PEFT's get_prompt math: [B, P] tokens -> per-layer [2, B, H, P, D] stacked to [L, 2, B, H, P, D]."""
    tokens = torch.arange(P).unsqueeze(0).expand(batch, -1)
    kv = peft_enc(tokens).view(batch, P, L * 2, H, D).permute(2, 0, 3, 1, 4).split(2)
    return torch.stack(kv)


@pytest.mark.parametrize("projection", [True, False])
def test_peft_state_dict_loads_and_matches(projection):
    torch.manual_seed(0)
    cfg = _config(projection)
    peft_enc = PeftPrefixEncoder(cfg)
    if projection:  # PEFT's default init keeps weights random; make the bias nonzero too
        torch.nn.init.normal_(peft_enc.transform[2].bias)
    ours = PrefixEncoder.from_peft_config(cfg)
    sd = peft_enc.state_dict()
    assert list(ours.state_dict()) == list(sd)
    ours.load_state_dict(sd, strict=True)
    out = ours()
    assert out.shape == (L, 2, H, P, D)
    ref = _peft_prompt(peft_enc, batch=1)[:, :, 0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if not projection:  # a view of the embedding, no copy
        assert out.untyped_storage().data_ptr() == ours.embedding.weight.untyped_storage().data_ptr()
    # gradients: PEFT at batch 1 == ours
    g = torch.randn(L, 2, H, P, D)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for (n, a), b in zip(ours.named_parameters(), peft_enc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_constructor_and_peft_inference_mode():
    cfg = _config(True, inference_mode=True)  # PEFT builds no projection in inference mode
    assert list(PrefixEncoder.from_peft_config(cfg).state_dict()) == list(PeftPrefixEncoder(cfg).state_dict())
    zero = PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1, init_weights="zero")
    assert torch.count_nonzero(zero()) == 0
    with pytest.raises(ValueError, match="token_dim"):
        PrefixEncoder(P, 30, L, 4)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixEncoder(P, H * D, L, H, prefix_projection=True)
    with pytest.raises(ValueError, match="activation"):
        PrefixEncoder(P, H * D, L, H, activation="swish")


def test_eval_cache_until_parameters_change(monkeypatch):
    torch.manual_seed(0)
    enc = PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1)
    calls = []
    real = enc._compute
    monkeypatch.setattr(enc, "_compute", lambda: calls.append(1) or real())
    enc.train()
    enc(), enc()
    assert len(calls) == 2  # training: always recomputed
    enc.eval()
    with torch.no_grad():
        a = enc()
        a2 = enc()  # cached (no recomputation), but a fresh copy each call
        assert a2 is not a and torch.equal(a2, a) and len(calls) == 3
        enc.transform[2].bias.add_(1.0)  # in-place update -> _version changes
        b = enc()
    assert len(calls) == 4 and b is not a
    torch.testing.assert_close(b, a + 1.0)
    b2 = enc()  # eval with autograd on but parameters requiring grad: no caching (fresh graph)
    assert len(calls) == 5 and b2.requires_grad
    enc.requires_grad_(False)
    c = enc()
    assert torch.equal(enc(), c) and len(calls) == 6
    enc.load_state_dict({k: v + 1 for k, v in enc.state_dict().items()})
    assert enc() is not c and len(calls) == 7


def test_merge_freezes_output():
    torch.manual_seed(0)
    enc = PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1)
    keys = list(enc.state_dict())
    expected = enc().detach().clone()
    merged = enc.merge()
    assert merged.is_contiguous() and not merged.requires_grad
    assert list(enc.state_dict()) == keys  # the frozen prefix is not part of the checkpoint
    with torch.no_grad():
        enc.transform[0].weight.mul_(2.0)
    enc.train()
    assert enc() is merged
    torch.testing.assert_close(merged, expected)
    flat = enc.peft_flat_prefix()
    assert flat.shape == (P, L * 2 * H * D)
    torch.testing.assert_close(flat.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4), expected)
    enc.unmerge()
    assert not torch.allclose(enc(), expected)


def _saved_bytes(fn, params):
    """Bytes of non-parameter tensors saved for backward while fn() runs, + output bytes."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()) + out.numel() * out.element_size()


def _flops_and_bytes(fn, params):
    with FlopCounterMode(display=False) as fc:
        out, nbytes = _saved_bytes(fn, params)
        out.float().square().sum().backward()
    return fc.get_total_flops(), nbytes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cost_does_not_grow_with_batch(backend):
    """Our encoder's fwd+bwd FLOPs and held memory are batch-free; PEFT's batch-expanded path grows ~B x."""
    torch.manual_seed(0)
    cfg = _config(True)
    peft_enc = PeftPrefixEncoder(cfg)
    ours = PrefixEncoder.from_peft_config(cfg, backend=backend)
    ours.load_state_dict(peft_enc.state_dict())
    N = L * 2 * H * D
    analytic = 3 * (2 * P * (H * D) * H1 + 2 * P * H1 * N)  # forward + 2x forward for backward
    costs = {}
    for batch in (1, 8):
        # serving a batch of `batch` rows: our prefix is computed once (prefix_attention broadcasts it)
        costs["ours", batch] = _flops_and_bytes(lambda: ours(), list(ours.parameters()))
        costs["peft", batch] = _flops_and_bytes(lambda: _peft_prompt(peft_enc, batch), list(peft_enc.parameters()))
    assert costs["ours", 1] == costs["ours", 8]
    assert costs["ours", 1][0] == analytic
    peft_f1, peft_m1 = costs["peft", 1]
    peft_f8, peft_m8 = costs["peft", 8]
    assert peft_f1 == pytest.approx(analytic, rel=0.01)  # same GEMMs at batch 1 (x's grad not needed there)
    assert peft_f8 >= 7.5 * peft_f1 and peft_m8 >= 7.5 * peft_m1
    assert costs["ours", 8][1] * 7 < peft_m8


# ---------------------------------------------------------------- issue 10 item 4 / 6
def _eval_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    enc = PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1, **kw).eval()
    enc.requires_grad_(False)
    return enc


@pytest.mark.parametrize("write", ["mul_", "copy_", "setitem", "embedding_setitem"])
def test_issue10_item4_cache_not_stale_after_data_writes(write):
    enc = _eval_encoder()
    a = enc().clone()
    w = enc.transform[0].weight
    if write == "mul_":
        w.data.mul_(2.0)
    elif write == "copy_":
        w.data.copy_(torch.randn_like(w))
    elif write == "setitem":
        w.data[1] = 3.0
    else:
        enc.embedding.weight.data[0] = 5.0
    b = enc()
    enc._cache = None  # a fresh computation
    torch.testing.assert_close(b, enc())
    assert not torch.allclose(a, b)


def test_issue10_item4_cache_returns_a_fresh_tensor():
    enc = _eval_encoder()
    a = enc()
    expected = a.clone()
    a.mul_(0.0)  # the caller edits its result in place
    torch.testing.assert_close(enc(), expected)


def test_issue10_item4_inference_mode_cache_not_returned_outside():
    enc = _eval_encoder()
    with torch.inference_mode():
        a = enc()
    assert a.is_inference()
    b = enc()
    assert not b.is_inference()
    x = torch.randn(L, 2, H, P, D, requires_grad=True)
    (x * b).sum().backward()  # autograd may save b
    torch.testing.assert_close(x.grad, b)


def test_issue10_item6_float64_projection_supported_on_torch_and_refused_at_build_on_triton():
    enc = PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1, dtype=torch.float64)
    out = enc()
    assert out.dtype == torch.float64
    e = enc.embedding.weight
    f, t = enc.transform[0], enc.transform[2]
    ref = (torch.tanh(e @ f.weight.T + f.bias) @ t.weight.T + t.bias).view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1, dtype=torch.float64,
                      backend="triton")


def test_issue10_item6_bad_backend_caught_at_build():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cuda', 'torch'\)"):
        PrefixEncoder(P, H * D, L, H, prefix_projection=True, encoder_hidden_size=H1, backend="fast")
