"""prefix_attention vs the float64 reference on hypothesis-drawn cases (see the package docstring)."""
import pytest
import torch
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

from .strategies import (TORCH_EXAMPLES, TRITON_EXAMPLES, attention_cases, build_attention_inputs,
                         check_attention, examples, run_op)


FORWARD = ("out", "lse")
# Known-miss (xfail) tests stop at their first miss: no shrinking or explaining (minutes under
# the interpreter, and a patch file written into the checkout); the case is printed via note().
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@settings(max_examples=examples(TORCH_EXAMPLES))
@given(attention_cases())
def test_fuzz_torch_backend(case):
    """Everything, except the float32 gradients (strictly checked in the next test)."""
    note(case.repro("torch"))
    check_attention(case, "torch", only=FORWARD if case.dtype == "float32" else None)


# Known gap, measured (issue 10 item 8; same class as _TORCH_FP32_BACKWARD_KNOWN_MISSES in
# tests/test_prefix_attention_op.py): the float32 backward of the PyTorch CPU path sums over the
# G*L rows of a kv group in one GEMM, a different order from the reference's per-head products.
# Measured on 2026-12-02 (2 cores, survey scripts drawing from the same strategies): misses only
# on near-cancelling gradients, a fraction of an ulp of the inputs' scale:
#   1 of 60 float32 cases: dprefix_k 2.0x (err 1.3e-7 vs bound 6.3e-8; D=1, causal, per-row P=1);
#   1 of 300 mixed cases: dk 6.2x at |dk| ~ 1e-9 on unit inputs (err 7.2e-9 vs a lucky plain
#     baseline of 2.9e-10; D=1, S=1, P=17, G=4);
#   the shrunk case B=1 Hkv=1 G=2 L=1 S=6 P=0 D=112 scale=1: dq 1.5x (2.3e-6 vs 1.5e-6).
# A float64 backward passes but costs ~80 ms
# per GPT-2 layer. Not strict: which cases miss depends on the CPU's GEMM kernels.
@pytest.mark.xfail(strict=False, reason="known fp32 torch-backend backward misses on near-cancelling "
                   "gradients (2.0x dprefix_k at D=1; 6.2x at |dk|~1e-9; 1.5x dq at D=112 scale=1), see comment")
@settings(max_examples=examples(60), phases=NO_SHRINK)
@given(attention_cases(dtypes=("float32",)))
def test_fuzz_torch_backend_float32_gradients(case):
    note(case.repro("torch"))
    check_attention(case, "torch", only=("dq", "dk", "dv", "dprefix_k", "dprefix_v"))


@settings(max_examples=examples(TRITON_EXAMPLES))
@given(attention_cases(small=True))
def test_fuzz_triton_interpreter_forward(case):
    note(case.repro("triton"))
    check_attention(case, "triton", only=FORWARD)


# Formerly a known miss (issue 10): peaked bf16 softmaxes (magnitude 6, softmax_scale=1: dq 1.6e-1 vs
# bound 3.6e-4) when Delta came from the rounded 16-bit output; the backward now recomputes
# Delta = sum_j P dP (see prefix_attention_bwd.py), test_peaked_bf16_softmax_gradients pins such cases.
@settings(max_examples=examples(TRITON_EXAMPLES))
@given(attention_cases(small=True))
def test_fuzz_triton_interpreter_gradients(case):
    note(case.repro("triton"))
    check_attention(case, "triton", only=("dq", "dk", "dv", "dprefix_k", "dprefix_v"))


@settings(max_examples=examples(40))
@given(attention_cases(small=True, dtypes=("float32",)), st.sampled_from(["q", "k", "v", "scale"]),
       st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(0, 2**31 - 1))
def test_fuzz_nonfinite_visible_propagates_masked_contributes_nothing(case, where, value, pos_seed):
    """torch backend: a non-finite value at a visible position gives the reference's NaN/inf
    pattern; one in a padded-out key or value changes nothing, forward or backward."""
    from dataclasses import replace

    from .strategies import run_reference

    note(case.repro("torch"))
    if where == "scale":
        case = replace(case, scale=value)
    x = build_attention_inputs(case)
    g = torch.Generator().manual_seed(pos_seed)
    masked_pos = None
    if where != "scale":
        t = x[where].clone()  # dense copy (also of stride-0 inputs)
        b, h = int(torch.randint(0, t.shape[0], (1,), generator=g)), int(torch.randint(0, t.shape[1], (1,), generator=g))
        n, d = int(torch.randint(0, t.shape[2], (1,), generator=g)), int(torch.randint(0, t.shape[3], (1,), generator=g))
        t[b, h, n, d] = value
        x[where] = t
        if where in "kv" and x["mask"] is not None and not x["mask"][b, n]:
            masked_pos = (b, n)
    ours = run_op(case, x, "torch")
    if masked_pos is not None:  # contributes nothing: same as with a zero there
        clean = dict(x)
        t = x[where].clone()
        t[masked_pos[0], :, masked_pos[1]] = 0
        clean[where] = t
        expect = run_op(case, clean, "torch")
        for a, e in zip(ours, expect):
            assert torch.equal(a.nan_to_num(posinf=1e30, neginf=-1e30), e.nan_to_num(posinf=1e30, neginf=-1e30)) \
                and torch.equal(torch.isnan(a), torch.isnan(e))
        return
    ref = run_reference(case, x, torch.float64)
    assert torch.equal(torch.isnan(ours[0]), torch.isnan(ref[0])), "NaN pattern of out differs from the reference"
    # rows with no visible key (P = 0, all masked) stay exactly zero
    if case.P == 0 or case.form == "none":
        dead = ~torch.isnan(ref[0]) & (ref[0] == 0).all(-1, keepdim=True)
        assert (ours[0][dead.expand_as(ours[0])] == 0).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_peaked_bf16_softmax_gradients(seed, scale):
    """The shapes of the former misses: |scores| ~ 1e2, few keys, per-row / shared prefix (Triton
    interpreter, bf16 and fp16, every gradient under the 2x rule)."""
    from .strategies import AttnCase

    for dtype, form, D, P, mag in (("bfloat16", "row", 24, 1, 6.0), ("bfloat16", "shared", 40, 7, 1.0),
                                   ("float16", "row", 64, 3, 4.0), ("bfloat16", "task", 72, 2, 6.0)):
        c = AttnCase(B=2, Hkv=2, G=4 if D < 64 else 1, L=2, S=2 + seed % 2, P=P, D=D, form=form,
                     T=2 if form == "task" else 1, index="int64", causal=bool(seed % 2), mask="none" if seed < 2
                     else "holes", q_layout="contig", kv_layout="contig", prefix_layout="contig", magnitude=mag,
                     scale=scale, dtype=dtype, seed=100 + seed)
        check_attention(c, "triton", only=("dq", "dk", "dv", "dprefix_k", "dprefix_v"))
