"""Visual prompt tuning (VPT, Jia et al. 2022) for Hugging Face vision transformers.

``add_visual_prompts(model, N, deep=True)`` attaches a ``VisualPrompts`` module whose
``.weight`` is the one trainable parameter: ``[num_layers, N, hidden]`` (deep) or
``[1, N, hidden]`` (shallow).  Semantics are the token formulation of the paper: prompts
sit after the CLS (and distillation / register) tokens with no position embedding; deep
prompts are replaced before every layer; prompt outputs never reach the final norm, the
pooler or the classifier.

* **deep**: a deep prompt is only ever a key/value for the image tokens (its outputs are
  replaced before the next layer), so it runs as a prefix: per layer,
  ``K = W_k LN(prompt)``, ``V = W_v LN(prompt)`` with that layer's own pre-attention norm
  and projections, computed once per step (batch-independent; with ``prompt_dropout`` in
  training each image gets its own dropped prompts, as VPT does, through the per-row
  prefix form) and handed to ``prefix_attention`` as ``[H, N, D]``.  No prompt query,
  attention row or MLP row is computed.
* **shallow**: the prompts are real tokens: inserted after the embeddings, removed before
  the final norm; they run through the model's normal attention.

Found from the model, not per family: the backbone (``model.base_model``), its
``embeddings`` (leading special tokens = CLS + ``distillation_token`` + ``register_tokens``),
the layers (the ``ModuleList`` holding the attention modules that dispatch through
``ALL_ATTENTION_FUNCTIONS``), each layer's pre-attention norm (its first ``LayerNorm``), the
key / value projections (``k_proj``/``v_proj`` or ``key``/``value``) and the final
``layernorm``.  ``add_visual_prompts`` checks the derivation numerically on layer 0 (prefix
result == token result) and refuses a model where it does not hold.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _compat, model_map
from .transformers import _PENDING, LAYER_ATTR, PREFIX_KWARG, PrefixState, register

_ATTR = "_softprompt_visual"


class VisualPrompts(nn.Module):
    """The prompts of one model: ``weight`` ``[num_layers, N, hidden]`` (deep) or ``[1, N, hidden]``."""

    def __init__(self, num_layers: int, num_prompts: int, hidden: int, *, deep: bool, prompt_dropout: float,
                 init_range: float):
        super().__init__()
        self.deep = deep
        self.num_prompts = num_prompts
        self.weight = nn.Parameter(torch.empty(num_layers if deep else 1, num_prompts, hidden))
        nn.init.uniform_(self.weight, -init_range, init_range)
        self.dropout = nn.Dropout(prompt_dropout)

    def extra_repr(self) -> str:
        return f"deep={self.deep}, num_prompts={self.num_prompts}, prompt_dropout={self.dropout.p}"

    def save(self, path: str) -> None:
        """Write the prompts (and their mode) to a safetensors file."""
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach().contiguous().cpu()}, path,
                  metadata={"deep": str(self.deep), "num_prompts": str(self.num_prompts)})

    def load(self, path: str) -> "VisualPrompts":
        """Read prompts written by ``save`` (shape must match)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            weight = f.get_tensor("weight")
            deep = f.metadata().get("deep") if f.metadata() else None
        if deep is not None and (deep == "True") != self.deep:
            raise ValueError(f"{path} holds {'deep' if deep == 'True' else 'shallow'} prompts; this module is "
                             f"{'deep' if self.deep else 'shallow'}")
        if weight.shape != self.weight.shape:
            raise ValueError(f"{path} holds prompts of shape {tuple(weight.shape)}, expected {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight)
        return self


class _Parts:
    """The pieces of a ViT-style model that VPT touches (see module docstring)."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        self.model_type = model_type
        backbone = getattr(model, "base_model", model)
        emb = getattr(backbone, "embeddings", None)
        norm = getattr(backbone, "layernorm", None)
        if emb is None or getattr(emb, "cls_token", None) is None or not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"add_visual_prompts: model type {model_type!r} is not a ViT-style image model "
                             "(needs embeddings with a cls_token and a final `layernorm`)")
        self.backbone, self.embeddings, self.final_norm = backbone, emb, norm
        self.num_special = 1 + int(getattr(emb, "distillation_token", None) is not None)
        registers = getattr(emb, "register_tokens", None)
        if registers is not None:
            self.num_special += registers.shape[1]
        attn = model_map.attention_modules_unindexed(backbone)
        parents = {c: p for p in backbone.modules() for c in p.children()}
        self.layers: List[nn.Module] = []
        self.attention: List[nn.Module] = []
        for a in attn:
            layer = a
            while layer in parents and not isinstance(parents[layer], nn.ModuleList):
                layer = parents[layer]
            if layer not in parents:
                raise ValueError(f"add_visual_prompts: model type {model_type!r}: cannot find the layer of "
                                 f"{type(a).__name__}")
            self.layers.append(layer)
            self.attention.append(a)
        if not self.layers:
            raise ValueError(f"add_visual_prompts: model type {model_type!r} is not supported: no attention module "
                             "dispatches through transformers' AttentionInterface")
        self.norms = []
        self.kv_proj = []
        for layer, a in zip(self.layers, self.attention):
            ln = next((m for m in layer.children() if isinstance(m, nn.LayerNorm)), None)
            k = getattr(a, "k_proj", None) or getattr(a, "key", None)
            v = getattr(a, "v_proj", None) or getattr(a, "value", None)
            if ln is None or not isinstance(k, nn.Linear) or not isinstance(v, nn.Linear):
                raise ValueError(f"add_visual_prompts: model type {model_type!r} is not supported: layer "
                                 f"{type(layer).__name__} has no pre-attention LayerNorm and key/value projections")
            self.norms.append(ln)
            self.kv_proj.append((k, v))
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.head_dim = self.kv_proj[0][0].out_features // self.heads

    def prefix_kv(self, prompts: Tensor) -> Tensor:
        """prompts ``[R, NL, N, hidden]`` (R = 1 shared or B rows) -> ``[NL, 2, R, H, N, D]``."""
        R, _, N, _ = prompts.shape
        out = []
        for i, (ln, (k, v)) in enumerate(zip(self.norms, self.kv_proj)):
            x = ln(prompts[:, i])
            kk = k(x).view(R, N, self.heads, self.head_dim).transpose(1, 2)
            vv = v(x).view(R, N, self.heads, self.head_dim).transpose(1, 2)
            out.append(torch.stack((kk, vv)))
        return torch.stack(out)


class _VisualRuntime:
    def __init__(self, model, parts: _Parts, prompts: VisualPrompts, backend: str, orig_attn):
        self.model, self.parts, self.prompts, self.backend, self.orig_attn = model, parts, prompts, backend, orig_attn
        self.hooks: list = []
        # True: the prefix travels as a forward kwarg; False: this transformers' layers take no
        # **kwargs, so it is set on the attention modules for the duration of one forward
        self.kwarg_mode = True

    def state(self, batch_size: int) -> PrefixState:
        p = self.prompts
        w = p.weight
        if p.training and p.dropout.p > 0:  # VPT drops each image's prompts independently
            rows = p.dropout(w.unsqueeze(0).expand(batch_size, *w.shape))
            kv = self.parts.prefix_kv(rows)
            index = torch.arange(batch_size, device=w.device)
            return PrefixState(kv.to(self._dtype()), index, self.backend, index_checked=True)  # one task per row
        kv = self.parts.prefix_kv(w.unsqueeze(0))
        return PrefixState(kv.to(self._dtype()), None, self.backend)

    def _dtype(self):
        return self.parts.kv_proj[0][0].weight.dtype


def _visual_forward(self, *args, **kwargs):
    rt: _VisualRuntime = self.__dict__[_ATTR]
    pixel_values = kwargs.get("pixel_values", args[0] if args else None)
    if pixel_values is None:
        raise ValueError("add_visual_prompts: the model needs pixel_values")
    state = rt.state(pixel_values.shape[0])
    if rt.kwarg_mode:
        kwargs[PREFIX_KWARG] = state
        return type(self).forward(self, *args, **kwargs)
    if any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in rt.parts.layers):
        raise NotImplementedError(
            f"add_visual_prompts: the {rt.parts.model_type!r} layers of this transformers release take no attention "
            "kwargs, so gradient checkpointing would recompute them without the prompts; disable it (or upgrade "
            "transformers)")
    for a in rt.parts.attention:
        a.__dict__[_PENDING] = state
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for a in rt.parts.attention:
            a.__dict__[_PENDING] = None


def _uniform_range(model, hidden: int) -> float:
    """VPT's Xavier-uniform range over the patch dimension: sqrt(6 / (C * p * p + hidden))."""
    cfg = model.config
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else math.prod(cfg.patch_size)
    patch_area = patch * patch if isinstance(cfg.patch_size, int) else patch
    return math.sqrt(6.0 / (getattr(cfg, "num_channels", 3) * patch_area + hidden))


def add_visual_prompts(model: nn.Module, num_prompts: int, *, deep: bool = True, prompt_dropout: float = 0.0,
                       init: str = "uniform", backend: str = "auto") -> VisualPrompts:
    """Attach VPT prompts to a Hugging Face ViT-style model (in place) and return them.

    ``model``: e.g. ``ViTModel``, ``ViTForImageClassification``, DeiT, DINOv2 (with registers
    too).  ``num_prompts`` N >= 1.  ``deep``: prompts in every layer (as a prefix) or only at
    the input (shallow, real tokens).  ``prompt_dropout``: dropout on the prompt vectors in
    training.  ``init``: ``"uniform"`` (VPT's Xavier range) or ``"zeros"``.  ``backend``: the
    ``prefix_attention`` backend for deep prompts.  Nothing is frozen here.
    """
    if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an int >= 1, got {num_prompts!r}")
    if not isinstance(prompt_dropout, (int, float)) or not 0.0 <= float(prompt_dropout) < 1.0:
        raise ValueError(f"prompt_dropout must be a float in [0, 1), got {prompt_dropout!r}")
    if init not in ("uniform", "zeros"):
        raise ValueError(f"init must be 'uniform' or 'zeros', got {init!r}")
    if model.__dict__.get(_ATTR) is not None:
        raise ValueError("add_visual_prompts: this model already has visual prompts; remove_visual_prompts(model) first")
    attn_name = register(backend)  # validates backend
    parts = _Parts(model)
    hidden = parts.hidden
    init_range = _uniform_range(model, hidden) if init == "uniform" else 0.0
    param = next(model.parameters())
    prompts = VisualPrompts(len(parts.layers), num_prompts, hidden, deep=deep, prompt_dropout=float(prompt_dropout),
                            init_range=init_range).to(device=param.device, dtype=param.dtype)
    rt = _VisualRuntime(model, parts, prompts, backend, _compat.get_attn_implementation(model.config))
    model.__dict__[_ATTR] = rt
    model.visual_prompts = prompts  # a submodule: .parameters(), state_dict, .to(), DDP see it
    if deep:
        for i, a in enumerate(parts.attention):
            setattr(a, LAYER_ATTR, i)
        from types import MethodType

        model.__dict__["forward"] = MethodType(_visual_forward, model)
        _compat.set_attn_implementation(model.config, attn_name)
        try:
            try:
                _check_deep(parts, prompts, rt)
            except TypeError as err:  # a layer without **kwargs (e.g. DINOv2 before transformers 5.24)
                if PREFIX_KWARG not in str(err):
                    raise
                rt.kwarg_mode = False
                _check_deep(parts, prompts, rt)
        except BaseException:
            remove_visual_prompts(model)
            raise
    else:
        rt.hooks.append(parts.embeddings.register_forward_hook(_insert_hook(rt)))
        rt.hooks.append(parts.final_norm.register_forward_pre_hook(_strip_hook(rt)))
    return prompts


def _insert_hook(rt: _VisualRuntime):
    def insert(_module, _inputs, emb: Tensor) -> Tensor:
        r = rt.parts.num_special
        p = rt.prompts
        rows = p.dropout(p.weight[0].unsqueeze(0).expand(emb.shape[0], -1, -1)).to(emb.dtype)
        return torch.cat((emb[:, :r], rows, emb[:, r:]), dim=1)
    return insert


def _strip_hook(rt: _VisualRuntime):
    def strip(_module, args):
        (hidden,) = args[:1]
        r, n = rt.parts.num_special, rt.prompts.num_prompts
        return (torch.cat((hidden[:, :r], hidden[:, r + n:]), dim=1),) + tuple(args[1:])
    return strip


@torch.no_grad()
def _check_deep(parts: _Parts, prompts: VisualPrompts, rt: _VisualRuntime) -> None:
    """Layer 0 with the prompts as a prefix must equal layer 0 with them as tokens (eval mode, 5 tokens)."""
    layer = parts.layers[0]
    modes = [(m, m.training) for m in layer.modules()]
    layer.eval()
    try:
        w = prompts.weight[:1]
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, 5, parts.hidden, generator=g).to(device=w.device, dtype=w.dtype)
        r = parts.num_special
        as_tokens = layer(torch.cat((x[:, :r], w, x[:, r:]), dim=1))
        as_tokens = as_tokens[0] if isinstance(as_tokens, tuple) else as_tokens
        as_tokens = torch.cat((as_tokens[:, :r], as_tokens[:, r + w.shape[1]:]), dim=1)
        kv = parts.prefix_kv(w.unsqueeze(0).expand(1, len(parts.layers), -1, -1).contiguous())
        state = PrefixState(kv, None, rt.backend)
        if rt.kwarg_mode:
            as_prefix = layer(x, **{PREFIX_KWARG: state})
        else:
            parts.attention[0].__dict__[_PENDING] = state
            try:
                as_prefix = layer(x)
            finally:
                parts.attention[0].__dict__[_PENDING] = None
        as_prefix = as_prefix[0] if isinstance(as_prefix, tuple) else as_prefix
    finally:
        for m, mode in modes:
            m.training = mode
    tol = 1e-3 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(as_prefix.float(), as_tokens.float(), atol=tol, rtol=tol):
        raise ValueError(f"add_visual_prompts: model type {parts.model_type!r} is not supported: its layers are not "
                         "pre-LN ViT layers whose prompt keys/values are W_k LN(p), W_v LN(p) (checked numerically)")


def remove_visual_prompts(model: nn.Module) -> Optional[VisualPrompts]:
    """Undo ``add_visual_prompts``; returns the removed prompts (or None)."""
    rt: Optional[_VisualRuntime] = model.__dict__.pop(_ATTR, None)
    if rt is None:
        return None
    for h in rt.hooks:
        h.remove()
    model.__dict__.pop("forward", None)
    for a in rt.parts.attention:
        if LAYER_ATTR in a.__dict__:
            delattr(a, LAYER_ATTR)
    if rt.prompts.deep:
        _compat.set_attn_implementation(model.config, rt.orig_attn)
    if "visual_prompts" in model._modules:
        del model._modules["visual_prompts"]
    return rt.prompts
