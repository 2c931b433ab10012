"""prefix_attention (fwd, fwd+bwd) vs F.scaled_dot_product_attention on concatenated, batch-expanded K/V + mask.

One attention layer per workload (shapes: softprompt_kernels/bench/cases.py); grouped
by case so pytest-benchmark prints ours and the baseline side by side.
"""
import pytest

from conftest import run_pedantic
from softprompt_kernels.bench import cases, micro

# quick: the bench quick set without the L=2048 LLM layer (the slowest on a CPU); --bench-full runs it
_QUICK = {c.name for c in cases.attention_cases(False, "cpu")} - {"llm"}
_PARAMS = [pytest.param(c.name, marks=() if c.name in _QUICK else pytest.mark.full_only)
           for c in cases.ATTENTION_FULL]


def _case(name, device):
    return next(c for c in cases.attention_cases(True, device) if c.name == name)


@pytest.mark.parametrize("impl", ["ours", "sdpa_concat"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", _PARAMS)
def test_attention(benchmark, name, passes, impl, device, backend, dtype, rounds):
    c = _case(name, device)
    ours, base = micro.attention_callables(c, device, dtype, backend, backward=passes == "fwd+bwd")
    benchmark.group = f"attention {passes} {name}: {c.shape}"
    benchmark.extra_info.update(shape=c.shape, workload=c.workload, backend=backend if impl == "ours" else "sdpa")
    run_pedantic(benchmark, ours if impl == "ours" else base, rounds, device)


@pytest.mark.parametrize("name", ["t2t", "gpt2s-var"])
def test_attention_same_numbers(name, device, backend, dtype):
    """Guard (not a benchmark): both sides compute the same attention."""
    err = micro.check_attention_equal(_case(name, device), device, dtype, backend)
    assert err < (1e-4 if dtype.is_floating_point and dtype.itemsize == 4 else 3e-2)
