"""Every transformers / peft version-specific detail of the integration, in one place.

Tested: transformers 5.17 .. 5.25, peft 0.21.  Features are detected with signature /
attribute probes, not version strings; the version range only drives the warning that
``apply`` gives on an untested release.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional

import torch
import transformers
from transformers import masking_utils
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

TESTED_TRANSFORMERS = ("5.17", "5.25")  # oldest and newest minor release the test suite runs
TESTED_PEFT = ("0.21", "0.21")

__all__ = [
    "Cache", "DynamicCache", "DynamicLayer", "EncoderDecoderCache", "TESTED_TRANSFORMERS",
    "register_attention", "register_mask", "padding_mask", "is_plain_mask_function",
    "mask_function_is_causal", "get_attn_implementation", "set_attn_implementation",
    "cache_kwarg", "accepts", "generation_position_ids", "warn_if_untested",
]


def _minor(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def warn_if_untested() -> Optional[str]:
    """Warn (once per call) when the installed transformers / peft is outside the tested range."""
    import peft

    msgs = []
    for name, version, (lo, hi) in (("transformers", transformers.__version__, TESTED_TRANSFORMERS),
                                    ("peft", peft.__version__, TESTED_PEFT)):
        if not _minor(lo) <= _minor(version) <= _minor(hi):
            msgs.append(f"{name} {version} (tested: {lo} .. {hi})")
    if not msgs:
        return None
    msg = ("softprompt_kernels.apply has not been tested with " + ", ".join(msgs) + "; the integration checks "
           "what it relies on, but compare a few outputs with the stock PEFT path (softprompt_kernels.remove) "
           "before trusting it")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


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
    pad = kv_length + kv_offset - attention_mask.shape[-1]
    mask = torch.nn.functional.pad(attention_mask, (0, pad)) if pad > 0 else attention_mask
    mask = mask[:, kv_offset: kv_offset + kv_length]
    return mask.to(torch.bool)


_CAUSAL = getattr(masking_utils, "causal_mask_function", None)
_BIDIRECTIONAL = getattr(masking_utils, "bidirectional_mask_function", None)


def is_plain_mask_function(fn: Callable) -> Optional[bool]:
    """True: plain causal factory, False: plain bidirectional, None: something else."""
    if _CAUSAL is not None and fn is _CAUSAL:
        return True
    if _BIDIRECTIONAL is not None and fn is _BIDIRECTIONAL:
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
    want = (kv <= q).expand(batch_size, 1, q_length, kv_length)
    return bool(torch.equal(got.expand(batch_size, 1, q_length, kv_length), want))


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


def _params(fn) -> dict:
    try:
        return dict(inspect.signature(inspect.unwrap(fn)).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return {}


def accepts(fn, name: str) -> bool:
    """True iff ``fn`` has a parameter called ``name`` (decorators unwrapped)."""
    return name in _params(fn)


def cache_kwarg(fn) -> Optional[str]:
    """Name of the KV-cache argument of a model ``forward``: ``"cache"`` (transformers >= 5.24),
    ``"past_key_values"`` (earlier), or None when it takes none (encoder heads)."""
    params = _params(fn)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def generation_position_ids(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``position_ids`` that ``model.generate`` derives from a 2D attention mask (left padding
    aware), computed by transformers' own helper where it has one."""
    helper = getattr(model, "_prepare_position_ids_for_generation", None)
    if helper is not None:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        try:
            return helper(input_ids, kwargs)
        except TypeError:  # pragma: no cover - other signature
            pass
    if attention_mask is None:  # pragma: no cover
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


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
