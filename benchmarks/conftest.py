"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Quick by default (a subset of shapes, few rounds: the whole run stays under 10
minutes on a 2-core CPU); ``--bench-full`` (or ``SOFTPROMPT_BENCH_FULL=1``) runs every
shape of ``softprompt_kernels.bench.cases`` and the end-to-end step at the
acceptance shape.  On a CPU our ops run their PyTorch backend; on a GPU, Triton.
Timing rules of DESIGN.md §5: compare only within one run on one machine.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="every benchmark shape and the acceptance-size training step (slow on CPU)")


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return bool(request.config.getoption("--bench-full")) or os.environ.get("SOFTPROMPT_BENCH_FULL") == "1"


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def backend(device) -> str:
    return "triton" if device == "cuda" else "torch"


@pytest.fixture(scope="session")
def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.fixture(scope="session")
def rounds(bench_full) -> int:
    return 5 if bench_full else 2


def run_pedantic(benchmark, fn, rounds: int, device: str, warmup: int = 1):
    """Median-friendly fixed-round timing (pytest-benchmark's calibration is far too slow for these calls)."""
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)


def pytest_collection_modifyitems(config, items):
    full = config.getoption("--bench-full") or os.environ.get("SOFTPROMPT_BENCH_FULL") == "1"
    for item in items:
        if not full and item.get_closest_marker("full_only"):
            item.add_marker(pytest.mark.skip(reason="full suite only (--bench-full)"))


def pytest_configure(config):
    config.addinivalue_line("markers", "full_only: shape run only with --bench-full")
