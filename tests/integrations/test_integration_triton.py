"""Core equivalence (GPT-2, Llama, BERT) with backend="triton": the Triton kernels run on CPU under
TRITON_INTERPRET=1 (set by tests/conftest.py).  Marked slow: ~5 s each in the interpreter."""
import importlib

import pytest

from hf_tiny import assert_same, batch_for, build, patched_vs_stock

pytest.importorskip("triton")

pytestmark = pytest.mark.slow


def _count(monkeypatch, module_name, fn_names):
    module = importlib.import_module(module_name)
    counts = {n: 0 for n in fn_names}
    for n in fn_names:
        real = getattr(module, n)

        def wrapped(*a, _real=real, _n=n, **k):
            counts[_n] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, n, wrapped)
    return counts


@pytest.mark.parametrize("family,prefix_projection", [("gpt2", True), ("llama", False), ("bert-seq", True)])
def test_same_numbers_as_peft_triton(family, prefix_projection, monkeypatch):
    attn = _count(monkeypatch, "softprompt_kernels.triton.prefix_attention", ["attention_forward", "attention_backward"])
    mlp = _count(monkeypatch, "softprompt_kernels.triton.prefix_mlp", ["mlp_forward", "mlp_backward"])
    model = build(family, prefix_projection=prefix_projection)
    batch = batch_for(model, B=2, L=5)
    stock, patched = patched_vs_stock(model, batch, backend="triton")
    num_layers = model.peft_config["default"].num_layers
    probe = num_layers  # apply's probe forward (batch 1, 2 tokens, no grad) runs the forward kernel once per layer
    assert_same(stock, patched)
    assert attn == {"attention_forward": num_layers + probe, "attention_backward": num_layers}  # the kernels ran
    assert mlp == ({"mlp_forward": 2, "mlp_backward": 1} if prefix_projection else {"mlp_forward": 0, "mlp_backward": 0})
