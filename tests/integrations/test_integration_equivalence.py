"""apply(PeftModel): the prefix reaches each layer as a shared [Hkv, P, D] tensor and the K/V handed
to the op never contain it; apply / remove bookkeeping; what is refused, with which message.  The
numbers against stock PEFT for every family are in test_integration_matrix.py."""
import re

import pytest
import torch
import transformers
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

import families as F
from hf_tiny import FAMILIES, P, apply, assert_same, batch_for, build, remove, run
from oracle import peft_oracle


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_same_numbers_as_peft_eager(family):
    """Stock PEFT with attn_implementation='eager' is matched too (the sdpa matrix is in
    test_integration_matrix.py)."""
    model = F.build(family, prefix_projection=False, attn="eager")
    want = peft_oracle(family, False, attn="eager")
    apply(model, backend="torch")
    assert_same(run(model, F.batch_for(model)), want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_reaches_every_layer_without_concat(family, spy):
    model = build(family, prefix_projection=False)
    batch = batch_for(model)
    cfg = model.active_peft_config
    hkv, d = cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads
    apply(model, backend="torch")
    spy.calls.clear()  # apply's probe forward
    model(**batch)
    with_prefix = [c for c in spy.calls if c["prefix_k"] is not None]
    assert len(with_prefix) == cfg.num_layers
    L = batch["labels"].shape[1] if family == "bart" else batch["input_ids"].shape[1]
    for c in with_prefix:
        assert c["prefix_k"] == (hkv, P, d)  # shared form, no batch dimension
        assert c["prefix_index"] is None
        assert c["k"][2] == L  # the op's K/V hold the sequence only
    if family == "bart":  # PEFT: decoder self-attention only; encoder + cross-attention run without prefix
        assert len(spy.calls) == 3 * cfg.num_layers
        assert all(c["causal"] for c in with_prefix)
    else:
        assert len(spy.calls) == cfg.num_layers
        causal = not family.startswith(("bert", "roberta"))
        assert all(c["causal"] == causal for c in with_prefix)


@pytest.mark.parametrize("family", ["llama", "bert-seq", "bart"])
def test_prefix_changes_output_and_base_model_stays_plain(family):
    """Guards against a vacuous equality: the prefix matters, and the base model called without the
    PEFT wrapper (what disable_adapter() does) still computes plain attention after apply."""
    model = build(family, prefix_projection=False)
    batch = batch_for(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if family == "bart":
        inputs["decoder_input_ids"] = batch["labels"]
    base = model.get_base_model()
    with torch.no_grad():
        plain = base(**inputs).logits
        apply(model, backend="torch")
        patched = model(**batch).logits
        plain_patched = base(**inputs).logits
        if family != "bert-seq":  # PEFT 0.21's disable_adapter() itself fails for SEQ_CLS models
            with model.disable_adapter():
                torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=1e-5)
    assert (patched - plain).abs().max() > 1e-2
    torch.testing.assert_close(plain_patched, plain, atol=1e-5, rtol=1e-5)


def test_remove_restores_stock_behaviour():
    model = build("llama", prefix_projection=False)
    batch = batch_for(model)
    stock = run(model, batch)
    apply(model, backend="torch")
    assert model.get_base_model().config._attn_implementation == "softprompt_torch"
    remove(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    cache = model.get_prompt(batch_size=2)
    assert type(cache) is transformers.DynamicCache  # PEFT's own concatenated cache again
    assert_same(stock, run(model, batch))


def test_apply_twice_is_idempotent():
    model = build("gpt2", prefix_projection=False)
    batch = batch_for(model)
    stock = run(model, batch)
    apply(model, backend="torch")
    apply(model, backend="torch")
    assert_same(stock, run(model, batch))
    remove(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"


def _peft(base, task, **kw):
    return get_peft_model(base, PrefixTuningConfig(task_type=task, num_virtual_tokens=P, **kw))


def test_t5_relative_position_bias_is_refused_by_name():
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    model = _peft(transformers.T5ForConditionalGeneration(cfg), TaskType.SEQ_2_SEQ_LM)
    with pytest.raises(ValueError, match=r"model type 't5' is not supported: .*relative position bias"):
        apply(model)
    assert model.get_base_model().config._attn_implementation != "softprompt_auto"  # left untouched
    assert "forward" not in model.__dict__


def test_alibi_is_refused_by_name():
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)
    model = _peft(transformers.BloomForCausalLM(cfg), TaskType.CAUSAL_LM)
    with pytest.raises(ValueError, match=r"model type 'bloom' is not supported"):
        apply(model)


def test_soft_capping_is_refused_by_name():
    cfg = transformers.Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4096,
                                    attn_logit_softcapping=50.0)
    model = _peft(transformers.Gemma2ForCausalLM(cfg), TaskType.CAUSAL_LM)
    with pytest.raises(ValueError, match=r"model type 'gemma2' is not supported: it soft-caps attention logits"):
        apply(model)


def test_bart_seq_cls_is_refused_by_name():
    base, _ = FAMILIES["bart"]("sdpa")
    cfg = base.config
    cfg.num_labels = 3
    model = _peft(transformers.BartForSequenceClassification(cfg), TaskType.SEQ_CLS)
    with pytest.raises(ValueError, match=r"SEQ_CLS on the encoder-decoder model 'bart' is not supported"):
        apply(model)


def test_window_smaller_than_the_prefix_is_refused_at_apply():
    model = build("mistral", prefix_projection=False)
    model.get_base_model().config.sliding_window = P
    with pytest.raises(ValueError, match=r"sliding window \(5\) cannot even hold the 5 virtual tokens"):
        apply(model)


def test_untested_transformers_release_warns(monkeypatch):
    """A release outside TESTED_TRANSFORMERS warns at apply; the oldest and newest tested ones do not
    (set by hand: the installed release may be newer than the range, and then it warns, rightly)."""
    import warnings

    from softprompt_kernels.integrations._compat import TESTED_TRANSFORMERS

    lo, hi = TESTED_TRANSFORMERS
    monkeypatch.setattr(transformers, "__version__", "9.99.0")
    model = build("gpt2", prefix_projection=False)
    with pytest.warns(RuntimeWarning, match=rf"transformers 9\.99\.0 \(tested: {re.escape(lo)} \.\. {re.escape(hi)}\)"):
        apply(model, backend="torch")
    for tested in (lo + ".0", hi + ".3"):
        monkeypatch.setattr(transformers, "__version__", tested)
        remove(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            apply(model, backend="torch")  # a tested release: no warning


def test_rejects_non_prefix_models():
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(TypeError, match="PeftModel"):
        apply(base)
    lora = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="PrefixTuningConfig"):
        apply(lora)


def test_bad_backend_is_rejected():
    model = build("gpt2", prefix_projection=False)
    with pytest.raises(ValueError, match="backend"):
        apply(model, backend="nope")
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_sliding_window_shorter_than_sequence_is_refused_not_wrong():
    """Mistral with a window that prefix + sequence outgrow: NotImplementedError, never different numbers."""
    model = build("mistral", prefix_projection=False)
    model.get_base_model().config.sliding_window = 8
    apply(model, backend="torch")
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(**batch_for(model))  # 5 + 7 > 8
    short = batch_for(model, L=3)
    model(**short)  # 5 + 3 fits: runs


def test_prefix_mlp_runs_once_per_forward_and_once_per_generate(monkeypatch):
    import softprompt_kernels.ops.torch_mlp as torch_mlp

    calls = []
    real = torch_mlp.mlp_forward
    monkeypatch.setattr(torch_mlp, "mlp_forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = build("llama", prefix_projection=True)
    apply(model, backend="torch")
    calls.clear()  # apply's probe forward
    batch = batch_for(model, B=4)
    model(**batch)
    assert calls == [(P, model.active_peft_config.token_dim)]  # P rows, not B*P
    calls.clear()
    model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                   do_sample=False, pad_token_id=0, num_beams=2)
    assert len(calls) == 1


def test_forward_signature_is_kept_and_deepcopy_works():
    import copy
    import inspect

    model = build("gpt2", prefix_projection=False)
    stock_sig = inspect.signature(model.forward)
    apply(model, backend="torch")
    assert inspect.signature(model.forward) == stock_sig  # Trainer's remove_unused_columns reads it
    batch = batch_for(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        a = model(**batch).logits
        torch.testing.assert_close(twin(**batch).logits, a, atol=0, rtol=0)
        twin.prompt_encoder["default"].embedding.weight.add_(1.0)  # the copy uses its own prefix
        assert (twin(**batch).logits - a).abs().max() > 1e-3
        torch.testing.assert_close(model(**batch).logits, a, atol=0, rtol=0)


def test_per_layer_head_dim_that_differs_from_the_prefix_is_refused():
    """Gemma-style per-layer head sizes: refused at apply (the prefix has one D), never reshaped wrongly."""
    model = build("llama", prefix_projection=False)
    attn = model.get_base_model().model.layers[1].self_attn
    attn.head_dim = 2 * attn.head_dim
    with pytest.raises(ValueError, match=r"model type 'llama' is not supported: layer 1 has head_dim 16"):
        apply(model)
    assert "forward" not in model.__dict__
