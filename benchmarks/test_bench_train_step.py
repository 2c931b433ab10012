"""End-to-end prefix-tuning training step: PEFT vs softprompt_kernels.apply, with and without checkpointing.

Quick: GPT-2-small-shaped model at B=2, L=128 (``softprompt_kernels.bench.e2e.QUICK``);
``--bench-full``: the acceptance shape B=8, L=256, P=100, mid 512.  Time only; the
peak-memory comparison (fresh processes) is in ``softprompt-kernels bench``.
"""
import pytest

from conftest import run_pedantic
from softprompt_kernels.bench import e2e


@pytest.fixture(scope="module")
def setup(bench_full, device, backend):
    e2e._quiet()
    cfg = e2e.FULL if bench_full else e2e.QUICK
    cfg = e2e.E2EConfig(**{**cfg.__dict__, "backend": backend})
    model, batch, opt = e2e.build(cfg, device)
    return cfg, model, batch, opt


@pytest.mark.parametrize("mode", ["peft", "ours", "ours+ckpt", "peft+ckpt"])
def test_train_step(benchmark, setup, mode, device, bench_full):
    cfg, model, batch, opt = setup
    e2e.configure(model, mode, cfg)
    try:
        e2e.train_step(model, batch, opt)
    except Exception as err:  # noqa: BLE001 - PEFT's prefix cache breaks under checkpoint recomputation
        opt.zero_grad(set_to_none=True)
        e2e.configure(model, "peft", cfg)
        if mode == "peft+ckpt":
            pytest.skip(f"PEFT prefix tuning cannot use gradient checkpointing: {type(err).__name__}: {err}")
        raise
    benchmark.group = f"train step: {cfg.shape}"
    benchmark.extra_info.update(shape=cfg.shape, mode=mode)
    # the step above was the warm-up; quick: one timed step per mode, full: three
    run_pedantic(benchmark, lambda: e2e.train_step(model, batch, opt), 3 if bench_full else 1, device, warmup=0)
    e2e.configure(model, "peft", cfg)
