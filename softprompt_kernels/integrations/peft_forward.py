"""The forward / generate of a prefix-tuned ``PeftModel`` after ``apply``: PEFT's policy,
our code path.

PEFT feeds the prefix through the KV cache (``past_key_values``) and lets the model
derive masks and positions from the cache length; that breaks whenever transformers
changes its cache API.  Here the prefix reaches attention as the forward kwarg
``softprompt_prefix`` and the numbers PEFT's cache would produce are rebuilt explicitly:

* attention masks stay the model's own ``[B, S]`` (no prefix columns): the prefix is
  never masked, so there is nothing to concatenate;
* positions: PEFT's cache makes the model count the ``P`` virtual tokens, so in a forward
  the model's tokens sit at ``P, P+1, ...`` (RoBERTa-style embeddings: their padding-aware
  formula with a past length of ``P``), and user ``position_ids`` are shifted by ``P``.
  ``generate`` uses transformers' left-padding positions, shifted by ``P`` (what PEFT's
  ``prepare_inputs_for_generation`` does).  Encoder-decoder decoders take no
  ``position_ids``: they get a ``PrefixCache`` that reports ``P`` extra tokens;
* heads: where the base model's forward takes a cache (causal LMs, decoder classifiers,
  seq2seq) its own head runs; otherwise (encoder classifiers) PEFT's backbone + head
  route is reproduced (``pooled = outputs[1]``, the base model's dropout, the head, PEFT's
  losses).

Every function takes the ``_Runtime`` (``rt``) and the ``PeftModel`` (``model``).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from . import _compat
from .transformers import PREFIX_KWARG, find_prefix_state, make_cache


# ----------------------------------------------------------------------------- shared pieces
def _batch_and_length(input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], name: str = "input_ids"):
    x = input_ids if input_ids is not None else inputs_embeds
    if x is None:
        raise ValueError(f"softprompt_kernels: pass {name} or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def _drop_token_type_ids(kwargs) -> None:
    """PEFT (CAUSAL_LM, SEQ_2_SEQ_LM, FEATURE_EXTRACTION) ignores token_type_ids, with this warning."""
    if kwargs.get("token_type_ids", None) is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None


def _past_length(kwargs, cache_name: Optional[str]) -> int:
    cache = kwargs.get(cache_name) if cache_name else None
    return int(cache.get_seq_length()) if cache is not None else 0


def _position_ids(rt, input_ids, attention_mask, length: int, past: int, device, kwargs) -> Optional[Tensor]:
    """``position_ids`` the model would compute with a cache of ``P + past`` tokens (PEFT's
    cache, ``model_map.position_policy``), or the user's shifted by ``P``; None where the
    model's own default already agrees."""
    P = rt.num_virtual_tokens
    given = kwargs.get("position_ids", None)
    if given is not None:
        return given + P
    if rt.position_policy == "padding_idx":  # RoBERTa-style: padding_idx + 1 + P + running count
        if input_ids is None:  # its inputs_embeds formula ignores the cache length, as with PEFT
            return None
        emb = rt.position_module
        return emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx, P + past)
    if rt.position_policy == "mask_cumsum" and attention_mask is not None:  # OPT-style, over [1]*P + mask
        full = torch.cat((torch.ones(attention_mask.shape[0], P, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask), dim=1)
        return ((full.cumsum(1) * full) - 1).long()[:, P + past:]
    return (torch.arange(length, device=device) + (P + past)).unsqueeze(0)


def _check_rows(adapter_names, batch_size: int) -> None:
    if adapter_names is not None and len(adapter_names) != batch_size:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows; "
                         "give one adapter name per row")


def _return_dict(config, return_dict):
    if return_dict is not None:
        return return_dict
    return bool(getattr(config, "return_dict", True))


# ----------------------------------------------------------------------------- forwards
def decoder_forward(rt, model, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                    adapter_names=None, **kwargs):
    """CAUSAL_LM / FEATURE_EXTRACTION, and classifiers whose head takes a cache (decoder LMs)."""
    B, L, device = _batch_and_length(input_ids, inputs_embeds)
    _check_rows(adapter_names, B)
    if rt.drops_token_type_ids:
        _drop_token_type_ids(kwargs)
    past = _past_length(kwargs, rt.cache_name)
    kwargs["position_ids"] = _position_ids(rt, input_ids, attention_mask, L, past, device, kwargs)
    kwargs[PREFIX_KWARG] = rt.build_state(adapter_names)
    if labels is not None:
        kwargs["labels"] = labels
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                            return_dict=return_dict, **kwargs)


def encoder_head_forward(rt, model, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                         output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                         adapter_names=None, start_positions=None, end_positions=None, **kwargs):
    """SEQ_CLS / TOKEN_CLS / QUESTION_ANS on a base model whose forward takes no cache:
    PEFT's backbone + head route."""
    from transformers.modeling_outputs import (QuestionAnsweringModelOutput, SequenceClassifierOutput,
                                               TokenClassifierOutput)

    base = model.base_model
    return_dict = _return_dict(model.config, return_dict)
    B, L, device = _batch_and_length(input_ids, inputs_embeds)
    _check_rows(adapter_names, B)
    kwargs["position_ids"] = _position_ids(rt, input_ids, attention_mask, L, 0, device, kwargs)
    kwargs[PREFIX_KWARG] = rt.build_state(adapter_names)
    backbone = base.get_submodule(model.transformer_backbone_name)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                       output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                       return_dict=return_dict, **kwargs)
    task = rt.task_type
    features = outputs[1] if task == "SEQ_CLS" and len(outputs) > 1 else outputs[0]
    if "dropout" in dict(base.named_children()):
        features = base.dropout(features)
    logits = base.get_submodule(model.cls_layer_name)(features)

    if task == "QUESTION_ANS":
        start_logits, end_logits = logits.split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            if start_positions.dim() > 1:
                start_positions = start_positions.squeeze(-1)
            if end_positions.dim() > 1:
                end_positions = end_positions.squeeze(-1)
            ignored = start_logits.size(1)
            start_positions = start_positions.clamp(0, ignored)
            end_positions = end_positions.clamp(0, ignored)
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        if not return_dict:
            out = (start_logits, end_logits) + tuple(outputs[2:])
            return ((loss,) + out) if loss is not None else out
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    num_labels = base.num_labels
    loss = None
    if labels is not None:
        if task == "TOKEN_CLS":
            loss = CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
        else:  # PEFT's (= transformers') problem_type rule
            config = model.config
            if config.problem_type is None:
                if num_labels == 1:
                    config.problem_type = "regression"
                elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
                    config.problem_type = "single_label_classification"
                else:
                    config.problem_type = "multi_label_classification"
            if config.problem_type == "regression":
                loss = (MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1
                        else MSELoss()(logits, labels))
            elif config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels)
    if not return_dict:
        out = (logits,) + tuple(outputs[2:])
        return ((loss,) + out) if loss is not None else out
    cls = TokenClassifierOutput if task == "TOKEN_CLS" else SequenceClassifierOutput
    return cls(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def seq2seq_forward(rt, model, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                    decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None, task_ids=None, adapter_names=None, **kwargs):
    """SEQ_2_SEQ_LM: the decoder self-attention gets the prefix; its cache reports ``P`` tokens."""
    B, _, _ = _batch_and_length(input_ids, inputs_embeds)
    _check_rows(adapter_names, B)
    _drop_token_type_ids(kwargs)
    P = rt.num_virtual_tokens
    state = rt.build_state(adapter_names)
    if decoder_attention_mask is not None:  # PEFT's: ones for the P cached virtual tokens
        ones = torch.ones(decoder_attention_mask.shape[0], P, dtype=decoder_attention_mask.dtype,
                          device=decoder_attention_mask.device)
        decoder_attention_mask = torch.cat((ones, decoder_attention_mask), dim=1)
    if kwargs.get("position_ids", None) is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    if find_prefix_state(kwargs.get(rt.cache_name)) is None:
        kwargs[rt.cache_name] = make_cache(state, rt.num_layers, encoder_decoder=True)
    kwargs[PREFIX_KWARG] = state
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                            return_dict=return_dict, **kwargs)


# ----------------------------------------------------------------------------- generate
def _max_new_tokens(base, input_length: int, kwargs) -> Optional[int]:
    cfg = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if new is not None:
        return int(new)
    max_length = kwargs.get("max_length", getattr(cfg, "max_length", None))
    return None if max_length is None else max(int(max_length) - input_length, 0)


def generate(rt, model, *args, adapter_names=None, **kwargs):
    """``generate`` of the base model with the prefix in every forward; positions as PEFT gives them."""
    base = model.get_base_model()
    if args:
        if "input_ids" in kwargs:
            raise TypeError("generate() got input_ids twice")
        kwargs["input_ids"], args = args[0], args[1:]
    input_ids = kwargs.get("input_ids")
    inputs_embeds = kwargs.get("inputs_embeds")
    if rt.encoder_decoder and input_ids is None:
        raise ValueError("input_ids must be provided for Peft model generation")
    B, L, device = _batch_and_length(input_ids, inputs_embeds)
    _check_rows(adapter_names, B)
    state = rt.build_state(adapter_names)
    P = rt.num_virtual_tokens
    _drop_token_type_ids(kwargs)
    if rt.window is not None:
        new = _max_new_tokens(base, L, kwargs)
        decoder_len = (1 + (new or 0)) if rt.encoder_decoder else L + (new or 0)
        if new is None or P + decoder_len > rt.window:
            raise NotImplementedError(
                f"softprompt_kernels: the model's sliding window ({rt.window}) is shorter than the {P} virtual tokens "
                f"+ {decoder_len if new is not None else 'an unbounded number of'} tokens this generate() call can "
                "reach, so the window would hide part of the prefix or sequence; pass a smaller max_new_tokens or "
                "call softprompt_kernels.remove(model)")
    if not rt.encoder_decoder:
        pos = kwargs.get("position_ids")
        if pos is None:
            ref = input_ids if input_ids is not None else torch.ones(B, L, dtype=torch.long, device=device)
            pos = _compat.generation_position_ids(base, ref, kwargs.get("attention_mask"))
        kwargs["position_ids"] = pos + P

    prepare = base.prepare_inputs_for_generation  # bound method (class attribute or an earlier override)
    had_override = "prepare_inputs_for_generation" in base.__dict__

    @functools.wraps(prepare)  # generate validates its kwargs against this signature
    def prepare_with_prefix(*a, **kw):
        inputs = prepare(*a, **kw)
        inputs[PREFIX_KWARG] = state
        if rt.encoder_decoder:
            cache = inputs.get(rt.cache_name)
            # a fresh prefix cache at prefill, and at every step without use_cache (the decoder then
            # re-reads its whole input, so a cache carried over would hold its tokens twice)
            fresh = inputs.get("use_cache", kw.get("use_cache")) is False
            if fresh or (find_prefix_state(cache) is None and (cache is None or cache.get_seq_length() == 0)):
                rows = inputs["decoder_input_ids"].shape[0]
                inputs[rt.cache_name] = make_cache(state.expand_rows(rows), rt.num_layers, encoder_decoder=True)
        return inputs

    base.prepare_inputs_for_generation = prepare_with_prefix
    try:
        return base.generate(*args, **kwargs)
    finally:
        if had_override:
            base.prepare_inputs_for_generation = prepare
        else:
            del base.prepare_inputs_for_generation

