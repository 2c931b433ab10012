"""Core equivalence (GPT-2, Llama, BERT) with backend="triton": the Triton kernels run on CPU under
TRITON_INTERPRET=1 (set by tests/conftest.py).  Marked slow: interpreter cost, see --durations."""
import pytest

from conftest import assert_same, batch_for, build, patched_vs_stock

pytest.importorskip("triton")
pytest.importorskip("softprompt_kernels.triton.prefix_attention",
                    reason="Triton prefix-attention backend module not present yet")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family,prefix_projection", [("gpt2", True), ("llama", False), ("bert-seq", True)])
def test_same_numbers_as_peft_triton(family, prefix_projection):
    model = build(family, prefix_projection=prefix_projection)
    batch = batch_for(model, B=2, L=5)
    stock, patched = patched_vs_stock(model, batch, backend="triton")
    assert_same(stock, patched)
