"""GPU runtime tests of the CUDA backend (csrc/) against the float64 reference.

Tolerance rule of DESIGN.md §4 on out, lse and every gradient; odd sizes (L, S, P not
multiples of any tile; D = 80, 96, 112), GQA/MQA, all prefix forms, non-contiguous
inputs, fully masked rows, deterministic and atomic prefix reductions, the prefix MLP.
Output memory is poisoned with NaN before each kernel (through the caching allocator).
Skipped with a reason when no GPU / CUDA toolchain is present.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from softprompt_kernels.cuda._testing import CASES, Case, check_attention, make_inputs
from softprompt_kernels.testing import assert_close

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU (torch.cuda.is_available() is False): CUDA runtime tests skipped", allow_module_level=True)

from softprompt_kernels.cuda import _build  # noqa: E402

_problem = _build.toolchain_problem()
if _problem is not None:
    pytest.skip(f"CUDA backend unavailable: {_problem}", allow_module_level=True)

from softprompt_kernels.cuda import prefix_attention as cuda_attn  # noqa: E402
from softprompt_kernels.cuda import prefix_mlp as cuda_mlp  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _poison():
    """Fill freed cached blocks with NaN so that an unwritten output element shows."""
    blocks = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def _fwd(q, k, v, pk, pv, idx, kpm, causal, scale, dropout_p=0.0, dseed=0):
    _poison()
    return cuda_attn.attention_forward(q, k, v, pk, pv, idx, kpm, causal=causal, scale=scale, dropout_p=dropout_p,
                                       seed=dseed)


def _bwd_factory(deterministic_override=None):
    def _bwd(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal, scale, dropout_p, dseed, deterministic):
        _poison()
        det = deterministic if deterministic_override is None else deterministic_override
        return cuda_attn.attention_backward(dout, q, k, v, pk, pv, idx, kpm, out, lse, causal=causal, scale=scale,
                                            dropout_p=dropout_p, seed=dseed, deterministic=det)
    return _bwd


@pytest.fixture(scope="module", autouse=True)
def _built():
    _build.load()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_matches_reference(case, dtype):
    check_attention(_fwd, _bwd_factory(), case, dtype, "cuda", seed=zlib.crc32(str(case).encode()) % 1000)
    torch.cuda.synchronize()


@pytest.mark.parametrize("case", [c for c in CASES if c.form != "none"][:3], ids=str)
def test_atomic_prefix_reduction(case):
    check_attention(_fwd, _bwd_factory(False), case, torch.float16, "cuda")


def test_deterministic_mode_is_bitwise_reproducible():
    case = Case(4, 8, 2, 45, 45, 33, 64, causal=True, mask=True, form="multi")
    inp = make_inputs(case, torch.bfloat16, "cuda", seed=3)
    args = (inp["q"], inp["k"], inp["v"], inp["pk"], inp["pv"], inp["idx"], inp["kpm"])
    out, lse = _fwd(*args, True, 0.125, 0.1, 7)
    runs = [_bwd_factory()(inp["dout"], *args, out, lse, True, 0.125, 0.1, 7, True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_public_op_with_backend_cuda():
    from softprompt_kernels import prefix_attention

    case = CASES[0]
    inp = make_inputs(case, torch.float16, "cuda", seed=5)
    q = inp["q"].requires_grad_(True)
    pk = inp["pk"][0].requires_grad_(True)  # shared [Hkv, P, D] form
    out = prefix_attention(q, inp["k"], inp["v"], pk, inp["pv"][0], causal=True, backend="cuda")
    ref = prefix_attention(q.detach().float(), inp["k"].float(), inp["v"].float(), pk.detach().float(),
                           inp["pv"][0].float(), causal=True, backend="torch")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.backward(inp["dout"])
    assert q.grad is not None and pk.grad is not None and pk.grad.shape == pk.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=str)
def test_attention_dropout_matches_reference(case, dtype):
    check_attention(_fwd, _bwd_factory(), case, dtype, "cuda", seed=2, dropout_p=0.17,
                    keep_mask=cuda_attn.dropout_keep_mask)


def test_dropout_keep_mask_is_what_the_kernel_draws():
    """With V = identity rows and one query, out[c] = P_c * keep_c / (1 - p): the mask shows."""
    B, Hq, L, P, S, D, p = 2, 3, 1, 5, 11, 16, 0.4
    q = torch.zeros(B, Hq, L, D, device="cuda")
    v = torch.zeros(B, Hq, S, D, device="cuda")
    pv = torch.zeros(1, Hq, P, D, device="cuda")
    pv[0, :, torch.arange(P), torch.arange(P)] = 1.0
    v[:, :, torch.arange(S), P + torch.arange(S)] = 1.0
    idx = torch.zeros(B, dtype=torch.int64, device="cuda")
    out, _ = _fwd(q, torch.zeros_like(v), v, torch.zeros_like(pv), pv, idx, None, False, 1.0, p, 99)
    keep = cuda_attn.dropout_keep_mask(99, B, Hq, L, P, S, p, "cuda")
    expect = keep[..., :D].float() / (P + S) / (1 - p)
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ prefix MLP
def _mlp_reference(x, w1, b1, w2, b2, NL, Hkv, D, act, dout):
    from softprompt_kernels.reference import prefix_mlp_reference

    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w1, b1, w2, b2)]
    out = prefix_mlp_reference(*leaves, num_layers=NL, num_kv_heads=Hkv, head_dim=D, activation=act)
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, live, dout.to(out.dtype)))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,bias", [("tanh", True), ("gelu", False), ("relu", True), ("identity", True)])
def test_prefix_mlp_matches_reference(dtype, act, bias):
    P, E, H1, NL, Hkv, D = 37, 72, 100, 3, 2, 80
    gen = torch.Generator().manual_seed(11)
    mk = lambda *s, scale=1.0: (torch.randn(s, generator=gen) * scale).to("cuda", dtype)  # noqa: E731
    x, w1, w2 = mk(P, E), mk(H1, E, scale=E ** -0.5), mk(NL * 2 * Hkv * D, H1, scale=H1 ** -0.5)
    b1 = mk(H1) if bias else None
    b2 = mk(NL * 2 * Hkv * D) if bias else None
    dout = mk(NL, 2, Hkv, P, D)
    _poison()
    out, pre = cuda_mlp.mlp_forward(x, w1, b1, w2, b2, num_layers=NL, num_kv_heads=Hkv, head_dim=D, activation=act)
    _poison()
    grads = cuda_mlp.mlp_backward(dout, x, w1, b1, w2, pre, has_b2=b2 is not None, num_layers=NL,
                                  num_kv_heads=Hkv, head_dim=D, activation=act)
    up = [t.double() if t is not None else None for t in (x, w1, b1, w2, b2)]
    out64, g64 = _mlp_reference(*up, NL, Hkv, D, act, dout.double())
    outlp, glp = _mlp_reference(x, w1, b1, w2, b2, NL, Hkv, D, act, dout)
    assert out.is_contiguous() and out.shape == (NL, 2, Hkv, P, D)
    assert_close("mlp out", out, outlp, out64)
    order = [0, 1, 2, 3, 4]  # dx, dw1, db1, dw2, db2
    for name, i in zip(["dx", "dw1", "db1", "dw2", "db2"], order):
        if g64[i] is None:
            assert grads[i] is None, name
        else:
            assert_close(f"mlp {name}", grads[i], glp[i], g64[i])


# tensor-core forward and backward (csrc/prefix_attention_{fwd,bwd}_tc.cu): the same ragged cases as the emulation
_TC_CASES = [
    Case(2, 4, 2, 70, 131, 67, 64, causal=True, mask=True, form="multi"),
    Case(1, 2, 1, 130, 130, 3, 128, causal=True, mask=False, layout="blhd"),
    Case(2, 2, 2, 65, 65, 0, 128, causal=False, mask=True, form="none", empty_row=True),
    Case(1, 3, 3, 1, 77, 64, 96, causal=True, mask=True, form="per_row"),
    Case(2, 8, 2, 1000, 1000, 100, 128, causal=True, mask=True, form="shared"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _TC_CASES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.17])
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_tensor_core_forward_backward_match_reference(case, dtype, dropout_p, deterministic):
    from softprompt_kernels.cuda import last_path

    if _build.cutlass_include_dir() is None:
        pytest.skip(_build.CUTLASS_HINT)
    cap = torch.cuda.get_device_capability()
    want = "tensor_core" if cap[0] >= 8 else "simt: GPU below sm_80"

    def fwd(*args):
        out = _fwd(*args)
        assert last_path() == want, last_path()
        return out

    def bwd(*args):
        grads = _bwd_factory(deterministic)(*args)
        assert last_path("bwd") == want, last_path("bwd")
        return grads

    check_attention(fwd, bwd, case, dtype, "cuda", seed=7, dropout_p=dropout_p,
                    keep_mask=cuda_attn.dropout_keep_mask if dropout_p else None)
    torch.cuda.synchronize()
