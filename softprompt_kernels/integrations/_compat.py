"""Every transformers / peft version-specific detail of the integration, in one place.

Supported: transformers 5.17 .. 5.23, peft 0.21.  Features are detected with
``hasattr`` / import probes rather than version strings where possible.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import transformers
from transformers import masking_utils
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

MIN_TRANSFORMERS = "5.17"
MIN_PEFT = "0.21"

__all__ = [
    "Cache", "DynamicCache", "DynamicLayer", "EncoderDecoderCache",
    "register_attention", "register_mask", "padding_mask", "is_plain_mask_function",
    "mask_function_is_causal", "get_attn_implementation", "set_attn_implementation",
]


def register_attention(name: str, fn: Callable) -> None:
    """Make ``config._attn_implementation = name`` dispatch to ``fn``."""
    transformers.AttentionInterface.register(name, fn)


def register_mask(name: str, fn: Callable) -> None:
    """Mask builder used by ``create_causal_mask`` & co. for ``name``.

    Without it transformers treats ``name`` as a mask-less backend and passes
    ``attention_mask=None`` (padding lost).
    """
    masking_utils.AttentionMaskInterface.register(name, fn)


def padding_mask(attention_mask: Optional[torch.Tensor], kv_length: int, kv_offset: int) -> Optional[torch.Tensor]:
    """The 2D bool padding mask ``[B, kv_length]`` (padded with False if short), or None."""
    if attention_mask is None:
        return None
    if hasattr(masking_utils, "prepare_padding_mask"):
        mask = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    else:  # pragma: no cover - older layout
        pad = kv_length + kv_offset - attention_mask.shape[-1]
        mask = torch.nn.functional.pad(attention_mask, (0, pad)) if pad > 0 else attention_mask
    mask = mask[:, kv_offset: kv_offset + kv_length]
    return mask.to(torch.bool)


def is_plain_mask_function(fn: Callable) -> Optional[bool]:
    """True: plain causal factory, False: plain bidirectional, None: something else."""
    if fn is getattr(masking_utils, "causal_mask_function", object()):
        return True
    if fn is getattr(masking_utils, "bidirectional_mask_function", object()):
        return False
    return None


def mask_function_is_causal(fn: Callable, batch_size: int, q_length: int, kv_length: int,
                            q_offset: int, kv_offset: int, device) -> bool:
    """Evaluate an index-based mask factory (e.g. Mistral's sliding window) on the index grid
    and return True iff it equals the plain causal pattern there (so the fused op is exact)."""
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = (torch.arange(q_length, device=device) + q_offset)[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    got = torch.as_tensor(fn(b, h, q, kv), device=device)
    return bool(torch.equal(got.expand(batch_size, 1, q_length, kv_length), (kv <= q).expand(batch_size, 1, q_length, kv_length)))


def get_attn_implementation(config) -> Optional[str]:
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, name: Optional[str]) -> None:
    """Switch the attention dispatch of ``config`` (and of its sub-configs) without re-validation."""
    configs = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            configs.append(sub)
    for cfg in configs:
        if hasattr(cfg, "_attn_implementation_internal"):
            cfg._attn_implementation_internal = name
        else:  # pragma: no cover
            cfg._attn_implementation = name


def seq2seq_prefix_layer(decoder_layer: int, num_layers: int) -> int:
    """Prefix layer that PEFT 0.21 puts into decoder self-attention layer ``decoder_layer``.

    PEFT builds the encoder-decoder cache from ``cat([kv, kv], dim=layers*2)`` split into
    chunks of 4 per layer, so decoder layer i receives the rows of prefix layer
    ``(2 i) mod num_layers`` (and every odd prefix layer goes unused).  Reproduced as is.
    """
    return (2 * decoder_layer) % num_layers


def prefix_tuning_type():
    from peft import PeftType

    return PeftType.PREFIX_TUNING
