"""generate() after apply: cached = cache-free (greedy and beam search, left padding), and the tokens of
stock PEFT where stock PEFT's cached generate is right (transformers <= 5.23; on 5.24 it loses the
prefix for left-padded rows, see issue 9; recorded 5.23 tokens cover the newer releases in
test_integration_matrix.py)."""
import pytest
import torch
import transformers

from hf_tiny import P, apply, batch_for, build, remove

GEN_FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "bart"]
NEW = 6
STOCK_CACHED_GENERATE_OK = tuple(int(x) for x in transformers.__version__.split(".")[:2]) <= (5, 23)


def _generate(model, batch, **kw):
    torch.manual_seed(0)
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          max_new_tokens=NEW, do_sample=False, pad_token_id=model.config.pad_token_id,
                          min_new_tokens=NEW, **kw)


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["p-tuning-v2", "prefix-tuning"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_generate_cached_equals_cache_free_and_stock(family, num_beams, prefix_projection, spy):
    model = build(family, prefix_projection=prefix_projection)
    batch = batch_for(model, pad_side="left")
    stock = _generate(model, batch, num_beams=num_beams) if STOCK_CACHED_GENERATE_OK else None
    apply(model, backend="torch")
    spy.calls.clear()  # apply's probe forward
    try:
        patched = _generate(model, batch, num_beams=num_beams)
        spy_calls = list(spy.calls)
        cache_free = _generate(model, batch, num_beams=num_beams, use_cache=False)
    finally:
        remove(model)
    assert torch.equal(patched, cache_free), (patched, cache_free)
    if stock is not None:
        assert torch.equal(stock, patched), (stock, patched)
    assert patched.shape[1] >= NEW
    # the prefix went through the op as a shared [Hkv, P, D] tensor, the cached K/V never held it
    L = batch["input_ids"].shape[1]
    with_prefix = [c for c in spy_calls if c["prefix_k"] is not None]
    assert with_prefix and all(c["prefix_k"][1] == P and c["prefix_index"] is None for c in with_prefix)
    limit = NEW + 1 if family == "bart" else L + NEW
    assert all(c["k"][2] <= limit for c in with_prefix)
    decode_steps = [c for c in with_prefix if c["q"][2] == 1]
    assert decode_steps, "generation never used the cache"


def test_prefix_changes_generated_tokens():
    """Guards the cached = cache-free check against a prefix that does nothing."""
    model = build("llama", prefix_projection=False)
    batch = batch_for(model, pad_side="left")
    apply(model, backend="torch")
    with_prefix = _generate(model, batch)
    with model.disable_adapter():
        plain = model.get_base_model().generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                                pad_token_id=0)
    assert not torch.equal(with_prefix, plain)


def test_sliding_window_refused_before_generating():
    """A window the prefix + prompt + new tokens outgrow raises at the start of generate, not mid-way."""
    model = build("mistral", prefix_projection=False)
    model.get_base_model().config.sliding_window = 16
    apply(model, backend="torch")
    batch = batch_for(model, pad_side="left")
    with pytest.raises(NotImplementedError, match="sliding window"):
        _generate(model, batch)  # 5 + 7 + 6 = 18 > 16
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                         do_sample=False, pad_token_id=0)  # 5 + 7 + 4 = 16 fits
    assert out.shape[1] == 7 + 4
