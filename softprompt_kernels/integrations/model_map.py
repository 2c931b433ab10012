"""Which attention modules of a Hugging Face model receive which prefix layer, derived from
the model itself (no per-family table), and what the fused op cannot express.

* An *attention module* is a module whose ``forward`` dispatches through transformers'
  ``ALL_ATTENTION_FUNCTIONS`` and that carries an integer ``layer_idx``.
* Decoder-only and encoder models: every self-attention module gets prefix layer
  ``layer_idx`` (what PEFT's cache reaches).  Encoder-decoder models: only the decoder's
  causal self-attention does, with PEFT's layer map (``_compat.seq2seq_prefix_layer``);
  encoder and cross-attention run without a prefix.
"""
from __future__ import annotations

import inspect
import re
from typing import Dict, List, Optional

from torch import nn

from . import _compat


def _dispatches_through_interface(module: nn.Module) -> bool:
    fwd = inspect.unwrap(type(module).forward)
    code = getattr(fwd, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _is_cross_attention(module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    return "cross" in type(module).__name__.lower()


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """Attention modules (see module docstring) in ``named_modules`` order."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and _dispatches_through_interface(m)]


def _refusal(config, peft_cfg) -> Optional[str]:
    """Reason the fused op cannot reproduce this model's attention, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "alibi", False) or "alibi" in str(getattr(text, "position_embedding_type", "")).lower():
        return "it uses ALiBi position biases"
    if getattr(text, "relative_attention_num_buckets", None):
        return "it adds a learned relative position bias (T5-style) to the attention scores"
    pet = str(getattr(text, "position_embedding_type", "absolute") or "absolute").lower()
    if pet.startswith("relative"):
        return f"it uses position_embedding_type={pet!r} (a bias the op does not add)"
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(text, name, None) is not None:
            return f"it soft-caps attention logits ({name}={getattr(text, name)})"
    if getattr(text, "attention_chunk_size", None):
        return f"it uses chunked attention (attention_chunk_size={text.attention_chunk_size})"
    window = sliding_window(config)
    if window is not None and window <= peft_cfg.num_virtual_tokens:
        return (f"its sliding window ({window}) cannot even hold the {peft_cfg.num_virtual_tokens} virtual tokens "
                "(PEFT's cache would hide part of the prefix)")
    return None


def sliding_window(config) -> Optional[int]:
    """Window length the config enables for some layer, or None (full attention everywhere)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def find_prefix_layers(base_model: nn.Module, peft_cfg, encoder_decoder: bool) -> Dict[nn.Module, int]:
    """``{attention module: prefix layer}``; ValueError naming the model type and the reason
    when the model cannot take a fused prefix."""
    config = base_model.config
    model_type = getattr(config, "model_type", type(base_model).__name__)
    reason = _refusal(config, peft_cfg)
    if reason is not None:
        raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: {reason}. "
                         "The stock PEFT path is left unchanged.")
    modules = attention_modules(base_model)
    if encoder_decoder:
        decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else None
        if decoder is None:
            raise ValueError(f"softprompt_kernels.apply: cannot find the decoder of the {model_type!r} model")
        in_decoder = {id(m) for m in decoder.modules()}
        modules = [m for m in modules if id(m) in in_decoder and getattr(m, "is_causal", False)
                   and not _is_cross_attention(m)]
    else:
        modules = [m for m in modules if not _is_cross_attention(m)]
    if not modules:
        raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: none of its "
                         "attention modules dispatches through transformers' AttentionInterface")
    num_layers = peft_cfg.num_layers
    layers: Dict[nn.Module, int] = {}
    for m in modules:
        idx = m.layer_idx
        layers[m] = _compat.seq2seq_prefix_layer(idx, num_layers) if encoder_decoder else idx
    seen = sorted({m.layer_idx for m in modules})
    if seen != list(range(num_layers)) or len(modules) != num_layers:
        raise ValueError(f"softprompt_kernels.apply: the {model_type!r} model has {len(modules)} prefix-receiving "
                         f"attention modules with layer indices {seen}, but the prefix has num_layers={num_layers}")
    _check_head_shapes(layers, peft_cfg, model_type)
    return layers


def _check_head_shapes(layers: Dict[nn.Module, int], peft_cfg, model_type: str) -> None:
    """Per-layer head dims / KV-head counts must equal the prefix's (Gemma-style variation is refused)."""
    hkv = peft_cfg.num_attention_heads
    d = peft_cfg.token_dim // peft_cfg.num_attention_heads
    for m in layers:
        got_d = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if isinstance(got_d, int) and got_d != d:
            raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: layer "
                             f"{m.layer_idx} has head_dim {got_d}, the PEFT prefix has {d} (token_dim // "
                             "num_attention_heads); per-layer head sizes are not supported")
        cfg = getattr(m, "config", None)
        groups = getattr(m, "num_key_value_groups", None)
        heads = getattr(cfg, "num_attention_heads", None) if cfg is not None else None
        if isinstance(groups, int) and isinstance(heads, int) and groups > 0 and heads // groups != hkv:
            raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: layer "
                             f"{m.layer_idx} has {heads // groups} key/value heads, the PEFT prefix has {hkv}")


_MASK_CUMSUM = re.compile(r"cumsum\(\s*\w*attention_mask")


def position_policy(base_model: nn.Module):
    """How the model numbers its tokens when no ``position_ids`` are given, which decides the
    positions PEFT's ``P``-token cache produces:

    * ``("padding_idx", embeddings)``: RoBERTa-style ``create_position_ids_from_input_ids``
      (count of real tokens from ``padding_idx``, plus the cache length);
    * ``("mask_cumsum", None)``: OPT-style, running count of the attention mask (over PEFT's
      ``[1]*P + mask``);
    * ``("arange", None)``: ``cache length + arange(L)`` (every other family seen).
    """
    for m in base_model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return "padding_idx", m
    for cls in {type(m) for m in base_model.modules()}:
        try:
            src = inspect.getsource(inspect.unwrap(cls.forward))
        except (OSError, TypeError):
            continue
        if _MASK_CUMSUM.search(src):
            return "mask_cumsum", None
    return "arange", None


def attention_modules_unindexed(model: nn.Module) -> List[nn.Module]:
    """Modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS`` (``layer_idx`` or not:
    vision encoders carry none), in ``named_modules`` order."""
    return [m for m in model.modules() if _dispatches_through_interface(m)]
