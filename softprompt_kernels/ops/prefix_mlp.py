"""Fused prefix MLP op: validation, torch.library custom ops (+ fake, + autograd), backend dispatch.

``prefix_mlp(x, w1, b1, w2, b2, *, num_layers, num_kv_heads, head_dim, activation, backend)``
computes ``act(x @ w1.T + b1) @ w2.T + b2`` once (P rows, no batch) and returns it as
``[num_layers, 2, num_kv_heads, P, head_dim]`` (contiguous), PEFT's column order:
column ``c = ((layer*2 + kv)*Hkv + h)*D + d`` of the second Linear -> ``out[layer, kv, h, p, d]``.

Backend interface (``softprompt_kernels/triton/prefix_mlp.py``, ``softprompt_kernels/ops/torch_mlp.py``,
``softprompt_kernels/cuda/prefix_mlp.py``)::

    def mlp_forward(x, w1, b1, w2, b2, *, num_layers, num_kv_heads, head_dim, activation)
            -> tuple[Tensor, Tensor]   # (out, pre)
        x [P, E]; w1 [H1, E]; b1 [H1] or None; w2 [N, H1] with N = num_layers*2*num_kv_heads*head_dim;
        b2 [N] or None.  All one floating dtype, one device; any strides (a backend may copy an
        operand whose last dim is not unit-stride).  activation in ("tanh", "relu", "gelu", "identity");
        gelu is the exact erf form (torch.nn.GELU()).
        out: [num_layers, 2, num_kv_heads, P, head_dim], contiguous, x.dtype, written directly in that
             layout (no permute copy in the GPU backends).
        pre: [P, H1] = x @ w1.T + b1 (x.dtype), the ONLY tensor saved for backward; the backward
             recomputes act(pre).  It must not alias an input (may be the hidden buffer itself
             for "identity").

    def mlp_backward(grad_out, x, w1, b1, w2, pre, *, has_b2, num_layers, num_kv_heads, head_dim,
                     activation) -> tuple[dx, dw1, db1, dw2, db2]
        grad_out: [num_layers, 2, num_kv_heads, P, head_dim], any strides.
        dx [P, E], dw1 [H1, E], dw2 [N, H1] in the dtypes of x, w1, w2; db1 [H1] (None iff b1 is
        None), db2 [N] (None iff not has_b2).  Math: dW2 = dOut_flat^T act(pre), db2 = sum_p dOut_flat,
        dpre = (dOut_flat @ w2) * act'(pre), dW1 = dpre^T x, db1 = sum_p dpre, dx = dpre @ w1, with
        dOut_flat[p, c] = grad_out[layer, kv, h, p, d].  Deterministic (no atomics).

Dispatch: backend "auto" -> "triton" for CUDA tensors; for CPU tensors "triton" when
``TRITON_INTERPRET=1`` else "torch".  "cuda" imports ``softprompt_kernels.cuda.prefix_mlp`` lazily.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backend_choice import resolve_backend

ACTIVATIONS = ("tanh", "relu", "gelu", "identity")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKEND_MODULES = {
    "triton": "softprompt_kernels.triton.prefix_mlp",
    "cuda": "softprompt_kernels.cuda.prefix_mlp",
    "torch": "softprompt_kernels.ops.torch_mlp",
}


def _backend_module(backend: str):
    try:
        return importlib.import_module(_BACKEND_MODULES[backend])
    except ImportError as e:
        raise RuntimeError(f"prefix_mlp backend={backend!r} is not available "
                           f"({_BACKEND_MODULES[backend]} failed to import: {e})") from e


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("softprompt_kernels::prefix_mlp_fwd", mutates_args=())
def _prefix_mlp_fwd(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
    num_layers: int, num_kv_heads: int, head_dim: int, activation: str, backend: str,
) -> tuple[Tensor, Tensor]:
    out, pre = _backend_module(backend).mlp_forward(
        x, w1, b1, w2, b2, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        activation=activation)
    return out, pre


@_prefix_mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, activation, backend):
    P = x.shape[0]
    out = x.new_empty((num_layers, 2, num_kv_heads, P, head_dim))
    return out, x.new_empty((P, w1.shape[0]))


@torch.library.custom_op("softprompt_kernels::prefix_mlp_bwd", mutates_args=())
def _prefix_mlp_bwd(
    grad_out: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, pre: Tensor,
    has_b2: bool, num_layers: int, num_kv_heads: int, head_dim: int, activation: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2); a missing bias gets an empty [0] tensor (custom ops return no None)."""
    dx, dw1, db1, dw2, db2 = _backend_module(backend).mlp_backward(
        grad_out, x, w1, b1, w2, pre, has_b2=has_b2, num_layers=num_layers, num_kv_heads=num_kv_heads,
        head_dim=head_dim, activation=activation)
    db1 = db1 if db1 is not None else w1.new_empty((0,))
    db2 = db2 if db2 is not None else w2.new_empty((0,))
    return dx, dw1, db1, dw2, db2


@_prefix_mlp_bwd.register_fake
def _(grad_out, x, w1, b1, w2, pre, has_b2, num_layers, num_kv_heads, head_dim, activation, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w1, memory_format=torch.contiguous_format),
            w1.new_empty((w1.shape[0] if b1 is not None else 0,)),
            torch.empty_like(w2, memory_format=torch.contiguous_format),
            w2.new_empty((w2.shape[0] if has_b2 else 0,)))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, activation, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, output[1])
    ctx.meta = (b2 is not None, num_layers, num_kv_heads, head_dim, activation, backend)


def _backward(ctx, grad_out, grad_pre):
    # ``pre`` is an internal output (never returned by prefix_mlp), so grad_pre carries nothing.
    x, w1, b1, w2, pre = ctx.saved_tensors
    has_b2, num_layers, num_kv_heads, head_dim, activation, backend = ctx.meta
    dx, dw1, db1, dw2, db2 = _prefix_mlp_bwd(grad_out, x, w1, b1, w2, pre, has_b2, num_layers, num_kv_heads,
                                              head_dim, activation, backend)
    return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if has_b2 else None,
            None, None, None, None, None)


_prefix_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _mlp_flops(P: int, E: int, H1: int, N: int) -> int:
    return 2 * P * E * H1 + 2 * P * H1 * N


@register_flop_formula(torch.ops.softprompt_kernels.prefix_mlp_fwd)
def _fwd_flops(x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    """GEMM FLOPs of the forward (for torch.utils.flop_counter.FlopCounterMode)."""
    (P, E), H1 = x_shape, w1_shape[0]
    return _mlp_flops(P, E, H1, args[1][0])


@register_flop_formula(torch.ops.softprompt_kernels.prefix_mlp_bwd)
def _bwd_flops(grad_shape, x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    """dW2, dH, dW1, dx: twice the forward GEMM FLOPs."""
    (P, E), H1 = x_shape, w1_shape[0]
    return 2 * _mlp_flops(P, E, H1, args[1][0])


# ----------------------------------------------------------------------------- public op

def _check_param(name: str, t, shape: tuple, ref: Tensor, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"prefix_mlp: {name} must be a Tensor {what}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"prefix_mlp: {name} must have shape {what} = {list(shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"prefix_mlp: {name} must have x's dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"prefix_mlp: {name} must be on x's device {ref.device}, got {t.device}")


def prefix_mlp(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], *,
    num_layers: int, num_kv_heads: int, head_dim: int, activation: str = "tanh", backend: str = "auto",
) -> Tensor:
    """Prefix-tuning reparameterization, once per step, in the layout ``prefix_attention`` reads.

    x [P, E] (the prefix embedding weight); w1 [H1, E], b1 [H1] | None (first nn.Linear);
    w2 [num_layers*2*num_kv_heads*head_dim, H1], b2 [same] | None (second nn.Linear).
    Returns ``[num_layers, 2, num_kv_heads, P, head_dim]`` contiguous, equal to
    ``(act(x @ w1.T + b1) @ w2.T + b2).view(P, L, 2, Hkv, D).permute(1, 2, 3, 0, 4)``;
    ``out[l, 0]`` / ``out[l, 1]`` are layer l's prefix keys / values ``[Hkv, P, D]``.
    activation: "tanh" (PEFT / the paper), "relu", "gelu" (exact erf), "identity".
    backend: "auto" | "triton" | "cuda" | "torch" (checked first); float64 runs on "torch" only
    ("auto" picks it for float64).  Differentiable in x, w1, b1, w2, b2.
    """
    is_t = isinstance(x, Tensor)
    backend = resolve_backend(backend, x.device if is_t else None, x.dtype if is_t else None)
    if not is_t:
        raise TypeError(f"prefix_mlp: x must be a Tensor [P, E], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"prefix_mlp: x must have shape [P, E] with P, E >= 1, got {list(x.shape)}")
    if x.dtype == torch.float64 and backend != "torch":
        raise TypeError(f"prefix_mlp: x is float64, which only backend='torch' computes (got backend={backend!r})")
    if x.dtype not in _DTYPES + (torch.float64,):
        raise TypeError(f"prefix_mlp: x must be float16, bfloat16 or float32 (float64 with backend='torch'), "
                        f"got {x.dtype}")
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"prefix_mlp: {name} must be a positive int, got {v!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"prefix_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    P, E = x.shape
    if not isinstance(w1, Tensor) or w1.dim() != 2:
        raise ValueError(f"prefix_mlp: w1 must be a 2-D Tensor [H1, E={E}], got "
                         f"{list(w1.shape) if isinstance(w1, Tensor) else type(w1).__name__}")
    H1 = w1.shape[0]
    N = num_layers * 2 * num_kv_heads * head_dim
    _check_param("w1", w1, (H1, E), x, "[H1, E]")
    if b1 is not None:
        _check_param("b1", b1, (H1,), x, "[H1]")
    if isinstance(w2, Tensor) and w2.dim() == 2 and w2.shape[0] != N:
        raise ValueError(f"prefix_mlp: w2 must have num_layers*2*num_kv_heads*head_dim = {num_layers}*2*"
                         f"{num_kv_heads}*{head_dim} = {N} rows, got w2 of shape {list(w2.shape)}")
    _check_param("w2", w2, (N, H1), x, "[num_layers*2*num_kv_heads*head_dim, H1]")
    if b2 is not None:
        _check_param("b2", b2, (N,), x, "[num_layers*2*num_kv_heads*head_dim]")
    out, _ = _prefix_mlp_fwd(x, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, activation, backend)
    return out
