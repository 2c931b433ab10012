"""PrefixEncoder: PEFT-compatible prefix-tuning parameters whose forward is one fused ``prefix_mlp``.

Parameters and state-dict keys are PEFT's (``peft.tuners.prefix_tuning.model.PrefixEncoder``):
  prefix_projection=True:  ``embedding.weight [P, token_dim]``, ``transform.0.{weight,bias}``
                           (Linear token_dim -> encoder_hidden_size), ``transform.1`` the activation
                           (no parameters), ``transform.2.{weight,bias}`` (Linear -> num_layers*2*token_dim);
  prefix_projection=False: ``embedding.weight [P, num_layers*2*token_dim]``.
so a PEFT checkpoint loads unchanged.  ``token_dim = num_kv_heads * head_dim`` (PEFT's
``num_attention_heads`` is the number of K/V heads the prefix provides).

``forward()`` returns ``[num_layers, 2, num_kv_heads, P, head_dim]`` once per call (no batch):
``out[l, 0]`` / ``out[l, 1]`` are layer l's prefix keys / values for ``prefix_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .ops.backend_choice import BACKENDS
from .ops.prefix_mlp import ACTIVATIONS, prefix_mlp

_ACT_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}


class PrefixEncoder(nn.Module):
    """Prefix-tuning reparameterization with PEFT's parameters.

    Eval mode with a projection caches the output (with autograd off or no parameter
    requiring grad) until a parameter changes.  A change is detected exactly: the key
    (``data_ptr``, ``_version``, dtype, device, shape, strides, inference mode) catches
    replacement, moves and autograd-visible in-place updates, and a snapshot of the
    parameters taken when the cache was filled (compared with ``torch.equal``, one read
    of the parameters: far cheaper than the MLP) catches writes through ``.data``
    (``p.data.mul_``, ``.data.copy_``, ``.data[i] = ...``), which do not bump
    ``_version``.  Each call returns a fresh copy of the cached output (a caller's
    in-place edit cannot corrupt later calls); a cache filled under
    ``torch.inference_mode`` is only reused inside it.  The snapshot costs one copy of
    the parameters while the cache is held; ``train()`` or ``clear_cache()`` drops it.
    ``merge()`` freezes the output into a non-persistent buffer (PEFT's inference mode);
    ``unmerge()`` drops it.

    prefix_projection=False returns a *view* of ``embedding.weight``
    (``[P, L*2*Hkv*D]`` viewed as ``[P, L, 2, Hkv, D]`` and permuted): no copy, strides
    ``(2*Hkv*D, Hkv*D, D, L*2*Hkv*D, 1)``; ``prefix_attention`` accepts any strides.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        num_layers: int,
        num_kv_heads: int,
        *,
        prefix_projection: bool = False,
        encoder_hidden_size: Optional[int] = None,
        activation: str = "tanh",
        init_weights: Optional[str] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("num_virtual_tokens", num_virtual_tokens), ("token_dim", token_dim),
                        ("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PrefixEncoder: {name} must be a positive int, got {v!r}")
        if token_dim % num_kv_heads:
            raise ValueError(f"PrefixEncoder: token_dim ({token_dim}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"PrefixEncoder: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"PrefixEncoder: backend must be one of {BACKENDS}, got {backend!r}")
        if prefix_projection and dtype == torch.float64 and backend not in ("auto", "torch"):
            raise ValueError(f"PrefixEncoder: a float64 projection runs only on backend='torch' (or 'auto'), "
                             f"got backend={backend!r}")
        if init_weights not in (None, "zero"):
            raise ValueError(f"PrefixEncoder: init_weights must be None or 'zero', got {init_weights!r}")
        factory = dict(device=device, dtype=dtype)
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = token_dim // num_kv_heads
        self.prefix_projection = prefix_projection
        self.activation = activation
        self.backend = backend
        out_dim = num_layers * 2 * token_dim
        if prefix_projection:
            if isinstance(encoder_hidden_size, bool) or not isinstance(encoder_hidden_size, int) \
                    or encoder_hidden_size < 1:
                raise ValueError("PrefixEncoder: prefix_projection=True needs a positive int encoder_hidden_size, "
                                 f"got {encoder_hidden_size!r}")
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, encoder_hidden_size, **factory),
                _ACT_MODULES[activation](),
                nn.Linear(encoder_hidden_size, out_dim, **factory),
            )
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim, **factory)
            if init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)
        self.register_buffer("merged_prefix", None, persistent=False)
        self._cache: Optional[Tensor] = None
        self._cache_key = None
        self._cache_snapshot: Optional[list] = None

    @classmethod
    def from_peft_config(cls, config, **kwargs) -> "PrefixEncoder":
        """Build from a ``peft.PrefixTuningConfig`` (same rule as PEFT: with ``inference_mode`` the
        projection is not built and ``embedding`` holds the flattened prefix)."""
        projection = bool(config.prefix_projection) and not bool(getattr(config, "inference_mode", False))
        if config.num_attention_heads is None or config.num_layers is None or config.token_dim is None:
            raise ValueError("PrefixEncoder.from_peft_config: config needs token_dim, num_layers and "
                             "num_attention_heads (PEFT fills them from the base model)")
        return cls(
            config.num_virtual_tokens, config.token_dim, config.num_layers, config.num_attention_heads,
            prefix_projection=projection,
            encoder_hidden_size=config.encoder_hidden_size if projection else None,
            init_weights=getattr(config, "init_weights", None), **kwargs,
        )

    # ------------------------------------------------------------------ compute
    def _compute(self) -> Tensor:
        L, H, P, D = self.num_layers, self.num_kv_heads, self.num_virtual_tokens, self.head_dim
        if not self.prefix_projection:
            return self.embedding.weight.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)
        first, last = self.transform[0], self.transform[2]
        return prefix_mlp(self.embedding.weight, first.weight, first.bias, last.weight, last.bias,
                          num_layers=L, num_kv_heads=H, head_dim=D, activation=self.activation,
                          backend=self.backend)

    def _params_key(self):
        return (torch.is_inference_mode_enabled(), self.backend,
                tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape), p.stride())
                      for p in self.parameters()))

    def _cache_valid(self, key) -> bool:
        if self._cache is None or self._cache_key != key:
            return False
        # Writes through .data do not bump _version: compare the values themselves.
        return all(torch.equal(p.detach(), s) for p, s in zip(self.parameters(), self._cache_snapshot))

    def clear_cache(self) -> None:
        """Drop the eval-mode cache (and its parameter snapshot)."""
        self._cache = self._cache_key = self._cache_snapshot = None

    def train(self, mode: bool = True):
        if mode:
            self.clear_cache()
        return super().train(mode)

    def forward(self) -> Tensor:
        """``[num_layers, 2, num_kv_heads, P, head_dim]`` prefix keys (``[:, 0]``) and values (``[:, 1]``)."""
        if self.merged_prefix is not None:
            return self.merged_prefix
        cacheable = self.prefix_projection and not self.training and (
            not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters()))
        if not cacheable:  # (without a projection the output is a free view: nothing to cache)
            self.clear_cache()
            return self._compute()
        key = self._params_key()
        if not self._cache_valid(key):
            with torch.no_grad():
                self._cache = self._compute()
                self._cache_snapshot = [p.detach().clone() for p in self.parameters()]
            self._cache_key = key
        return self._cache.clone()

    # ------------------------------------------------------------------ inference mode
    @torch.no_grad()
    def merge(self) -> Tensor:
        """Freeze the current output into the ``merged_prefix`` buffer (contiguous); returns it."""
        self.merged_prefix = None
        self.merged_prefix = self._compute().detach().contiguous().clone()
        self.clear_cache()
        return self.merged_prefix

    def unmerge(self) -> None:
        """Drop the frozen output; forward() computes from the parameters again."""
        self.merged_prefix = None

    def peft_flat_prefix(self) -> Tensor:
        """The output in PEFT's flat ``[P, num_layers*2*token_dim]`` form (e.g. for PEFT's
        ``inference_mode`` embedding / ``load_prompt_embeddings``)."""
        out = self.forward()
        return out.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_projection={self.prefix_projection}, activation={self.activation!r}")
