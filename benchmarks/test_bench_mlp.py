"""prefix_mlp (once per step, P rows) vs PEFT's PrefixEncoder on batch-expanded prompt tokens (B*P rows)."""
import pytest

from conftest import run_pedantic
from softprompt_kernels.bench import cases, micro

_QUICK = {c.name for c in cases.mlp_cases(False, "cpu")}
_PARAMS = [pytest.param(c.name, marks=() if c.name in _QUICK else pytest.mark.full_only) for c in cases.MLP_FULL]


@pytest.mark.parametrize("impl", ["ours", "peft"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", _PARAMS)
def test_prefix_mlp(benchmark, name, passes, impl, device, backend, dtype, rounds):
    c = next(c for c in cases.MLP_FULL if c.name == name)
    ours, base = micro.mlp_callables(c, device, dtype, backend, backward=passes == "fwd+bwd")
    benchmark.group = f"prefix_mlp {passes} {name}: {c.shape}"
    benchmark.extra_info.update(shape=c.shape, workload=c.workload)
    run_pedantic(benchmark, ours if impl == "ours" else base, rounds, device)
