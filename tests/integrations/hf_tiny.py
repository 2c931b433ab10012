"""Tiny random-init Hugging Face + PEFT prefix-tuning models (no downloads) and the
equivalence check shared by the integration tests."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402

from softprompt_kernels.integrations.peft import apply, remove  # noqa: E402

VOCAB = 100
P = 5  # num_virtual_tokens
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
transformers.logging.set_verbosity_error()


def _causal(cfg_cls, model_cls, **kw):
    def build(attn):
        cfg = cfg_cls(vocab_size=VOCAB, attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
        return model_cls(cfg), TaskType.CAUSAL_LM
    return build


def _llama_kw(**extra):
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    kw.update(extra)
    return kw


def _families():
    T = transformers
    fam = {
        "gpt2": lambda attn: (T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=attn,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)), TaskType.CAUSAL_LM),
        "llama": _causal(T.LlamaConfig, T.LlamaForCausalLM, **_llama_kw()),
        "qwen3": _causal(T.Qwen3Config, T.Qwen3ForCausalLM, **_llama_kw(head_dim=16)),
        "qwen2": _causal(T.Qwen2Config, T.Qwen2ForCausalLM, **_llama_kw()),
        "mistral": _causal(T.MistralConfig, T.MistralForCausalLM, **_llama_kw(sliding_window=4096)),
        "gemma": _causal(T.GemmaConfig, T.GemmaForCausalLM, **_llama_kw(head_dim=16, num_key_value_heads=1)),
    }
    bert_kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=64, initializer_range=0.2)
    for task, suffix in ((TaskType.SEQ_CLS, "ForSequenceClassification"), (TaskType.TOKEN_CLS, "ForTokenClassification")):
        short = "seq" if task == TaskType.SEQ_CLS else "tok"
        fam[f"bert-{short}"] = (lambda task, suffix: lambda attn: (getattr(T, "Bert" + suffix)(
            T.BertConfig(attn_implementation=attn, num_labels=3, **bert_kw)), task))(task, suffix)
        fam[f"roberta-{short}"] = (lambda task, suffix: lambda attn: (getattr(T, "Roberta" + suffix)(
            T.RobertaConfig(attn_implementation=attn, num_labels=3, pad_token_id=1, **bert_kw)), task))(task, suffix)
    fam["bart"] = lambda attn: (T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        init_std=0.2, attn_implementation=attn, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None)), TaskType.SEQ_2_SEQ_LM)
    return fam


FAMILIES = _families()


def build(family: str, *, attn: str = "sdpa", prefix_projection: bool = True, seed: int = 0,
          num_virtual_tokens: int = P, **peft_kw):
    """PeftModel (eval mode) with random, non-trivial prefix parameters."""
    torch.manual_seed(seed)
    base, task = FAMILIES[family](attn)
    cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                             prefix_projection=prefix_projection,
                             encoder_hidden_size=24 if prefix_projection else None, **peft_kw)
    model = get_peft_model(base, cfg)
    randomize_prefix(model)
    return model.eval()


def randomize_prefix(model, adapter=None, scale=1.0):
    enc = model.prompt_encoder[adapter or model.active_adapter]
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, scale if p.dim() == 2 and p.shape[0] == enc.embedding.weight.shape[0] else 0.3)


def batch_for(model, B: int = 3, L: int = 7, seed: int = 1, pad_side: str = "left"):
    """Inputs with padding (row 1 and 2 padded) and labels matching the task."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        pads = [0, 2, 4] + [1] * (B - 3)
        for b in range(B):
            n = pads[b] % L
            if n:
                if pad_side == "left":
                    mask[b, :n] = 0
                else:
                    mask[b, L - n:] = 0
    task = model.peft_config[model.active_adapter].task_type
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == TaskType.CAUSAL_LM:
        labels = ids.masked_fill(mask == 0, -100)
    elif task == TaskType.SEQ_CLS:
        labels = torch.randint(0, 3, (B,), generator=g)
    elif task == TaskType.TOKEN_CLS:
        labels = torch.randint(0, 3, (B, L), generator=g).masked_fill(mask == 0, -100)
    else:  # seq2seq
        labels = torch.randint(3, VOCAB, (B, 5), generator=g)
    batch["labels"] = labels
    return batch


def run(model, batch):
    """(logits, loss, {trainable param name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(a, b, atol=1e-5, rtol=1e-5):
    la, lossa, ga = a
    lb, lossb, gb = b
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    torch.testing.assert_close(lossa, lossb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=lambda m: f"grad {n}: {m}")


STOCK_FAILS = "Model does not support past key values"  # stock PEFT's encoder error on transformers >= 5.24


def stock_or_none(model, batch):
    """``run`` of stock PEFT, or None where stock PEFT cannot run prefix tuning on this model with the
    installed transformers (encoders on >= 5.24; test_integration_matrix.py checks those against
    numbers recorded under 5.23)."""
    try:
        return run(model, batch)
    except ValueError as err:
        if STOCK_FAILS not in str(err):
            raise
        return None


def patched_vs_stock(model, batch, backend="torch"):
    """Run stock PEFT then the patched model on the same batch; returns (stock, patched).  Where stock
    PEFT cannot run (see ``stock_or_none``) the reference is the patched model on the torch backend."""
    stock = stock_or_none(model, batch)
    if stock is None:
        apply(model, backend="torch")
        try:
            stock = run(model, batch)
        finally:
            remove(model)
    apply(model, backend=backend)
    try:
        patched = run(model, batch)
    finally:
        remove(model)
    return stock, patched


class AttentionSpy:
    """Records the (k, prefix_k) shapes the integration hands to prefix_attention."""

    def __init__(self, monkeypatch):
        from softprompt_kernels.integrations import transformers as tr

        self.calls = []
        real = tr.prefix_attention

        def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
            self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape),
                                   prefix_k=None if prefix_k is None else tuple(prefix_k.shape),
                                   prefix_index=kw.get("prefix_index"), dropout_p=kw.get("dropout_p"),
                                   causal=kw.get("causal"), mask=kw.get("key_padding_mask")))
            return real(q, k, v, prefix_k, prefix_v, **kw)

        monkeypatch.setattr(tr, "prefix_attention", spy)
