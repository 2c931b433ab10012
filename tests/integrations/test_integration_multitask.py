"""Mixed-task batches: rows of one batch use different prefix adapters in ONE forward through the
multi-task prefix form ([T, Hkv, P, D] + prefix_index); each row equals running its adapter alone.

The single-adapter runs are the patched model's own (test_integration_equivalence proves those equal
stock PEFT, live or recorded): stock PEFT cannot run encoder prefix tuning on transformers >= 5.24."""
import copy

import pytest
import torch
from peft import PrefixTuningConfig

from hf_tiny import P, apply, batch_for, build, randomize_prefix, remove

NAMES = ["default", "b", "b", "default"]


def _two_adapters(family, prefix_projection):
    model = build(family, prefix_projection=prefix_projection)
    cfg = model.peft_config["default"]
    model.add_adapter("b", PrefixTuningConfig(task_type=cfg.task_type, num_virtual_tokens=P,
                                              prefix_projection=prefix_projection,
                                              encoder_hidden_size=cfg.encoder_hidden_size))
    torch.manual_seed(11)
    randomize_prefix(model, "b")
    model.set_adapter("default")
    for p in model.prompt_encoder.parameters():
        p.requires_grad_(True)
    return model.eval()


def _weighted_loss(logits, weights):
    return (logits * weights).sum()


def _single_adapter_rows(model, inputs, weights):
    """One adapter at a time on the whole batch, keeping the rows that use it:
    (logits, grads of sum(logits * weights) w.r.t. every prompt-encoder parameter)."""
    params = list(model.prompt_encoder.parameters())
    want, want_grads = None, [torch.zeros_like(p) for p in params]
    for name in ("default", "b"):
        model.set_adapter(name)
        for p in params:
            p.requires_grad_(True)
        logits = model(**inputs).logits
        want = torch.empty_like(logits) if want is None else want
        rows = torch.tensor([n == name for n in NAMES])
        want[rows] = logits[rows].detach()
        grads = torch.autograd.grad(_weighted_loss(logits[rows], weights[rows].to(logits.dtype)), params,
                                    allow_unused=True)
        want_grads = [w + (g if g is not None else 0) for w, g in zip(want_grads, grads)]
    model.set_adapter("default")
    for p in params:
        p.requires_grad_(True)
    return want, want_grads


@pytest.mark.parametrize("prefix_projection", [True, False], ids=["prefix-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("family", ["llama", "bert-tok"])
def test_mixed_batch_rows_equal_single_adapter_runs(family, prefix_projection, spy):
    model = _two_adapters(family, prefix_projection)
    batch = batch_for(model, B=len(NAMES))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    apply(model, backend="torch")
    torch.manual_seed(0)
    with torch.no_grad():
        weights = torch.randn(model(**inputs).logits.shape)
    want, want_grads = _single_adapter_rows(model, inputs, weights)
    # float64 ground truth for the gradient sums (DESIGN section 4 rule: mixed error <= 2x single-run error)
    ref, ref_grads = _single_adapter_rows(apply(copy.deepcopy(model).double(), backend="torch"), inputs, weights)
    spy.calls.clear()
    got = model(**inputs, adapter_names=NAMES).logits
    params = list(model.prompt_encoder.parameters())
    got_grads = torch.autograd.grad(_weighted_loss(got, weights), params, allow_unused=True)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    for g, w, r in zip(got_grads, want_grads, ref_grads):
        g = g if g is not None else torch.zeros_like(w)
        err, stock_err = (g.double() - r).abs().max().item(), (w.double() - r).abs().max().item()
        assert err <= 2 * stock_err + 1e-6 * r.abs().max().item(), (err, stock_err)

    cfg = model.peft_config["default"]
    with_prefix = [c for c in spy.calls if c["prefix_k"] is not None]
    assert len(with_prefix) == cfg.num_layers  # one op call per layer for the whole mixed batch
    for c in with_prefix:
        assert c["prefix_k"] == (2, cfg.num_attention_heads, P, cfg.token_dim // cfg.num_attention_heads)
        assert c["prefix_index"].tolist() == [0, 1, 1, 0]
    remove(model)


def test_mixed_batch_generate_matches_single_adapter_generate():
    model = _two_adapters("llama", False)
    batch = batch_for(model, B=len(NAMES), pad_side="left")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
              min_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=2)
    apply(model, backend="torch")
    want = None
    singles = []
    for name in ("default", "b"):
        model.set_adapter(name)
        out = model.generate(**kw)
        singles.append(out)
        want = out.clone() if want is None else want
        rows = torch.tensor([n == name for n in NAMES])
        want[rows] = out[rows]
    assert not torch.equal(singles[0], singles[1])  # the adapters really generate differently
    model.set_adapter("default")
    got = model.generate(**kw, adapter_names=NAMES)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(**kw, adapter_names=NAMES, use_cache=False), want)  # cached = cache-free


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_mixed_batch_greedy_generate_cached_equals_cache_free(family):
    model = _two_adapters(family, True)
    apply(model, backend="torch")
    batch = batch_for(model, B=len(NAMES), pad_side="left")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
              min_new_tokens=5, do_sample=False, pad_token_id=model.config.pad_token_id, adapter_names=NAMES)
    assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


def test_adapter_names_of_the_wrong_length_say_so():
    model = _two_adapters("llama", False)
    apply(model, backend="torch")
    batch = batch_for(model, B=4)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 rows"):
        model(**batch, adapter_names=["default", "b"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 rows"):
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2,
                       adapter_names=["default", "b"])


def test_unknown_adapter_name_is_rejected():
    model = _two_adapters("llama", False)
    apply(model, backend="torch")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**{k: v for k, v in batch_for(model).items() if k != "labels"}, adapter_names=["default", "zzz", "b"])
