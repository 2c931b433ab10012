"""``apply`` / ``remove`` for a PEFT ``PeftModel`` with ``PrefixTuningConfig``.

``apply`` keeps PEFT's own forward / generate logic (mask concatenation, position
offsets, labels, classification heads) and swaps three things on the instance:

* ``get_prompt`` returns a ``PrefixCache`` (lengths count the P virtual tokens, the
  stored K/V never contain them) built from the prefix computed ONCE by ``prefix_mlp``
  (``prefix_projection=True``) or read from the embedding (``False``);
* ``forward`` / ``prepare_inputs_for_generation`` add the kwarg ``softprompt_prefix``
  that carries the ``[num_layers, 2, T, Hkv, P, D]`` prefix to the attention function;
* the base config's attention implementation becomes ``softprompt_<backend>``.

``forward(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` run
rows with different prefix adapters in one batch (multi-task prefix form).
"""
from __future__ import annotations

import functools
import re
from types import MethodType
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import _compat
from .transformers import LAYER_ATTR, PREFIX_KWARG, PrefixState, find_prefix_state, make_cache, register

# model_type -> regex on module names selecting the attention modules that receive layer i's prefix
# (the modules PEFT's cache reaches: every self-attention; BART: decoder self-attention only).
_LAYER_PATTERNS = {
    "gpt2": r"(?:^|\.)h\.(\d+)\.attn$",
    "llama": r"(?:^|\.)layers\.(\d+)\.self_attn$",
    "mistral": r"(?:^|\.)layers\.(\d+)\.self_attn$",
    "qwen2": r"(?:^|\.)layers\.(\d+)\.self_attn$",
    "qwen3": r"(?:^|\.)layers\.(\d+)\.self_attn$",
    "gemma": r"(?:^|\.)layers\.(\d+)\.self_attn$",
    "bert": r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.self$",
    "roberta": r"(?:^|\.)encoder\.layer\.(\d+)\.attention\.self$",
    "bart": r"(?:^|\.)decoder\.layers\.(\d+)\.self_attn$",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_LAYER_PATTERNS))
_ATTR = "_softprompt_runtime"
_PATCHED = ("forward", "get_prompt", "prepare_inputs_for_generation", "generate")


def _peft_classes():
    from peft import PeftModel

    return PeftModel


class _Runtime:
    """What ``apply`` installed on one PeftModel (and what ``remove`` undoes)."""

    def __init__(self, model, backend: str, num_layers: int, encoder_decoder: bool, attn_name: str,
                 orig_attn: Optional[str]):
        self.model = model
        self.backend = backend
        self.num_layers = num_layers
        self.encoder_decoder = encoder_decoder
        self.attn_name = attn_name
        self.orig_attn = orig_attn
        self.pending: Optional[PrefixState] = None

    # ---------------------------------------------------------------- prefix
    def adapter_kv(self, adapter: str) -> Tensor:
        """``[num_layers, 2, Hkv, P, D]`` prefix of ``adapter`` (one prefix_mlp call)."""
        model = self.model
        cfg = model.peft_config[adapter]
        enc = model.prompt_encoder[adapter]
        NL, P = cfg.num_layers, cfg.num_virtual_tokens
        H = cfg.num_attention_heads
        D = cfg.token_dim // H
        weight = enc.embedding.weight
        if cfg.prefix_projection and not cfg.inference_mode:
            lin1, act, lin2 = enc.transform
            if not isinstance(act, torch.nn.Tanh):
                raise ValueError(f"PrefixEncoder.transform[1] must be Tanh (PEFT's), got {type(act).__name__}")
            from ..ops.prefix_mlp import prefix_mlp

            mlp_backend = self.backend if self.backend in ("auto", "triton", "torch") else "auto"
            kv = prefix_mlp(weight, lin1.weight, lin1.bias, lin2.weight, lin2.bias, num_layers=NL,
                            num_kv_heads=H, head_dim=D, activation="tanh", backend=mlp_backend)
        else:  # PEFT reads the embedding itself: row p = [layer, kv, head, d] flattened
            kv = weight.view(P, NL, 2, H, D).permute(1, 2, 3, 0, 4)
        dtype = model.base_model_torch_dtype
        if dtype is not None and kv.dtype != dtype:
            kv = kv.to(dtype)
        return kv

    def build_state(self, adapter_names: Optional[Sequence[str]] = None) -> PrefixState:
        model = self.model
        if adapter_names is None:
            kv = self.adapter_kv(model.active_adapter).unsqueeze(2)
            return PrefixState(kv, None, self.backend)
        names = list(adapter_names)
        order: List[str] = []
        for n in names:
            if n not in model.peft_config:
                raise ValueError(f"adapter_names: unknown adapter {n!r}; loaded: {sorted(model.peft_config)}")
            _check_prefix_config(model.peft_config[n], n)
            if n not in order:
                order.append(n)
        kvs = [self.adapter_kv(n) for n in order]
        shape = kvs[0].shape
        for n, kv in zip(order, kvs):
            if kv.shape != shape:
                raise ValueError(f"adapter_names: adapter {n!r} has prefix shape {tuple(kv.shape)}, "
                                 f"{order[0]!r} has {tuple(shape)}; mixed batches need equal num_virtual_tokens")
        active_p = model.active_peft_config.num_virtual_tokens
        if shape[-2] != active_p:  # PEFT sizes masks and positions from the active adapter
            raise ValueError(f"adapter_names: adapters have num_virtual_tokens={shape[-2]} but the active adapter "
                             f"{model.active_adapter!r} has {active_p}; they must be equal")
        kv = torch.stack(kvs, dim=2)
        device = kv.device
        index = torch.tensor([order.index(n) for n in names], dtype=torch.int64, device=device)
        return PrefixState(kv, index, self.backend)


def _check_prefix_config(cfg, name: str) -> None:
    if getattr(cfg, "peft_type", None) != _compat.prefix_tuning_type():
        raise ValueError(f"adapter {name!r} is {getattr(cfg, 'peft_type', None)}; softprompt_kernels.apply "
                         "supports PeftModel adapters with PrefixTuningConfig only")


def _find_layers(base_model, model_type: str, num_layers: int, encoder_decoder: bool) -> Dict[object, int]:
    """``{attention module: prefix layer}`` for the modules PEFT's cache reaches."""
    pattern = re.compile(_LAYER_PATTERNS[model_type])
    layers: Dict[object, int] = {}
    seen = set()
    for name, module in base_model.named_modules():
        m = pattern.search(name)
        if m:
            idx = int(m.group(1))
            layers[module] = _compat.seq2seq_prefix_layer(idx, num_layers) if encoder_decoder else idx
            seen.add(idx)
    if seen != set(range(num_layers)):
        raise ValueError(f"found attention layers {sorted(seen)} in the {model_type!r} model but the prefix has "
                         f"num_layers={num_layers}")
    return layers


def apply(model, *, backend: str = "auto"):
    """Route a PEFT prefix-tuning model's attention through ``prefix_attention`` (in place).

    ``model``: ``peft.PeftModel`` whose active adapter uses ``PrefixTuningConfig``
    (``prefix_projection`` True or False).  ``backend``: ``auto|triton|cuda|torch``
    for both ops.  Returns ``model``.  Numbers equal the stock PEFT path.
    """
    PeftModel = _peft_classes()
    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel with PrefixTuningConfig, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        remove(model)
    cfg = model.active_peft_config
    _check_prefix_config(cfg, model.active_adapter)
    base = model.get_base_model()
    config = base.config
    model_type = getattr(config, "model_type", None)
    if model_type not in _LAYER_PATTERNS:
        raise ValueError(f"softprompt_kernels.apply does not support model type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}. The stock PEFT path is left unchanged.")
    encoder_decoder = cfg.num_transformer_submodules == 2
    if encoder_decoder != bool(getattr(config, "is_encoder_decoder", False)):
        raise ValueError(f"PrefixTuningConfig.num_transformer_submodules={cfg.num_transformer_submodules} does not "
                         f"match the {model_type!r} model")
    layers = _find_layers(base, model_type, cfg.num_layers, encoder_decoder)
    name = register(backend)
    rt = _Runtime(model, backend, cfg.num_layers, encoder_decoder, name,
                  _compat.get_attn_implementation(config))
    for module, idx in layers.items():
        setattr(module, LAYER_ATTR, idx)
    _install(model, rt)
    _compat.set_attn_implementation(config, name)
    return model


def remove(model):
    """Undo ``apply``: stock PEFT behaviour and the original attention implementation. Returns ``model``."""
    rt = getattr(model, _ATTR, None)
    if rt is None:
        return model
    for attr in _PATCHED:
        model.__dict__.pop(attr, None)
    _compat.set_attn_implementation(model.get_base_model().config, rt.orig_attn)
    for module in model.get_base_model().modules():
        if LAYER_ATTR in module.__dict__:
            delattr(module, LAYER_ATTR)
    model.__dict__.pop(_ATTR, None)
    return model


def _runtime(model) -> _Runtime:
    return model.__dict__[_ATTR]


def _forward(self, *args, adapter_names=None, **kwargs):
    rt = _runtime(self)
    state = rt.build_state(adapter_names)  # the one prefix evaluation of this step
    prev, rt.pending = rt.pending, state
    try:
        kwargs[PREFIX_KWARG] = state
        return type(self).forward(self, *args, **kwargs)
    finally:
        rt.pending = prev


def _get_prompt(self, batch_size, task_ids=None, max_cache_len=None):
    rt = _runtime(self)
    state = rt.pending if rt.pending is not None else rt.build_state(None)
    return make_cache(state.expand_rows(batch_size), rt.num_layers, rt.encoder_decoder)


def _prepare_inputs_for_generation(self, *args, **kwargs):
    model_kwargs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    state = find_prefix_state(model_kwargs.get("past_key_values"))
    if state is not None:
        model_kwargs[PREFIX_KWARG] = state
    return model_kwargs


def _generate(self, *args, adapter_names=None, **kwargs):
    rt = _runtime(self)
    prev, rt.pending = rt.pending, (rt.build_state(adapter_names) if adapter_names is not None else None)
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        rt.pending = prev


def _install(model, rt: _Runtime) -> None:
    """Instance-level overrides; each keeps the signature of the method it wraps (Trainer reads it)."""
    cls = type(model)
    model.__dict__[_ATTR] = rt
    for name, impl in (("forward", _forward), ("get_prompt", _get_prompt),
                       ("prepare_inputs_for_generation", _prepare_inputs_for_generation), ("generate", _generate)):
        if not hasattr(cls, name):
            continue

        def make(impl=impl, orig=getattr(cls, name)):
            @functools.wraps(orig)
            def wrapper(self, *args, **kwargs):
                return impl(self, *args, **kwargs)
            return wrapper

        model.__dict__[name] = MethodType(make(), model)
