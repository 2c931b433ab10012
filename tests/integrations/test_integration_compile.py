"""torch.compile(fullgraph=True) traces the patched forward (prefix MLP, our forward, the attention
function and the op) with no graph break; logits, loss and every trainable gradient stay those of
the eager patched model.  backend="aot_eager" traces forward and backward through AOTAutograd
without spending minutes in inductor's C++ compile on CPU.  (gpt2 is not in the list: its loss
calls transformers' logger.warning_once, a graph break of transformers' own, stock PEFT included.)"""
import pytest
import torch

import families as F
from hf_tiny import apply, assert_same


@pytest.mark.parametrize("family", ["llama", "bert-seq", "roberta-tok", "bart", "opt"])
def test_fullgraph_compile_equals_eager(family):
    model = F.build(family, prefix_projection=True)
    batch = F.batch_for(model)
    apply(model, backend="torch")
    eager = F.run(model, batch)
    torch._dynamo.reset()
    patched = model.forward
    model.forward = torch.compile(patched, fullgraph=True, backend="aot_eager")
    try:
        compiled = F.run(model, batch)
    finally:
        model.forward = patched
        torch._dynamo.reset()
    assert_same(eager, compiled)
