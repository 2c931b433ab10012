"""generate() after apply gives the tokens of stock PEFT: greedy and beam search, left padding."""
import pytest
import torch

from hf_tiny import P, apply, batch_for, build, remove

GEN_FAMILIES = ["gpt2", "llama", "qwen3", "mistral", "gemma", "bart"]
NEW = 6


def _generate(model, batch, **kw):
    torch.manual_seed(0)
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          max_new_tokens=NEW, do_sample=False, pad_token_id=model.config.pad_token_id,
                          min_new_tokens=NEW, **kw)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_generate_same_tokens(family, num_beams, spy):
    model = build(family, prefix_projection=False)
    batch = batch_for(model, pad_side="left")
    stock = _generate(model, batch, num_beams=num_beams)
    apply(model, backend="torch")
    try:
        patched = _generate(model, batch, num_beams=num_beams)
    finally:
        remove(model)
    assert torch.equal(stock, patched), (stock, patched)
    assert stock.shape[1] >= NEW
    # the prefix went through the op as a shared [Hkv, P, D] tensor, the cached K/V never held it
    L = batch["input_ids"].shape[1]
    with_prefix = [c for c in spy.calls if c["prefix_k"] is not None]
    assert with_prefix and all(c["prefix_k"][1] == P and c["prefix_index"] is None for c in with_prefix)
    limit = NEW + 1 if family == "bart" else L + NEW
    assert all(c["k"][2] <= limit for c in with_prefix)
    decode_steps = [c for c in with_prefix if c["q"][2] == 1]
    assert decode_steps, "generation never used the cache"


def test_generate_with_prefix_projection():
    model = build("llama", prefix_projection=True)
    batch = batch_for(model, pad_side="left")
    stock = _generate(model, batch, num_beams=2)
    apply(model, backend="torch")
    assert torch.equal(stock, _generate(model, batch, num_beams=2))
