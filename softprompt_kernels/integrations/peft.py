"""``apply`` / ``remove`` for a PEFT ``PeftModel`` with ``PrefixTuningConfig``.

``apply`` replaces the instance's ``forward`` and ``generate`` by ours
(``peft_forward``): PEFT stays the container of parameters, configs and checkpoint
files, but PEFT's prefix-tuning forward (which rides on ``past_key_values``) no longer
runs.  The prefix is computed ONCE per step (``prefix_mlp`` for
``prefix_projection=True``, a view of the embedding otherwise) and reaches every
attention layer as the kwarg ``softprompt_prefix``; the base config's attention
implementation becomes ``softprompt_<backend>``.

``forward(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` run
rows with different prefix adapters in one batch (multi-task prefix form).
"""
from __future__ import annotations

import functools
from types import MethodType
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _compat, model_map, peft_forward
from .transformers import LAYER_ATTR, PrefixState, register, relay_prefix_kwarg

_ATTR = "_softprompt_runtime"
_PATCHED = ("forward", "generate")
_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")


def _peft_classes():
    from peft import PeftModel

    return PeftModel


class _Runtime:
    """What ``apply`` installed on one PeftModel (and what ``remove`` undoes)."""

    def __init__(self, model, backend: str, attn_name: str, orig_attn: Optional[str]):
        cfg = model.active_peft_config
        base = model.get_base_model()
        self.model = model
        self.backend = backend
        self.attn_name = attn_name
        self.orig_attn = orig_attn
        self.num_layers = cfg.num_layers
        self.task_type = str(getattr(cfg.task_type, "value", cfg.task_type))
        self.encoder_decoder = cfg.num_transformer_submodules == 2
        self.cache_name = _compat.cache_kwarg(type(base).forward)
        self.window = model_map.sliding_window(base.config)
        self.drops_token_type_ids = self.task_type in ("CAUSAL_LM", "FEATURE_EXTRACTION")
        self.position_policy, self.position_module = model_map.position_policy(base)
        self.probe: Optional[set] = None  # set only while apply checks that the prefix reaches every layer
        self.hooks: list = []  # kwarg relays (transformers.relay_prefix_kwarg) that remove() takes off

    @property
    def num_virtual_tokens(self) -> int:
        """P of the active adapter (PEFT sizes positions from it; ``set_adapter`` may change it)."""
        return self.model.active_peft_config.num_virtual_tokens

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
            if weight.dtype == torch.float64:  # the fused op is 16/32-bit only: PEFT's own module, same layout
                kv = enc.transform(weight).view(P, NL, 2, H, D).permute(1, 2, 3, 0, 4)
            else:
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
        """The prefix of one forward / generate call: active adapter, or one adapter per row."""
        model = self.model
        if adapter_names is None:
            kv = self.adapter_kv(model.active_adapter).unsqueeze(2)
            return PrefixState(kv, None, self.backend, self.probe)
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
        return PrefixState(kv, index, self.backend, self.probe, index_checked=True)  # built in range


def _check_prefix_config(cfg, name: str) -> None:
    if getattr(cfg, "peft_type", None) != _compat.prefix_tuning_type():
        raise ValueError(f"adapter {name!r} is {getattr(cfg, 'peft_type', None)}; softprompt_kernels.apply "
                         "supports PeftModel adapters with PrefixTuningConfig only")


def _forward_impl(rt: _Runtime, model):
    """Which of ``peft_forward``'s forwards reproduces PEFT's path for this model."""
    if rt.encoder_decoder:
        return peft_forward.seq2seq_forward
    if rt.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") and rt.cache_name is None:
        return peft_forward.encoder_head_forward
    return peft_forward.decoder_forward


def _check_model(model, cfg, base) -> None:
    config = base.config
    model_type = getattr(config, "model_type", type(base).__name__)
    task = str(getattr(cfg.task_type, "value", cfg.task_type))
    if task not in _TASKS:
        raise ValueError(f"softprompt_kernels.apply: PEFT task type {task!r} is not supported; supported: "
                         f"{', '.join(_TASKS)}")
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if is_encoder_decoder and task != "SEQ_2_SEQ_LM":
        raise ValueError(f"softprompt_kernels.apply: task type {task} on the encoder-decoder model {model_type!r} is "
                         "not supported (the fused prefix path for encoder-decoder models is SEQ_2_SEQ_LM only)")
    if (cfg.num_transformer_submodules == 2) != is_encoder_decoder:
        raise ValueError(f"softprompt_kernels.apply: PrefixTuningConfig.num_transformer_submodules="
                         f"{cfg.num_transformer_submodules} does not match the {model_type!r} model")
    if not is_encoder_decoder and not _compat.accepts(type(base).forward, "position_ids"):
        raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: its forward takes no "
                         "position_ids, so the model's tokens cannot be given PEFT's positions P, P+1, ...")


def apply(model, *, backend: str = "auto"):
    """Route a PEFT prefix-tuning model's attention through ``prefix_attention`` (in place).

    ``model``: ``peft.PeftModel`` whose active adapter uses ``PrefixTuningConfig``
    (``prefix_projection`` True or False).  ``backend``: ``auto|triton|cuda|torch``
    for both ops.  Returns ``model``.  Numbers equal the stock PEFT path; what the op
    cannot express raises ``ValueError`` here, naming the model type and the reason.
    """
    PeftModel = _peft_classes()
    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a peft.PeftModel with PrefixTuningConfig, got {type(model).__name__}")
    name = register(backend)  # validates backend before anything changes
    cfg = model.active_peft_config
    _check_prefix_config(cfg, model.active_adapter)
    base = model.get_base_model()
    _check_model(model, cfg, base)
    layers = model_map.find_prefix_layers(base, cfg, cfg.num_transformer_submodules == 2)
    _compat.warn_if_untested()
    if getattr(model, _ATTR, None) is not None:
        remove(model)
    rt = _Runtime(model, backend, name, _compat.get_attn_implementation(base.config))
    for module, idx in layers.items():
        setattr(module, LAYER_ATTR, idx)
    _install(model, rt, _forward_impl(rt, model))
    _compat.set_attn_implementation(base.config, name)
    try:
        missed = _probe(model, rt, layers)
        if missed:  # layers that drop attention kwargs: relay the prefix to their attention module
            parents = _parents(base)
            for m in missed:
                rt.hooks += relay_prefix_kwarg(parents[m], m)
            missed = _probe(model, rt, layers)
        if missed:
            model_type = getattr(base.config, "model_type", type(base).__name__)
            raise ValueError(f"softprompt_kernels.apply: model type {model_type!r} is not supported: the prefix "
                             f"kwarg does not reach the attention modules of prefix layers "
                             f"{sorted(layers[m] for m in missed)}")
    except BaseException:
        remove(model)
        raise
    return model


def _parents(root) -> dict:
    return {child: parent for parent in root.modules() for child in parent.children()}


def _probe(model, rt: _Runtime, layers) -> list:
    """One tiny eval-mode forward (batch 1, 2 tokens, no grad, RNG state kept) that records which
    prefix layers the prefix kwarg reaches (some families' layers drop attention kwargs, which
    would silently lose the prefix).  Returns the attention modules it missed."""
    base = model.get_base_model()
    param = next(base.parameters(), None)
    if param is None or param.device.type == "meta":
        return []
    device = param.device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if rt.encoder_decoder:
        inputs["decoder_input_ids"] = ids
    modes = [(m, m.training) for m in model.modules()]
    rt.probe = set()
    try:
        model.eval()
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model(**inputs)
        return [m for m in layers if id(m) not in rt.probe]
    finally:
        rt.probe = None
        for m, mode in modes:
            m.training = mode


def remove(model):
    """Undo ``apply``: stock PEFT behaviour and the original attention implementation. Returns ``model``."""
    rt = model.__dict__.get(_ATTR)
    if rt is None:
        return model
    for attr in _PATCHED:
        model.__dict__.pop(attr, None)
    for handle in rt.hooks:
        handle.remove()
    _compat.set_attn_implementation(model.get_base_model().config, rt.orig_attn)
    for module in model.get_base_model().modules():
        if LAYER_ATTR in module.__dict__:
            delattr(module, LAYER_ATTR)
    model.__dict__.pop(_ATTR, None)
    return model


def _install(model, rt: _Runtime, forward_impl) -> None:
    """Instance-level overrides; each keeps the signature of the method it wraps (Trainer reads it)."""
    cls = type(model)
    model.__dict__[_ATTR] = rt

    def make(impl, orig):
        @functools.wraps(orig)
        def wrapper(self, *args, **kwargs):  # the runtime is looked up on self: deepcopy-safe
            return impl(self.__dict__[_ATTR], self, *args, **kwargs)
        return wrapper

    model.__dict__["forward"] = MethodType(make(forward_impl, cls.forward), model)
    if hasattr(cls, "generate"):
        model.__dict__["generate"] = MethodType(make(peft_forward.generate, cls.generate), model)
