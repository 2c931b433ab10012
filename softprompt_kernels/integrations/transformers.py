"""Hugging Face transformers side of the integration.

* ``PrefixState``: the per-step prefix ``[num_layers, 2, T, Hkv, P, D]`` (T = 1 for the
  shared prefix) plus the optional row->task index ``[B]``; attention modules carry
  their prefix layer in the attribute ``_softprompt_prefix_layer``.  It travels to the attention function as the
  forward kwarg ``softprompt_prefix`` (kwargs survive gradient checkpointing).
* ``PrefixCache``: a ``DynamicCache`` whose layers hold only the model's own tokens but
  report ``P`` extra tokens.  Used only for encoder-decoder models, whose decoder takes
  no ``position_ids``: there the reported length is what gives the decoder tokens PEFT's
  positions ``P, P+1, ...``.  Decoder-only and encoder models get explicit ``position_ids``
  and a plain cache of their own tokens.
* ``attention_forward`` / ``mask_forward``: registered with ``AttentionInterface`` /
  ``AttentionMaskInterface`` under ``softprompt_<backend>``.  The mask function returns
  the 2D bool padding mask ``[B, kv_length]`` (True = real token) or None; the
  attention function keeps its last ``S`` columns (those of the module's keys) and calls
  ``prefix_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.prefix_attention import check_prefix_index_range, prefix_attention
from . import _compat

PREFIX_KWARG = "softprompt_prefix"
LAYER_ATTR = "_softprompt_prefix_layer"  # set on the attention modules that receive a prefix
_BACKENDS = ("auto", "triton", "cuda", "torch")


def attn_implementation_name(backend: str) -> str:
    return f"softprompt_{backend}"


class PrefixState:
    """Prefix of one forward / one ``generate`` call.

    kv: ``[num_layers, 2, T, Hkv, P, D]`` (any strides); index: None (shared prefix,
    T == 1) or int64 ``[B]`` in ``[0, T)``.  An attention module receives prefix layer
    ``module._softprompt_prefix_layer`` (modules without it get no prefix).
    """

    def __init__(self, kv: Tensor, index: Optional[Tensor], backend: str, reached: Optional[set] = None, *,
                 index_checked: bool = False):
        if kv.dim() != 6 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [num_layers, 2, T, Hkv, P, D], got {tuple(kv.shape)}")
        if index is None and kv.shape[2] != 1:
            raise ValueError("a prefix with T > 1 tasks needs an index [B]")
        if index is not None and not index_checked and index.numel() and not torch.compiler.is_compiling():
            # checked once per state (one host read), not once per layer: attention calls then
            # skip the op's host-side check (it still clamps and asserts on device)
            check_prefix_index_range(index, kv.shape[2])
        self.kv = kv
        self.index = index
        self.backend = backend
        self.reached = reached  # apply's probe: ids of the modules the prefix reached (None otherwise)

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[-2]

    def for_module(self, module, batch_size: int):
        """(prefix_k, prefix_v, prefix_index) for ``module`` and a batch of ``batch_size`` rows, or
        (None, None, None).  An index of ``n`` rows is ``repeat_interleave``-d to ``batch_size``
        (``generate`` expands every input row to its beams / return sequences that way)."""
        layer = getattr(module, LAYER_ATTR, None)
        if layer is None:
            return None, None, None
        if self.index is None:  # shared form [Hkv, P, D]
            return self.kv[layer, 0, 0], self.kv[layer, 1, 0], None
        return self.kv[layer, 0], self.kv[layer, 1], self.expand_rows(batch_size).index

    def expand_rows(self, batch_size: int) -> "PrefixState":
        """Same prefix for a batch ``repeat_interleave``-d to ``batch_size`` rows (beam search)."""
        if self.index is None or self.index.shape[0] == batch_size:
            return self
        if self.index.shape[0] == 0 or batch_size % self.index.shape[0]:
            raise ValueError(f"adapter_names has {self.index.shape[0]} entries but the batch has {batch_size} rows "
                             "(one adapter name per row)")
        idx = self.index.repeat_interleave(batch_size // self.index.shape[0])
        return PrefixState(self.kv, idx, self.backend, self.reached, index_checked=True)


class PrefixLayer(_compat.DynamicLayer):
    """A ``DynamicLayer`` that stores only real tokens but counts ``prefix_len`` more."""

    def __init__(self, prefix_len: int, **kwargs):
        super().__init__(**kwargs)
        self.prefix_len = prefix_len

    def _stored(self) -> int:
        return super().get_seq_length()

    def get_seq_length(self) -> int:
        return self.prefix_len + self._stored()

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx):
        if self._stored() > 0:
            super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._stored() > 0:
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        if self._stored() > 0:
            super().batch_select_indices(indices)


class PrefixCache(_compat.DynamicCache):
    """KV cache for a prefix-tuned model: layer l's prefix lives in ``prefix_state``,
    the cached K/V hold only the model's own tokens; lengths include the prefix."""

    def __init__(self, prefix_state: PrefixState, num_layers: int):
        P = prefix_state.num_virtual_tokens
        _compat.Cache.__init__(self, layers=[PrefixLayer(P) for _ in range(num_layers)])
        self.prefix_state = prefix_state


def make_cache(state: PrefixState, num_layers: int, encoder_decoder: bool):
    cache = PrefixCache(state, num_layers)
    if encoder_decoder:  # as PEFT: prefix in decoder self-attention only, fresh cross-attention cache
        return _compat.EncoderDecoderCache(cache, _compat.DynamicCache())
    return cache


def find_prefix_state(cache) -> Optional[PrefixState]:
    if isinstance(cache, PrefixCache):
        return cache.prefix_state
    inner = getattr(cache, "self_attention_cache", None)
    if isinstance(inner, PrefixCache):
        return inner.prefix_state
    return None


# ----------------------------------------------------------------------------- kwarg relay
_PENDING = "_softprompt_pending_prefix"


def relay_prefix_kwarg(layer: torch.nn.Module, attention: torch.nn.Module) -> list:
    """For layers that take ``**kwargs`` but do not pass them on to their attention module
    (StableLM's decoder layer, for one): hooks that hand the prefix kwarg the layer received
    to ``attention``.  Set at the start of every layer call and cleared at its end, so a call
    without the kwarg (the base model used directly) never sees a stale prefix.
    Gradient checkpointing re-runs such a layer's forward without its hooks (transformers >= 5.24
    checkpoints ``forward``, not ``__call__``), i.e. without the prefix: refused with
    NotImplementedError rather than giving other gradients.  Returns the hook handles."""

    def capture(_layer, args, kwargs):
        state = kwargs.get(PREFIX_KWARG)
        if (state is not None and getattr(_layer, "gradient_checkpointing", False) and _layer.training
                and torch.is_grad_enabled()):
            raise NotImplementedError(
                f"softprompt_kernels: {type(_layer).__name__} does not pass attention kwargs on to its attention "
                "module, so gradient checkpointing would recompute it without the prefix; disable gradient "
                "checkpointing for this model (or call softprompt_kernels.remove(model))")
        attention.__dict__[_PENDING] = state

    def release(_layer, args, kwargs, output):
        attention.__dict__[_PENDING] = None

    def inject(_attention, args, kwargs):
        pending = attention.__dict__.get(_PENDING)
        if pending is not None and kwargs.get(PREFIX_KWARG) is None:
            kwargs = dict(kwargs)
            kwargs[PREFIX_KWARG] = pending
            return args, kwargs
        return None

    return [layer.register_forward_pre_hook(capture, with_kwargs=True),
            layer.register_forward_hook(release, with_kwargs=True),
            attention.register_forward_pre_hook(inject, with_kwargs=True)]


# ----------------------------------------------------------------------------- dispatch
def mask_forward(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[Tensor] = None, use_vmap: bool = False,
                 device="cpu", **kwargs) -> Optional[Tensor]:
    """Mask builder: 2D bool ``[B, kv_length]`` padding mask (True = real token) or None.

    Causality comes from the attention module; a factory other than the plain causal /
    bidirectional one (e.g. a sliding window) is accepted only where it equals plain
    causal attention on this call's index grid, otherwise a ``RefusedMask`` (the layers
    that use it raise NotImplementedError).
    """
    if mask_function is not None and _compat.is_plain_mask_function(mask_function) is None:
        ok = False
        if not use_vmap:
            try:
                ok = _compat.mask_function_is_causal(mask_function, batch_size, q_length, kv_length,
                                                     int(q_offset), int(kv_offset), device)
            except Exception:  # noqa: BLE001 - not index-broadcastable
                ok = False
        if not ok:  # refused where a layer uses it (a model may build masks that no layer reads)
            return RefusedMask(
                "softprompt_kernels: this model builds an attention mask (sliding window / chunked / custom overlay) "
                "that is not plain causal or bidirectional attention over the prefix and the sequence at this length; "
                "call softprompt_kernels.remove(model) to use the stock PEFT path")
    return _compat.padding_mask(attention_mask, kv_length, int(kv_offset))


class RefusedMask:
    """What ``mask_forward`` returns for a mask the op cannot express; an attention call that
    receives it raises ``NotImplementedError`` with ``reason``."""

    def __init__(self, reason: str):
        self.reason = reason


def _unsupported(kwargs) -> Optional[str]:
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return name
    return None


def _check_window(module, kwargs, num_virtual_tokens: int, num_keys: int) -> None:
    """A sliding window hides keys once prefix + sequence outgrow it: refuse, never differ."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None and not isinstance(window, bool) and num_virtual_tokens + num_keys > int(window):
        raise NotImplementedError(
            f"softprompt_kernels: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses a sliding "
            f"window of {int(window)} keys, but the {num_virtual_tokens} virtual tokens + {num_keys} tokens exceed it, so "
            "the window would hide part of the prefix or sequence; call softprompt_kernels.remove(model) for that length")


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      scaling: Optional[float] = None, dropout: float = 0.0, *, _backend: str = "auto", **kwargs):
    """transformers attention function: q ``[B,Hq,L,D]``, k/v ``[B,Hkv,S,D]`` -> ``([B,L,Hq,D], None)``."""
    bad = _unsupported(kwargs)
    if bad is not None:
        raise NotImplementedError(f"softprompt_kernels attention does not support {bad!r} "
                                  f"({type(module).__name__}); call softprompt_kernels.remove(model)")
    state: Optional[PrefixState] = kwargs.get(PREFIX_KWARG)
    if state is None:  # modules whose callers cannot forward kwargs get it as an attribute (vision.py)
        state = module.__dict__.get(_PENDING)
    pk = pv = idx = None
    backend = _backend
    S = key.shape[2]
    if isinstance(attention_mask, RefusedMask):
        raise NotImplementedError(f"{attention_mask.reason} ({type(module).__name__})")
    if state is not None:
        if state.reached is not None:
            state.reached.add(id(module))
        pk, pv, idx = state.for_module(module, query.shape[0])
        backend = state.backend
        if pk is not None:
            if pk.dtype != query.dtype:
                pk, pv = pk.to(query.dtype), pv.to(query.dtype)
            _check_window(module, kwargs, pk.shape[-2], S)
    kpm = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 2:
            raise TypeError(
                "softprompt attention expects the 2D bool key-padding mask built by its registered mask function, got "
                f"{attention_mask.dtype} {tuple(attention_mask.shape)} ({type(module).__name__})")
        if attention_mask.shape[1] < S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} keys, fewer than the {S} keys of "
                             f"{type(module).__name__}")
        kpm = attention_mask[:, attention_mask.shape[1] - S:]  # drop the P prefix columns PEFT prepends
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    out = prefix_attention(
        query, key, value, pk, pv, prefix_index=idx, causal=bool(is_causal),
        key_padding_mask=kpm, softmax_scale=scaling, dropout_p=float(dropout), backend=backend,
        check_prefix_index=False,  # PrefixState checked it once for the whole forward
    )
    return out.transpose(1, 2).contiguous(), None  # a no-op: out is [B, L, Hq, D] storage (ops/layout.py)


def register(backend: str = "auto") -> str:
    """Register attention + mask functions for ``backend``; returns the attn_implementation name."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    name = attn_implementation_name(backend)

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, scaling, dropout, _backend=backend, **kwargs)

    fn.__name__ = f"softprompt_attention_{backend}"
    _compat.register_attention(name, fn)
    _compat.register_mask(name, mask_forward)
    return name
