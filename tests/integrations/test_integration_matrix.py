"""The family matrix (``families.py``: 19 causal LMs, 4 encoders x SEQ_CLS/TOKEN_CLS, 2 seq2seq):
after ``apply``, every family equals stock PEFT (``oracle.peft_oracle``: live where stock PEFT runs on
the installed transformers, else the numbers recorded under 5.23) in logits, loss and every trainable
gradient, with and without gradient checkpointing; and greedy ``generate`` with the cache gives the
tokens of ``generate(use_cache=False)`` and of stock PEFT (recorded under 5.23, where its cached
generate was right)."""
import pytest
import torch
import transformers

import families as F
from hf_tiny import apply, assert_same, remove
from oracle import fixture_greedy, peft_oracle

CAUSAL = [f for f in sorted(F.FAMILIES) if F.task_of(f).value == "CAUSAL_LM"]
SEQ2SEQ = [f for f in sorted(F.FAMILIES) if F.task_of(f).value == "SEQ_2_SEQ_LM"]
_TF = tuple(int(x) for x in transformers.__version__.split(".")[:2])
# family -> why apply refuses it on the installed transformers (asserted, never skipped)
REFUSED = {"gptj": "none of its attention modules dispatches"} if _TF < (5, 24) else {}  # GPT-J: eager-only < 5.24
KWARG_DROPPING = {"stablelm"}  # layers that do not pass attention kwargs on: prefix relayed by hooks
PROJ = pytest.mark.parametrize("prefix_projection", [True, False], ids=["prefix-tuning", "p-tuning-v2"])


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
    return model


def test_matrix_is_at_least_twenty_families():
    backbones = {f.rsplit("-", 1)[0] if f.endswith(("-seq", "-tok")) else f for f in F.FAMILIES}
    assert len(backbones) >= 20, sorted(backbones)


@PROJ
@pytest.mark.parametrize("family", sorted(F.FAMILIES))
def test_family_equals_stock_peft(family, prefix_projection):
    want = peft_oracle(family, prefix_projection)
    model = F.build(family, prefix_projection, attn="eager" if family == "gptj" else "sdpa")
    batch = F.batch_for(model)
    if family in REFUSED:
        with pytest.raises(ValueError, match=f"model type '{family}' is not supported: {REFUSED[family]}"):
            apply(model, backend="torch")
        assert "forward" not in model.__dict__  # left as stock PEFT
        return
    apply(model, backend="torch")
    assert_same(F.run(model, batch), want)
    # gradient checkpointing (stock PEFT refuses it): same numbers in training mode without dropout
    _no_dropout(model).train()
    model.gradient_checkpointing_enable()
    if family in KWARG_DROPPING:  # refused, never other gradients (transformers.relay_prefix_kwarg)
        with pytest.raises(NotImplementedError, match="gradient checkpointing"):
            F.run(model, batch)
    else:
        assert_same(F.run(model, batch), want)
    remove(model)


@PROJ
@pytest.mark.parametrize("family", CAUSAL)
def test_family_generate_cached_equals_cache_free_and_stock(family, prefix_projection):
    if family in REFUSED:
        pytest.skip(f"apply refuses {family} on this transformers (asserted in test_family_equals_stock_peft)")
    model = F.build(family, prefix_projection, attn="eager" if family == "gptj" else "sdpa")
    batch = F.batch_for(model)
    apply(model, backend="torch")
    cached = F.generate(model, batch, use_cache=True)
    assert torch.equal(cached, F.generate(model, batch, use_cache=False))
    assert torch.equal(cached, fixture_greedy(family, prefix_projection))


@PROJ
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_generate_cached_equals_cache_free(family, prefix_projection):
    model = F.build(family, prefix_projection)
    batch = F.batch_for(model)
    apply(model, backend="torch")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=F.GEN_NEW,
              min_new_tokens=F.GEN_NEW, do_sample=False, pad_token_id=model.config.pad_token_id)
    for beams in (1, 3):
        assert torch.equal(model.generate(**kw, num_beams=beams),
                           model.generate(**kw, num_beams=beams, use_cache=False))
