"""prefix_mlp vs the float64 reference on hypothesis-drawn cases (see the package docstring)."""
from contextlib import contextmanager
from dataclasses import asdict
from unittest import mock

import torch
from hypothesis import given, note, settings

from softprompt_kernels.ops.prefix_mlp import prefix_mlp
from softprompt_kernels.reference.mlp import prefix_mlp_reference
from softprompt_kernels.testing import compare

from .strategies import build_mlp_inputs, examples, mlp_cases

NAMES = ["out", "dx", "dw1", "db1", "dw2", "db2"]


@contextmanager
def _poisoned(backend):
    """Every buffer the Triton launchers allocate starts as NaN (an unwritten element shows)."""
    if backend != "triton":
        yield
        return
    from softprompt_kernels.triton import prefix_mlp as tri_mod

    nan_empty = lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)  # noqa: E731
    with mock.patch.object(tri_mod, "_empty", nan_empty):
        yield


def _fwd_bwd(fn, args, grad):
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(out.dtype))
    return [out.detach(), *gs]


def check_mlp(c, backend):
    args, grad = build_mlp_inputs(c)
    kw = dict(num_layers=c.layers, num_kv_heads=c.H, head_dim=c.D, activation=c.activation)
    with _poisoned(backend):
        ours = _fwd_bwd(lambda *a: prefix_mlp(*a, **kw, backend=backend), args, grad)
    plain = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw), args, grad)
    ref = _fwd_bwd(lambda *a: prefix_mlp_reference(*a, **kw), [a.double() if a is not None else None for a in args],
                   grad.double())
    names = [n for n in NAMES if c.bias or n not in ("db1", "db2")]
    comps = [compare(n, a, p, r) for n, a, p, r in zip(names, ours, plain, ref)]
    bad = [str(x) for x in comps if not x.ok]
    assert not bad, (f"{c}\n" + "\n".join(bad) + "\nrepro: from fuzz.test_fuzz_mlp import check_mlp; "
                     f"from fuzz.strategies import MlpCase; check_mlp(MlpCase(**{asdict(c)!r}), {backend!r})")


@settings(max_examples=examples(40))
@given(mlp_cases())
def test_fuzz_mlp_torch_backend(case):
    note(repr(case))
    check_mlp(case, "torch")


@settings(max_examples=examples(6))
@given(mlp_cases(small=True))
def test_fuzz_mlp_triton_interpreter(case):
    note(repr(case))
    check_mlp(case, "triton")
