"""Self-check: run the ops against the float64 reference on the present device.

Prints one table row per (op, backend, dtype, case) with the worst tolerance-rule
ratio (error / bound, DESIGN.md §4) over the output and every gradient.  The baseline
error is PyTorch's own in the same dtype: for attention the larger of plain math and
``F.scaled_dot_product_attention`` on the concatenated K/V (what the op tests use; on a
CPU the fused path runs SDPA's own kernel), for the MLP plain math.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .ops.prefix_attention import prefix_attention
from .ops.prefix_mlp import prefix_mlp
from .reference import prefix_attention_reference, prefix_mlp_reference
from .testing import compare, sdpa_concat_baseline

# (B, Hq, Hkv, L, S, P, D, causal, padded) -- ragged on purpose
ATTENTION_CASES = [
    (2, 4, 2, 37, 37, 11, 64, True, False),
    (2, 2, 1, 19, 45, 0, 80, True, True),
    (3, 4, 4, 23, 23, 130, 96, False, True),
]

# (P, E, H1, num_layers, Hkv, D, activation) -- ragged on purpose
MLP_CASES = [
    (37, 48, 70, 3, 2, 80, "tanh"),
    (5, 33, 50, 2, 3, 64, "gelu"),
]


@dataclass
class Row:
    op: str
    backend: str
    device: str
    dtype: str
    case: str
    worst: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0


def _attention_case(case, dtype, device, backend) -> Row:
    B, Hq, Hkv, L, S, P, D, causal, padded = case
    g = torch.Generator(device="cpu").manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    pk, pv = (rnd(Hkv, P, D), rnd(Hkv, P, D)) if P else (None, None)
    mask = None
    if padded:
        mask = torch.rand(B, S, generator=g) > 0.25
        mask[:, -1] = True
        mask = mask.to(device)
    t0 = time.perf_counter()
    out = prefix_attention(q, k, v, pk, pv, causal=causal, key_padding_mask=mask, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    leaves = [t for t in (q, k, v, pk, pv) if t is not None]
    grads = torch.autograd.grad(out, leaves, dout)
    seconds = time.perf_counter() - t0

    def run_ref(cast, fn=prefix_attention_reference):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        qq, kk, vv = ls[:3]
        ppk, ppv = (ls[3][None], ls[4][None]) if P else (None, None)
        idx = torch.zeros(B, dtype=torch.long, device=device) if P else None
        o = fn(qq, kk, vv, ppk, ppv, idx, mask, causal=causal)
        o = o[0] if isinstance(o, tuple) else o
        return [o, *torch.autograd.grad(o, ls, dout.to(cast))]

    ref64 = run_ref(torch.float64)
    baselines = list(zip(run_ref(dtype), run_ref(dtype, sdpa_concat_baseline)))  # per tensor: (plain, SDPA)
    worst = _worst(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], [out, *grads], baselines, ref64)
    shape = f"B{B} Hq{Hq}/{Hkv} L{L} S{S} P{P} D{D}{' causal' if causal else ''}{' pad' if padded else ''}"
    return Row("prefix_attention", backend, str(device), str(dtype).replace("torch.", ""), shape, worst, seconds)


def _mlp_case(case, dtype, device, backend) -> Row:
    P, E, H1, layers, Hkv, D, act = case
    g = torch.Generator(device="cpu").manual_seed(4321)
    N = layers * 2 * Hkv * D

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    leaves = [rnd(P, E), rnd(H1, E, scale=E ** -0.5), rnd(H1), rnd(N, H1, scale=H1 ** -0.5), rnd(N)]
    kw = dict(num_layers=layers, num_kv_heads=Hkv, head_dim=D, activation=act)
    t0 = time.perf_counter()
    out = prefix_mlp(*leaves, **kw, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    seconds = time.perf_counter() - t0

    def run_ref(cast):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        o = prefix_mlp_reference(*ls, **kw)
        return [o, *torch.autograd.grad(o, ls, dout.to(cast))]

    worst = _worst(["out", "dx", "dw1", "db1", "dw2", "db2"], [out, *grads], run_ref(dtype), run_ref(torch.float64))
    shape = f"P{P} E{E} H1 {H1} layers{layers} Hkv{Hkv} D{D} {act}"
    return Row("prefix_mlp", backend, str(device), str(dtype).replace("torch.", ""), shape, worst, seconds)


def _worst(names, ours_list, plain_list, ref_list) -> float:
    """Largest error/bound ratio of the tolerance rule over several tensors (<= 1 passes); each
    ``plain_list`` entry is one baseline tensor or a tuple of them (``compare`` takes the largest error)."""
    worst = 0.0
    for name, ours, p, r in zip(names, ours_list, plain_list, ref_list):
        c = compare(name, ours, p if isinstance(p, torch.Tensor) else list(p), r)
        worst = max(worst, c.err / c.bound if c.bound > 0 else (0.0 if c.err == 0 else float("inf")))
    return worst


def run_checks(backend: str, device: str) -> list[Row]:
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    rows = [_attention_case(c, dt, device, backend) for dt in dtypes for c in ATTENTION_CASES]
    return rows + [_mlp_case(c, dt, device, backend) for dt in dtypes for c in MLP_CASES]


def print_table(rows: list[Row]) -> None:
    header = f"{'op':18} {'backend':8} {'device':7} {'dtype':9} {'case':40} {'err/bound':>10} {'time s':>8}  result"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:18} {r.backend:8} {r.device:7} {r.dtype:9} {r.case:40} {r.worst:10.3f} {r.seconds:8.3f}  "
              f"{'ok' if r.ok else 'FAIL'}")


def main(argv=None) -> int:
    """Check every backend usable here; returns a process exit code."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"softprompt-kernels self-check on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), torch {torch.__version__}")
    rows = run_checks("torch", device)
    if device == "cuda":
        rows += run_checks("triton", device)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        rows += run_checks("triton", device)
    print_table(rows)
    failed = [r for r in rows if not r.ok]
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The Triton kernels themselves, run by the interpreter in a fresh process.
        print("\nTriton kernels under TRITON_INTERPRET=1 (CPU interpreter):")
        env = dict(os.environ, TRITON_INTERPRET="1")
        code = ("import sys; from softprompt_kernels import selfcheck as s; rows = s.run_checks('triton', 'cpu'); "
                "s.print_table(rows); sys.exit(any(not r.ok for r in rows))")
        rc = subprocess.call([sys.executable, "-c", code], env=env)
        failed += ["triton"] if rc else []
    print("\nself-check:", "FAILED" if failed else "all checks passed")
    return 1 if failed else 0
