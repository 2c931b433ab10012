"""The plan of ``softprompt-kernels bench --gpu`` (``./dev gpu``): shape grid, FLOP counts, memory
estimates, the baselines' mask definitions and the stage budgets.

Everything here is pure Python / CPU torch, so that it is tested without a GPU
(``tests/test_bench_gpu.py``); ``softprompt_kernels.bench.gpu`` runs the plan on a GPU.

Grid (issue 12, item 5): bf16, S = L (training), one shared prefix ``[H, P, D]``, total tokens
``B * L = 16384`` kept constant, ``H * D = 2048`` (D=64: H=32, D=128: H=16), Hq = Hkv,
``L in {512, 2048, 8192}``, ``P in {16, 128, 512}``, ``D in {64, 128}``, causal and not: 36 cases.
``--quick``: L=2048, P=128, D=128, causal and not (2 cases).

FLOPs: ``softprompt_kernels.report.attention_flops`` (fwd = 4*B*Hq*L*(P + S_eff)*D with S_eff = S,
or S - L/2 causal; bwd = 2.5 x fwd; fwd+bwd = 3.5 x fwd).  The same count is used for every
implementation of a case (useful FLOPs; baselines that compute masked scores get no credit).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..report import Shape, attention_flops

TOTAL_TOKENS = 16 * 1024
HIDDEN = 2048                      # H * D
GRID_L = (512, 2048, 8192)
GRID_P = (16, 128, 512)
GRID_D = (64, 128)
QUICK = dict(L=(2048,), P=(128,), D=(128,))
DTYPE = "bfloat16"
ELEM_BYTES = 2
MEMORY_LIMIT_BYTES = 40 * 2**30    # every case must fit well inside an 80 GB H100

PASSES = ("fwd", "bwd", "fwd+bwd")

# (name, what it is); ours first, then the baselines.  "n/a: reason" rows where one cannot run.
IMPLS = (
    ("ours-triton", "softprompt_kernels.prefix_attention(backend='triton'), shared prefix [H, P, D]"),
    ("ours-cuda", "softprompt_kernels.prefix_attention(backend='cuda') (when the extension builds)"),
    ("sdpa-flash", "F.scaled_dot_product_attention on pre-concatenated K/V [B, H, P+L, D], FLASH_ATTENTION only; "
                   "causal: causal_lower_right(L, P+L)"),
    ("sdpa-cudnn", "F.scaled_dot_product_attention on pre-concatenated K/V, CUDNN_ATTENTION only; "
                   "causal: dense bool mask [1, 1, L, P+L]"),
    ("sdpa-efficient", "F.scaled_dot_product_attention on pre-concatenated K/V, EFFICIENT_ATTENTION only; "
                       "causal: causal_lower_right(L, P+L)"),
    ("flex", "torch.compile(flex_attention) on pre-concatenated K/V, block mask: prefix visible, "
             "causal (bottom-right) on the sequence part"),
    ("peft", "PEFT's per-layer path: prefix expand to B + torch.cat into K/V + SDPA (default dispatch) with "
             "a dense bool mask [B, 1, L, P+L] when causal (built once per forward, outside the timing)"),
)
IMPL_NAMES = tuple(n for n, _ in IMPLS)
OURS = ("ours-triton", "ours-cuda")

# Targets (issue 12): fwd+bwd time ratios, baseline time / our time.
TARGETS = (("sdpa-flash", 1.0, "fwd+bwd >= 1.0x SDPA-flash on the same total keys"),
           ("peft", 1.5, "fwd+bwd >= 1.5x PEFT's per-layer path (expand + cat + mask + SDPA)"))

# Stage budgets in seconds (the whole command: <= 8 minutes on one H100/H200).
BUDGET_TOTAL_S = 480
BUDGETS_S = {"tests": 170, "bench": 270, "write": 10}
BUDGETS_QUICK_S = {"tests": 100, "bench": 45, "write": 5}
TEST_STEP_RESERVE_S = 40           # each pytest step after the CUDA build is guaranteed this much
TEST_STEP_RESERVE_QUICK_S = 20
FLEX_BUDGET_S = 110                # torch.compile of FlexAttention per shape (fwd + bwd) is the slow part
FLEX_BUDGET_QUICK_S = 40
DO_BENCH = {"warmup": 10, "rep": 40}          # milliseconds, triton.testing.do_bench
DO_BENCH_QUICK = {"warmup": 5, "rep": 20}


@dataclass(frozen=True)
class GpuCase:
    B: int
    H: int
    L: int
    P: int
    D: int
    causal: bool

    @property
    def S(self) -> int:
        return self.L

    @property
    def name(self) -> str:
        return f"L{self.L}-P{self.P}-D{self.D}{'-causal' if self.causal else ''}"

    @property
    def shape(self) -> str:
        return f"B{self.B} H{self.H} L{self.L} P{self.P} D{self.D}{' causal' if self.causal else ''} bf16"

    def report_shape(self) -> Shape:
        return Shape(self.name, B=self.B, Hq=self.H, Hkv=self.H, L=self.L, S=self.L, P=self.P, D=self.D,
                     causal=self.causal, model="bench --gpu grid", elem_bytes=ELEM_BYTES)

    def to_json(self) -> dict:
        return {**asdict(self), "name": self.name, "shape": self.shape}


def make_case(L: int, P: int, D: int, causal: bool) -> GpuCase:
    return GpuCase(B=max(1, TOTAL_TOKENS // L), H=HIDDEN // D, L=L, P=P, D=D, causal=causal)


def grid(quick: bool = False) -> list[GpuCase]:
    """The shape grid, in run order: the target shape class (D=128, P=128) first, so that a run that
    runs out of budget has measured the most important cases."""
    Ls, Ps, Ds = (QUICK["L"], QUICK["P"], QUICK["D"]) if quick else (GRID_L, GRID_P, GRID_D)
    cases = [make_case(L, P, D, c) for D in Ds for L in Ls for P in Ps for c in (True, False)]

    def prio(c: GpuCase):
        return (c.D != 128, c.P != 128, c.L != 2048, Ls.index(c.L), Ps.index(c.P), not c.causal)
    return sorted(cases, key=prio)


def flops(case: GpuCase) -> dict:
    """FLOPs per pass, the project's convention (``report.attention_flops``)."""
    return attention_flops(case.report_shape())


def brute_force_flops(B: int, H: int, L: int, P: int, D: int, causal: bool) -> float:
    """4 * D FLOPs per visible (query, key) score, counted over the dense visibility mask (tests only)."""
    return 4.0 * D * B * H * float(dense_visibility(L, P, causal).sum())


def memory_estimate_bytes(case: GpuCase) -> int:
    """A generous upper bound of the GPU memory one case needs while any implementation runs.

    q, out, dout, dq: 4 x [B, H, L, D]; k, v, dk, dv: 4 x [B, H, L, D]; the prefix and its grads;
    concatenated K/V and their grads (baselines): 4 x [B, H, P+L, D]; the PEFT mask [B, 1, L, P+L]
    bool; fp32 lse / softmax stats 2 x [B, H, L]; plus one fp32 score matrix [B, H, L, P+L] in case a
    baseline materialises it (none of the selected kernels should) and do_bench's 256 MiB L2 flush."""
    B, H, L, P, D = case.B, case.H, case.L, case.P, case.D
    e = ELEM_BYTES
    seq = 8 * B * H * L * D * e
    prefix = 4 * H * P * D * e
    cat = 4 * B * H * (P + L) * D * e
    mask = B * L * (P + L)
    stats = 2 * B * H * L * 4
    scores = B * H * L * (P + L) * 4
    return seq + prefix + cat + mask + stats + scores + 256 * 2**20


# --------------------------------------------------------------------------- masks
def dense_visibility(L: int, P: int, causal: bool, S: Optional[int] = None) -> torch.Tensor:
    """Bool ``[L, P + S]``: prefix attention's rule written out (the reference for every baseline).

    Column c < P: prefix, always visible; column c >= P: sequence key j = c - P, visible iff
    ``j <= i + S - L`` when causal (bottom-right aligned)."""
    S = L if S is None else S
    i = torch.arange(L)[:, None]
    c = torch.arange(P + S)[None, :]
    seq_ok = (c - P <= i + S - L) if causal else torch.ones(L, P + S, dtype=torch.bool)
    return (c < P) | seq_ok


def flex_mask_mod(P: int, causal: bool, L: int, S: Optional[int] = None) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over the concatenated keys ``[prefix | sequence]``."""
    S = L if S is None else S
    off = S - L

    def mask_mod(b, h, q_idx, kv_idx):
        if not causal:
            return kv_idx >= 0          # everything visible (a tensor, as flex requires)
        return (kv_idx < P) | (kv_idx - P <= q_idx + off)
    return mask_mod


def peft_mask(B: int, L: int, P: int, causal: bool, device="cpu") -> Optional[torch.Tensor]:
    """The bool mask PEFT + transformers' SDPA path passes in every layer: ``[B, 1, L, P+L]`` when causal
    (a prefix breaks SDPA's top-left ``is_causal``), None when not causal and unpadded."""
    if not causal:
        return None
    return dense_visibility(L, P, True).to(device)[None, None].expand(B, 1, L, P + L)


def sdpa_causal_bias(L: int, P: int):
    """The SDPA flash / efficient baselines' causal mask: ``causal_lower_right(L, P + L)``."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(L, P + L)


# --------------------------------------------------------------------------- printing
def stage_budgets(quick: bool) -> dict:
    return dict(BUDGETS_QUICK_S if quick else BUDGETS_S)


def plan_lines(cases: list[GpuCase], quick: bool, impls=IMPL_NAMES) -> list[str]:
    b = stage_budgets(quick)
    flex_b = FLEX_BUDGET_QUICK_S if quick else FLEX_BUDGET_S
    db = DO_BENCH_QUICK if quick else DO_BENCH
    out = [f"plan: {'quick' if quick else 'full'} grid, {len(cases)} cases x {len(impls)} implementations x "
           f"{len(PASSES)} passes ({', '.join(PASSES)}), {DTYPE}; budget {sum(b.values())} s "
           f"(of {BUDGET_TOTAL_S} s max)",
           f"  stage 1 tests  ({b['tests']} s): build the CUDA extension (JIT, ninja), pytest -m gpu (compiled "
           "Triton vs the float64 reference), pytest tests/test_cuda_gpu.py (CUDA backend); TRITON_INTERPRET unset",
           f"  stage 2 bench  ({b['bench']} s, FlexAttention compiles within {flex_b} s): triton.testing.do_bench "
           f"medians (warmup {db['warmup']} ms, rep {db['rep']} ms) -> TFLOP/s with the FLOP count per row",
           f"  stage 3 write  ({b['write']} s): bench_results/gpu.json + gpu.md, one verdict line per target",
           "  implementations:"]
    out += [f"    {n:15} {d}" for n, d in IMPLS if n in impls]
    out.append("  targets: " + "; ".join(t for _, _, t in TARGETS))
    hdr = f"    {'case':22} {'shape':36} {'fwd GFLOP':>10} {'fwd+bwd GFLOP':>14} {'mem est GiB':>11}"
    out += ["  cases (run order):", hdr]
    for c in cases:
        f = flops(c)
        out.append(f"    {c.name:22} {c.shape:36} {f['fwd'] / 1e9:10.1f} {f['fwd+bwd'] / 1e9:14.1f} "
                   f"{memory_estimate_bytes(c) / 2**30:11.2f}")
    return out
