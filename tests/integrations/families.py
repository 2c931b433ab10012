"""Tiny Hugging Face + PEFT prefix-tuning models with VERSION-INDEPENDENT weights.

Unlike ``hf_tiny.py`` (``torch.manual_seed`` + the model's own ``_init_weights``, whose
draw order and distributions may change between transformers releases), every parameter
here is overwritten after construction from a ``torch.Generator`` with a fixed seed,
walking the unique tensors in sorted-name order.  The numbers of a stock-PEFT forward on
these models therefore depend only on the modelling code, which is what the recorded
fixtures (``fixtures/peft-5.23``) pin down.

This module imports nothing from ``softprompt_kernels``: it is the oracle side.

Families kept (name -> PEFT task type):
* CAUSAL_LM: gpt2 llama mistral mixtral qwen2 qwen2_moe qwen3 gemma phi phi3 gpt_neox
  gptj opt starcoder2 granite stablelm olmo olmo2 cohere
* SEQ_CLS / TOKEN_CLS: bert roberta xlm-roberta electra (as ``<name>-seq`` / ``<name>-tok``)
* SEQ_2_SEQ_LM: bart mbart
Dropped families are listed in ``DROPPED`` with the reason (none: all of the above build, and
stock PEFT 0.21.2 runs prefix tuning forward + backward on all of them under transformers 5.23
and 5.17; under 5.24 it refuses the encoders: "Model does not support past key values").
gptj is always built with eager attention (transformers <= 5.23 has no SDPA path for it).
Stock ``generate(use_cache=False)`` raises under 5.17 / 5.23 for llama mixtral phi gpt_neox gptj
opt granite stablelm olmo olmo2 cohere; cached generate runs for every causal family there and
equals ``greedy_forward`` (see record_fixtures.py / the manifest).
"""
from __future__ import annotations

import warnings

import torch

import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model

VOCAB = 100
P = 5  # num_virtual_tokens
ENCODER_HIDDEN = 24  # PrefixTuningConfig.encoder_hidden_size when prefix_projection=True
SEED = 1234
PAD_ID = 0
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
transformers.logging.set_verbosity_error()

# family -> reason it is not in FAMILIES
DROPPED: dict[str, str] = {}

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# GQA everywhere it exists: 4 query heads, 2 kv heads, hidden 32 (head_dim 8)
_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _cfg(name, **kw):
    return getattr(transformers, name + "Config")(**kw)


def _causal(cfg_name, model_name, **kw):
    force = kw.pop("_force_attn", None)

    def make(attn):
        cfg = _cfg(cfg_name, attn_implementation=force or attn, **{**_COMMON, **kw})
        return getattr(transformers, model_name)(cfg), TaskType.CAUSAL_LM
    return make


def _causal_families():
    L = _LLAMA
    return {
        # tied word embeddings on gpt2 (its default) to exercise the tied-weight path
        "gpt2": _causal("GPT2", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        **{"tie_word_embeddings": True}),
        "llama": _causal("Llama", "LlamaForCausalLM", **L),
        # mistral: head_dim 12 (!= hidden / heads), window far beyond any length used here
        "mistral": _causal("Mistral", "MistralForCausalLM", **L, head_dim=12, sliding_window=4096),
        "mixtral": _causal("Mixtral", "MixtralForCausalLM", **L, sliding_window=None,
                           num_local_experts=3, num_experts_per_tok=2),
        "qwen2": _causal("Qwen2", "Qwen2ForCausalLM", **L, use_sliding_window=False),
        "qwen2_moe": _causal("Qwen2Moe", "Qwen2MoeForCausalLM", **L, use_sliding_window=False,
                             num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24,
                             shared_expert_intermediate_size=40, decoder_sparse_step=1),
        # qwen3: head_dim (16) != hidden / heads (8)
        "qwen3": _causal("Qwen3", "Qwen3ForCausalLM", **L, head_dim=16, use_sliding_window=False),
        # gemma: MQA, head_dim 16
        "gemma": _causal("Gemma", "GemmaForCausalLM", **{**L, "num_key_value_heads": 1}, head_dim=16),
        "phi": _causal("Phi", "PhiForCausalLM", **L, partial_rotary_factor=0.5),
        "phi3": _causal("Phi3", "Phi3ForCausalLM", **L, sliding_window=None, original_max_position_embeddings=64),
        # gpt_neox: no GQA in the architecture; partial rotary
        "gpt_neox": _causal("GPTNeoX", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                            rotary_pct=0.5),
        # gptj: transformers <= 5.23 has no SDPA path for GPT-J ("does not support an attention
        # implementation through torch.nn.functional.scaled_dot_product_attention yet"), so the
        # family is always built with eager attention, whatever `attn` says.
        "gptj": _causal("GPTJ", "GPTJForCausalLM", n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                        _force_attn="eager"),
        # opt: word_embed_proj_dim == hidden (no project_in/out)
        "opt": _causal("OPT", "OPTForCausalLM", hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
        "starcoder2": _causal("Starcoder2", "Starcoder2ForCausalLM", **L, sliding_window=None),
        "granite": _causal("Granite", "GraniteForCausalLM", **L, embedding_multiplier=2.0,
                           attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0),
        "stablelm": _causal("StableLm", "StableLmForCausalLM", **L, partial_rotary_factor=0.5),
        "olmo": _causal("Olmo", "OlmoForCausalLM", **L),
        "olmo2": _causal("Olmo2", "Olmo2ForCausalLM", **L),
        "cohere": _causal("Cohere", "CohereForCausalLM", **L, logit_scale=0.5),
    }


_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, num_labels=3)
# (config name, model prefix, pad id, config overrides): roberta-likes use padding_idx 1 for
# their positions; xlm-roberta (the same code as roberta) gets 2 heads of 16 and a ragged FFN so
# that the two families do not give identical numbers; electra projects embeddings 24 -> 32.
_ENCODERS = {
    "bert": ("Bert", "Bert", 0, {}),
    "roberta": ("Roberta", "Roberta", 1, {}),
    "xlm-roberta": ("XLMRoberta", "XLMRoberta", 1, {"num_attention_heads": 2, "intermediate_size": 40}),
    "electra": ("Electra", "Electra", 0, {"embedding_size": 24}),
}


_HEAD_SUFFIX = {TaskType.SEQ_CLS: "ForSequenceClassification", TaskType.TOKEN_CLS: "ForTokenClassification",
                TaskType.QUESTION_ANS: "ForQuestionAnswering"}


def _encoder(cfg_name, prefix, pad, task, over):
    suffix = _HEAD_SUFFIX[task]

    def make(attn):
        cfg = _cfg(cfg_name, attn_implementation=attn, pad_token_id=pad, **{**_ENC, **over})
        return getattr(transformers, prefix + suffix)(cfg), task
    return make


def _seq2seq(cfg_name, model_name):
    def make(attn):
        cfg = _cfg(cfg_name, vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                   decoder_ffn_dim=48, max_position_embeddings=64, attn_implementation=attn,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                   forced_eos_token_id=None)
        return getattr(transformers, model_name)(cfg), TaskType.SEQ_2_SEQ_LM
    return make


def _families():
    fam = _causal_families()
    for name, (cfg_name, prefix, pad, over) in _ENCODERS.items():
        fam[f"{name}-seq"] = _encoder(cfg_name, prefix, pad, TaskType.SEQ_CLS, over)
        fam[f"{name}-tok"] = _encoder(cfg_name, prefix, pad, TaskType.TOKEN_CLS, over)
    fam["bert-qa"] = _encoder("Bert", "Bert", 0, TaskType.QUESTION_ANS, {"num_labels": 2})  # start/end
    # a decoder-only backbone under a classification head (PEFT: the head's own forward)
    fam["llama-seq"] = lambda attn: (transformers.LlamaForSequenceClassification(
        _cfg("Llama", attn_implementation=attn, num_labels=3, **{**_COMMON, **_LLAMA})), TaskType.SEQ_CLS)
    fam["bart"] = _seq2seq("Bart", "BartForConditionalGeneration")
    fam["mbart"] = _seq2seq("MBart", "MBartForConditionalGeneration")
    for name in DROPPED:
        fam.pop(name, None)
    return fam


FAMILIES = _families()


def task_of(family: str) -> TaskType:
    if family.endswith("-qa"):
        return TaskType.QUESTION_ANS
    return {"-seq": TaskType.SEQ_CLS, "-tok": TaskType.TOKEN_CLS}.get(
        family[-4:], TaskType.SEQ_2_SEQ_LM if family in ("bart", "mbart") else TaskType.CAUSAL_LM)


# ---------------------------------------------------------------- deterministic weights
def _unique_sorted(module):
    """[(name, tensor)] of the unique parameter tensors, each under the smallest of its names
    (tied weights appear once), sorted by that name."""
    names: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in names or n < names[id(p)][0]:
            names[id(p)] = (n, p)
    return sorted(names.values(), key=lambda t: t[0])


def _fill(p: torch.Tensor, name: str, g: torch.Generator, matrix_std: float = 0.2):
    noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
    if p.dim() >= 2:
        val = noise * matrix_std
    elif name.endswith("bias"):
        val = noise * 0.05
    else:  # norm weights (and any other 1-D parameter)
        val = 1.0 + 0.1 * noise
    p.copy_(val.to(p.dtype))


@torch.no_grad()
def init_base(model, seed: int = SEED) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    for n, p in _unique_sorted(model):
        _fill(p, n, g)
    return g


@torch.no_grad()
def init_peft(model, g: torch.Generator, adapter: str | None = None):
    """Classification-head copy (modules_to_save), then the prompt encoder, from ``g``."""
    adapter = adapter or model.active_adapter
    heads = [(n, p) for n, p in _unique_sorted(model)
             if p.requires_grad and f"modules_to_save.{adapter}." in n]
    for n, p in heads:
        _fill(p, n, g)
    enc = model.prompt_encoder[adapter]
    for n, p in _unique_sorted(enc):
        # the embedding holds the prefix values themselves (noproj) or the MLP input: std 1;
        # the MLP of prefix_projection=True: std 0.3
        _fill(p, n, g, matrix_std=1.0 if n.startswith("embedding") else 0.3)


def build(family: str, prefix_projection: bool = True, attn: str = "sdpa", seed: int = SEED, **peft_kw):
    """PeftModel (eval mode) with deterministic, transformers-version-independent weights."""
    base, task = FAMILIES[family](attn)
    g = init_base(base, seed)
    cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=prefix_projection,
                             encoder_hidden_size=ENCODER_HIDDEN if prefix_projection else None, **peft_kw)
    model = get_peft_model(base, cfg)
    init_peft(model, g)
    return model.eval()


def _pad_id(model) -> int:
    pad = model.base_model.config.pad_token_id
    return PAD_ID if pad is None else int(pad)


def batch_for(model, B: int = 3, L: int = 7, seed: int = 1):
    """Batch 3 x 7; rows carry 0 / 2 / 4 pad tokens (the config's pad id, mask 0):
    LEFT padding for causal LMs, right padding otherwise.  Labels match the task; -100 on pads."""
    task = model.peft_config[model.active_adapter].task_type
    left = task == TaskType.CAUSAL_LM
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    pads = [0, 2, 4] + [1] * (B - 3)
    for b in range(B):
        n = pads[b] % L
        if n:
            if left:
                mask[b, :n] = 0
            else:
                mask[b, L - n:] = 0
    ids = ids.masked_fill(mask == 0, _pad_id(model))
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == TaskType.CAUSAL_LM:
        labels = ids.masked_fill(mask == 0, -100)
    elif task == TaskType.SEQ_CLS:
        labels = torch.randint(0, 3, (B,), generator=g)
    elif task == TaskType.TOKEN_CLS:
        labels = torch.randint(0, 3, (B, L), generator=g).masked_fill(mask == 0, -100)
    elif task == TaskType.QUESTION_ANS:  # a span inside each row's real tokens
        real = mask.sum(1)
        start = (torch.rand(B, generator=g) * real).long()
        batch["start_positions"] = start
        batch["end_positions"] = torch.minimum(start + 1, real - 1)
        return batch
    else:  # seq2seq: decoder inputs come from shifting the labels
        labels = torch.randint(3, VOCAB, (B, 5), generator=g)
    batch["labels"] = labels
    return batch


def run(model, batch):
    """(logits, loss, {trainable param name: grad}) of one stock forward + backward (fp32)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, v in grads.items() if v is None]
    assert grads and not missing, missing
    model.zero_grad(set_to_none=True)
    logits = out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits], -1)  # QA
    return logits.detach().float(), out.loss.detach().float(), grads


GEN_NEW = 6


@torch.no_grad()
def generate(model, batch, use_cache: bool):
    """Greedy tokens of stock PEFT generate (left-padded batch, exactly GEN_NEW new tokens)."""
    pad = _pad_id(model)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False, num_beams=1,
                         pad_token_id=pad, use_cache=use_cache)
    return out.detach().cpu()


@torch.no_grad()
def greedy_forward(model, batch):
    """Greedy decoding by GEN_NEW full forwards (no cache, no ``generate``): what stock greedy
    ``generate(min_new_tokens=GEN_NEW)`` must give.  Positions come from the attention mask as in
    ``generate`` (``cumsum - 1``; PEFT adds P itself), EOS is suppressed (``min_new_tokens``).
    A generate oracle that needs only a working stock forward."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = model.base_model.config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for _ in range(GEN_NEW):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        logits[:, eos] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids
