"""PrefixEncoder: outputs vs the float64 reference, and eval-cache coherence under random writes."""
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from softprompt_kernels.prefix_encoder import PrefixEncoder
from softprompt_kernels.reference.mlp import prefix_mlp_reference
from softprompt_kernels.testing import compare

from .strategies import DTYPES, examples


@st.composite
def encoders(draw):
    H = draw(st.integers(1, 3))
    return dict(num_virtual_tokens=draw(st.sampled_from([1, 3, 8, 21])), token_dim=H * draw(st.sampled_from([4, 8, 16])),
                num_layers=draw(st.integers(1, 3)), num_kv_heads=H,
                prefix_projection=draw(st.booleans()), encoder_hidden_size=draw(st.sampled_from([5, 16, 24])),
                activation=draw(st.sampled_from(["tanh", "relu", "gelu", "identity"])),
                dtype=draw(st.sampled_from(["float32", "float64", "bfloat16"])), backend="torch")


def _build(cfg, seed):
    torch.manual_seed(seed)
    kw = dict(cfg, dtype=DTYPES[cfg["dtype"]])
    if not kw["prefix_projection"]:
        kw.pop("encoder_hidden_size")
    return PrefixEncoder(**kw)


def _reference(enc, cast):
    e = enc
    P, L, H, D = e.num_virtual_tokens, e.num_layers, e.num_kv_heads, e.head_dim
    if not e.prefix_projection:
        return e.embedding.weight.detach().to(cast).view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)
    f, t = e.transform[0], e.transform[2]
    return prefix_mlp_reference(*(p.detach().to(cast) for p in (e.embedding.weight, f.weight, f.bias, t.weight, t.bias)),
                                num_layers=L, num_kv_heads=H, head_dim=D, activation=e.activation)


@settings(max_examples=examples(20))
@given(encoders(), st.integers(0, 2**31 - 1))
def test_fuzz_encoder_matches_reference(cfg, seed):
    note(repr(cfg))
    enc = _build(cfg, seed)
    out = enc()
    assert out.shape == (enc.num_layers, 2, enc.num_kv_heads, enc.num_virtual_tokens, enc.head_dim)
    c = compare("prefix", out, _reference(enc, out.dtype), _reference(enc, torch.float64))
    assert c.ok, f"{cfg} seed={seed}: {c}"


WRITES = ["data_mul", "data_copy", "data_setitem", "inplace_nograd", "load_state_dict", "edit_result", "none"]


@settings(max_examples=examples(12))
@given(encoders(), st.lists(st.tuples(st.sampled_from(WRITES), st.integers(0, 10), st.booleans()), min_size=1,
                            max_size=6), st.integers(0, 2**31 - 1))
def test_fuzz_encoder_eval_cache_never_stale(cfg, writes, seed):
    """Random parameter writes (through .data too) between eval calls, some under inference_mode:
    every call equals a fresh computation, and editing a returned tensor changes nothing later."""
    note(f"{cfg} {writes}")
    enc = _build(cfg, seed).eval()
    enc.requires_grad_(False)
    fresh = _build(cfg, seed).eval()
    for what, which, inference in writes:
        params = list(enc.parameters())
        p = params[which % len(params)]
        if what == "data_mul":
            p.data.mul_(1.5)
        elif what == "data_copy":
            p.data.copy_(torch.randn_like(p))
        elif what == "data_setitem":
            p.data[0] = 0.25
        elif what == "inplace_nograd":
            with torch.no_grad():
                p.add_(0.5)
        elif what == "load_state_dict":
            enc.load_state_dict({k: v * 0.5 for k, v in enc.state_dict().items()})
        fresh.load_state_dict(enc.state_dict())
        ctx = torch.inference_mode() if inference else torch.no_grad()
        with ctx:
            got = enc()
            fresh.clear_cache()
            expect = fresh()
        assert torch.equal(got, expect), f"stale after {what}"
        if not inference:
            assert not got.is_inference()
            if what == "edit_result" and enc.prefix_projection:
                got.mul_(0.0)  # the caller edits its result: later calls must not see it
                assert torch.equal(enc(), expect)
