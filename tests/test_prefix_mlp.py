"""prefix_mlp: Triton (interpreter) and torch backends vs the float64 reference (DESIGN.md §4)."""
import os

import pytest
import torch

from softprompt_kernels.ops import prefix_mlp as op_mod
from softprompt_kernels.ops.prefix_mlp import prefix_mlp, resolve_backend
from softprompt_kernels.reference.mlp import prefix_mlp_reference
from softprompt_kernels.testing import assert_close
from softprompt_kernels.triton import prefix_mlp as tri_mod


def _inputs(P, E, H1, L, H, D, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = L * 2 * H * D
    x = torch.randn(P, E, generator=g)
    w1 = torch.randn(H1, E, generator=g) / E ** 0.5
    b1 = torch.randn(H1, generator=g) * 0.5 if bias else None
    w2 = torch.randn(N, H1, generator=g) / H1 ** 0.5
    b2 = torch.randn(N, generator=g) * 0.5 if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2)]


def _fwd_bwd(fn, args, grad):
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(out.dtype))
    return out.detach(), list(gs)


def _assert_within_rule(name, got, low, ref):
    """DESIGN §4 via softprompt_kernels.testing (2x plain low-precision torch error + FA's eps)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    assert_close(name, got, low, ref)


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN."""
    monkeypatch.setattr(tri_mod, "_empty", lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype,
                                                                            device=like.device))


# (P, E, H1, L, Hkv, D, dtype, activation, bias): each activation in each dtype; ragged E / H1
# (not multiples of 16, unaligned kernel path), aligned sizes (E, H1, D multiples of 8: the
# vectorised path), D = 80 (two D-chunks), P = 1, 5, 37, 200 (several row tiles).
CASES = [
    (1, 24, 40, 1, 2, 16, torch.float32, "tanh", True),
    (5, 20, 36, 2, 1, 80, torch.float32, "relu", False),
    (37, 64, 72, 1, 2, 80, torch.float32, "gelu", True),
    (200, 13, 30, 1, 1, 24, torch.float32, "identity", True),
    (37, 50, 70, 1, 2, 80, torch.float16, "tanh", True),
    (5, 64, 64, 2, 1, 80, torch.float16, "relu", True),
    (200, 24, 40, 1, 1, 32, torch.float16, "gelu", False),
    (1, 21, 33, 1, 1, 80, torch.float16, "identity", True),
    (5, 64, 96, 1, 2, 80, torch.bfloat16, "tanh", True),
    (37, 50, 70, 1, 1, 16, torch.bfloat16, "relu", True),
    (1, 40, 48, 2, 1, 64, torch.bfloat16, "gelu", True),
    (200, 30, 46, 1, 1, 80, torch.bfloat16, "identity", False),
]


@pytest.mark.parametrize("P,E,H1,L,H,D,dtype,act,bias", CASES)
def test_triton_matches_reference(poison, P, E, H1, L, H, D, dtype, act, bias):
    args = _inputs(P, E, H1, L, H, D, dtype, bias=bias, seed=P + E)
    kw = dict(num_layers=L, num_kv_heads=H, head_dim=D, activation=act)
    grad = torch.randn(L, 2, H, P, D, generator=torch.Generator().manual_seed(7))
    got, g_got = _fwd_bwd(lambda *a: prefix_mlp(*a, **kw, backend="triton"), args, grad)
    low, g_low = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw), args, grad)
    ref, g_ref = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw),
                          [a.double() if a is not None else None for a in args], grad.double())
    assert got.shape == (L, 2, H, P, D) and got.is_contiguous() and got.dtype == dtype
    _assert_within_rule("out", got, low, ref)
    names = ["dx", "dw1", "db1", "dw2", "db2"] if bias else ["dx", "dw1", "dw2"]
    for n, a, b, c in zip(names, g_got, g_low, g_ref):
        assert a.dtype == dtype
        _assert_within_rule(n, a, b, c)


def test_layout_is_peft_column_order():
    """out[l, kv, h, p, d] is column ((l*2+kv)*Hkv+h)*D + d of the second Linear, computed by hand."""
    L, H, P, D = 2, 3, 4, 8
    x, w1, b1, w2, b2 = _inputs(P, 8, 16, L, H, D, torch.float32)
    flat = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    out = prefix_mlp(x, w1, b1, w2, b2, num_layers=L, num_kv_heads=H, head_dim=D, backend="triton")
    for layer, kv, h, p, d in [(0, 0, 0, 0, 0), (1, 1, 2, 3, 7), (1, 0, 1, 2, 5), (0, 1, 2, 1, 3)]:
        c = ((layer * 2 + kv) * H + h) * D + d
        torch.testing.assert_close(out[layer, kv, h, p, d], flat[p, c], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_inputs_and_grad(backend):
    """Transposed-storage weights, a column-sliced x; non-contiguous and stride-0 (expanded) grad_out."""
    P, E, H1, L, H, D = 6, 24, 40, 1, 2, 16
    x, w1, b1, w2, b2 = _inputs(P, E, H1, L, H, D, torch.float32)
    xs = torch.cat([x, torch.zeros(P, 3)], 1)[:, :E]
    w1t, w2t = w1.T.contiguous().T, w2.T.contiguous().T
    kw = dict(num_layers=L, num_kv_heads=H, head_dim=D, activation="gelu")
    for grad in (torch.randn(L, 2, H, D, P).transpose(-1, -2), torch.ones(()).expand(L, 2, H, P, D)):
        got, g_got = _fwd_bwd(lambda *a: prefix_mlp(*a, **kw, backend=backend), [xs, w1t, b1, w2t, b2], grad)
        ref, g_ref = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw), [x, w1, b1, w2, b2], grad)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["tanh", "relu", "gelu", "identity"])
def test_torch_backend_matches_reference(act):
    P, E, H1, L, H, D = 7, 12, 20, 2, 1, 8
    args = _inputs(P, E, H1, L, H, D, torch.float64)
    kw = dict(num_layers=L, num_kv_heads=H, head_dim=D, activation=act)
    args = [a.float() for a in args]
    grad = torch.randn(L, 2, H, P, D)
    got, g_got = _fwd_bwd(lambda *a: prefix_mlp(*a, **kw, backend="torch"), args, grad)
    ref, g_ref = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw), args, grad)
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_opcheck():
    P, E, H1, L, H, D = 3, 8, 16, 1, 1, 16
    for bias in (True, False):
        x, w1, b1, w2, b2 = [a.requires_grad_() if a is not None else None
                             for a in _inputs(P, E, H1, L, H, D, torch.float32, bias=bias)]
        torch.library.opcheck(op_mod._prefix_mlp_fwd, (x, w1, b1, w2, b2, L, H, D, "tanh", "torch"))
    torch.library.opcheck(op_mod._prefix_mlp_fwd, (x, w1, b1, w2, b2, L, H, D, "gelu", "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    P, E, H1, L, H, D = 5, 16, 24, 2, 1, 16
    args = [a.requires_grad_() for a in _inputs(P, E, H1, L, H, D, torch.float32)]
    kw = dict(num_layers=L, num_kv_heads=H, head_dim=D, activation="tanh")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w1, b1, w2, b2):
        out = prefix_mlp(x, w1, b1, w2, b2, **kw)
        return out[:, 0].square().sum() + out[:, 1].sum()

    got = f(*args)
    g_got = torch.autograd.grad(got, args)
    ref = prefix_mlp_reference(*args, **kw)
    ref = ref[:, 0].square().sum() + ref[:, 1].sum()
    g_ref = torch.autograd.grad(ref, args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    x, w1, b1, w2, b2 = _inputs(4, 8, 16, 1, 2, 8, torch.float32)
    kw = dict(num_layers=1, num_kv_heads=2, head_dim=8)
    cases = [
        (ValueError, "x must have shape", dict(x=x[None])),
        (TypeError, "x must be float16", dict(x=x.to(torch.int32))),
        (ValueError, "w1 must have shape", dict(w1=w1[:, :5])),
        (ValueError, "b1 must have shape", dict(b1=b1[:3])),
        (ValueError, "w2 must have num_layers", dict(w2=w2[:7])),
        (ValueError, "w2 must have shape", dict(w2=w2[:, :5])),
        (ValueError, "b2 must have shape", dict(b2=b2[:-1])),
        (TypeError, "w2 must have x's dtype", dict(w2=w2.half())),
        (TypeError, "b1 must be a Tensor", dict(b1=3.0)),
    ]
    for exc, msg, over in cases:
        a = {**dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2), **over}
        with pytest.raises(exc, match=msg):
            prefix_mlp(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], **kw)
    with pytest.raises(ValueError, match="activation must be one of"):
        prefix_mlp(x, w1, b1, w2, b2, **kw, activation="swish")
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        prefix_mlp(x, w1, b1, w2, b2, num_layers=0, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_mlp(x, w1, b1, w2, b2, **kw, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        prefix_mlp(x, w1, b1, w2, b2, **kw, backend="cuda")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("auto", cuda) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu)
    monkeypatch.setitem(op_mod._BACKEND_MODULES, "cuda", "softprompt_kernels.cuda._no_such_module")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        op_mod._backend_module("cuda")


def test_aot_specs_cover_launch_variants():
    """Each spec names a real kernel argument set; 16-bit aligned specs expect wgmma."""
    specs = tri_mod.aot_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for s in specs:
        params = set(s.fn.arg_names)
        assert set(s.signature) | set(s.constexprs) == params, s.name
        assert s.expect_wgmma == ("fp32" not in s.name and "unaligned" not in s.name), s.name
    assert any("dhidden[gelu][bf16]" in n for n in names) and any("prefix_mlp_out[fp16,unaligned]" == n for n in names)
    assert os.environ.get("TRITON_INTERPRET") == "1"  # the conftest flag the tests above rely on


_GPU_SCRIPT = r"""
import torch
from softprompt_kernels.ops.prefix_mlp import prefix_mlp
from softprompt_kernels.reference.mlp import prefix_mlp_reference
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for (P, E, H1, L, H, D) in [(37, 768, 512, 2, 4, 80), (5, 50, 70, 1, 2, 64)]:
        N = L * 2 * H * D
        args = [torch.randn(P, E), torch.randn(H1, E) / E ** 0.5, torch.randn(H1), torch.randn(N, H1) / H1 ** 0.5,
                torch.randn(N)]
        g = torch.randn(L, 2, H, P, D, device="cuda")
        kw = dict(num_layers=L, num_kv_heads=H, head_dim=D, activation="gelu")
        res = {}
        for name, dt, fn in [("fused", dtype, lambda *a: prefix_mlp(*a, **kw, backend="triton")),
                             ("low", dtype, lambda *a: prefix_mlp_reference(*a, **kw)),
                             ("ref", torch.float64, lambda *a: prefix_mlp_reference(*a, **kw))]:
            leaves = [a.to("cuda", dt).requires_grad_() for a in args]
            out = fn(*leaves)
            res[name] = [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(dt)))
        for i, (a, b, c) in enumerate(zip(res["fused"], res["low"], res["ref"])):
            err, base = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
            assert err <= 2 * base + 1e-3 * (1 + c.abs().max().item()), (dtype, P, i, err, base)
print("GPU-OK")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
def test_triton_on_gpu_compiled():
    """The compiled (not interpreted) kernels, in a subprocess without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "GPU-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- issue 10 item 6
def test_issue10_float64_on_torch_backend():
    x, w1, b1, w2, b2 = _inputs(4, 8, 16, 1, 2, 8, torch.float64)
    kw = dict(num_layers=1, num_kv_heads=2, head_dim=8, activation="gelu")
    got = prefix_mlp(x, w1, b1, w2, b2, **kw)  # auto -> torch for float64
    torch.testing.assert_close(got, prefix_mlp_reference(x, w1, b1, w2, b2, **kw))
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        prefix_mlp(x, w1, b1, w2, b2, **kw, backend="triton")


def test_issue10_bad_backend_caught_at_call_entry():
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_mlp(None, None, None, None, None, num_layers=1, num_kv_heads=1, head_dim=8, backend="fast")
