"""Public ``prefix_attention`` op: argument checks, prefix-form normalisation,
``torch.library`` registration (custom op, fake impl, autograd) and backend dispatch.

Backends (``triton``, ``cuda``, ``torch``) receive normalised arguments: the prefix as
``[T, Hkv, P, D]`` plus an int64 row->task index ``[B]`` (or no prefix at all) and
implement ``attention_forward`` / ``attention_backward`` / ``dropout_keep_mask``; see
``softprompt_kernels/ops/torch_attention.py`` for the plain-PyTorch one.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from .backend_choice import resolve_backend
from .layout import as_output_layout, conform, empty_output, gradient_like

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKEND_MODULES = {
    "torch": "softprompt_kernels.ops.torch_attention",
    "triton": "softprompt_kernels.triton.prefix_attention",
    "cuda": "softprompt_kernels.cuda.prefix_attention",
}


def attention_backend_module(name: str):
    """The module implementing the backend contract for ``name``."""
    return importlib.import_module(_BACKEND_MODULES[name])


# --------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, dropout_p, backend,
                  check_prefix_index=True):
    _check_tensor("q", q, 4, "[B, Hq, L, D]")
    _check_tensor("k", k, 4, "[B, Hkv, S, D]")
    _check_tensor("v", v, 4, "[B, Hkv, S, D]")
    B, Hq, L, D = q.shape
    if D == 0:
        raise ValueError(f"head dim D=0: q must be [B, Hq, L, D] with D >= 1, got shape {tuple(q.shape)}")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if q.dtype not in allowed:
        raise TypeError(f"q must be one of {[str(d) for d in allowed]} for backend {backend!r}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, S, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv}")
    if S < L:
        raise ValueError(f"k/v length S={S} must be >= q length L={L} (queries are the last L positions)")
    if backend in ("triton", "cuda"):
        if not 1 <= D <= 256:
            raise ValueError(f"head dim D={D} is not supported by backend {backend!r} (1 <= D <= 256); use backend='torch'")
        if backend == "triton" and B * Hq > 65535:
            raise ValueError(f"B * Hq = {B * Hq} exceeds the Triton launch grid limit 65535; split the batch")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2, "bool [B, S]")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be torch.bool [B, S] (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must be [B={B}, S={S}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is None:
        if prefix_index is not None:
            raise ValueError("prefix_index was given without prefix_k/prefix_v")
        return
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}")
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError("prefix_index needs a multi-task prefix [T, Hkv, P, D]; got a shared [Hkv, P, D] prefix")
        expect, got = (Hkv, D), (prefix_k.shape[0], prefix_k.shape[2])
        layout = f"[Hkv={Hkv}, P, D={D}]"
    elif prefix_k.dim() == 4:
        if prefix_index is None:
            expect, got = (B, Hkv, D), (prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[3])
            layout = f"per-row [B={B}, Hkv={Hkv}, P, D={D}]"
        else:
            expect, got = (Hkv, D), (prefix_k.shape[1], prefix_k.shape[3])
            layout = f"multi-task [T, Hkv={Hkv}, P, D={D}]"
    else:
        raise ValueError(
            f"prefix_k must be shared [Hkv, P, D], per-row [B, Hkv, P, D] or multi-task [T, Hkv, P, D] "
            f"with prefix_index; got shape {tuple(prefix_k.shape)}"
        )
    if expect != got:
        raise ValueError(f"prefix_k must be {layout}, got shape {tuple(prefix_k.shape)}")
    if prefix_index is not None:
        _check_tensor("prefix_index", prefix_index, 1, "int64 [B]")
        if prefix_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"prefix_index must be int64 [B], got {prefix_index.dtype}")
        if prefix_index.shape[0] != B:
            raise ValueError(f"prefix_index must be [B={B}], got {tuple(prefix_index.shape)}")
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index must be on q's device {q.device}, got {prefix_index.device}")
        T = prefix_k.shape[0]
        if T == 0 and B > 0:
            raise ValueError(f"prefix_k has T=0 tasks but prefix_index has B={B} rows: no task to index")
        if check_prefix_index and not torch.compiler.is_compiling() and B > 0 and prefix_index.device.type != "meta":
            check_prefix_index_range(prefix_index, T)


def check_prefix_index_range(prefix_index: Tensor, T: int) -> None:
    """ValueError naming the first ``prefix_index`` value outside ``[0, T)`` (one host sync on CUDA, cheap: [B])."""
    bad = (prefix_index < 0) | (prefix_index >= T)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"prefix_index values must be in [0, T={T}) (T = prefix_k.shape[0]); "
            f"got prefix_index[{b}] = {int(prefix_index[b])} "
            f"(values in [{int(prefix_index.min())}, {int(prefix_index.max())}])"
        )


def _normalise_prefix(q, prefix_k, prefix_v, prefix_index, check_prefix_index=True):
    """-> (prefix_k [T, Hkv, P, D] | None, prefix_v, prefix_index int64 [B] | None)."""
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return None, None, None
    B = q.shape[0]
    if prefix_k.dim() == 3:  # shared: a view with T = 1, every row uses task 0
        return prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), torch.zeros(B, dtype=torch.int64, device=q.device)
    if prefix_index is None:  # per row
        return prefix_k, prefix_v, torch.arange(B, dtype=torch.int64, device=q.device)
    # The backends read prefix_index as a dense int64 [B] vector: a strided view
    # (``table[:, 0]``) or int32 index is made contiguous int64 here ([B] elements, cheap).
    idx = prefix_index.to(torch.int64).contiguous()
    if (torch.compiler.is_compiling() or not check_prefix_index) and B > 0:
        # The eager range check reads values on the host; under torch.compile (or when the
        # caller checked the index once itself) check on device instead (raises at run time,
        # asynchronously on CUDA) and clamp, so that no backend ever reads outside the
        # prefix tensor even before the assert fires.
        T = prefix_k.shape[0]
        torch._assert_async(((idx >= 0) & (idx < T)).all(),
                            "prefix_index values must be in [0, T) with T = prefix_k.shape[0]")
        idx = idx.clamp(0, T - 1)
    return prefix_k, prefix_v, idx


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("softprompt_kernels::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], prefix_index: Optional[Tensor],
    key_padding_mask: Optional[Tensor], seed: Optional[Tensor],
    causal: bool, scale: float, dropout_p: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    B, Hq, L, D = q.shape
    if B * Hq * L == 0:  # empty batch / no queries: nothing for a backend to do
        return empty_output(q).zero_(), q.new_full((B, Hq, L), float("-inf"), dtype=torch.float32)
    mod = attention_backend_module(backend)
    out, lse = mod.attention_forward(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        causal=causal, scale=scale, dropout_p=dropout_p, seed=_seed_value(seed),
    )
    return as_output_layout(out, q), lse  # the layout of ops/layout.py


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, causal, scale, dropout_p, deterministic, backend):
    B, Hq, L, D = q.shape
    return empty_output(q), q.new_empty(B, Hq, L, dtype=torch.float32)


@torch.library.custom_op("softprompt_kernels::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
    prefix_k: Optional[Tensor], prefix_v: Optional[Tensor], prefix_index: Optional[Tensor],
    key_padding_mask: Optional[Tensor], seed: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, dropout_p: float, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if q.numel() == 0:  # empty batch / no queries: every gradient is zero
        dpk = dpv = q.new_empty(0)
        if prefix_k is not None:
            dpk, dpv = gradient_like(prefix_k).zero_(), gradient_like(prefix_v).zero_()
        return gradient_like(q).zero_(), gradient_like(k).zero_(), gradient_like(v).zero_(), dpk, dpv
    mod = attention_backend_module(backend)
    dq, dk, dv, dpk, dpv = mod.attention_backward(
        dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        causal=causal, scale=scale, dropout_p=dropout_p, seed=_seed_value(seed), deterministic=deterministic,
    )
    # gradients in the layouts of their inputs (see layout.py)
    dq, dk, dv = conform(dq, gradient_like(q)), conform(dk, gradient_like(k)), conform(dv, gradient_like(v))
    if dpk is None:  # custom ops cannot return None: an empty tensor stands for "no prefix"
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = conform(dpk, gradient_like(prefix_k)), conform(dpv, gradient_like(prefix_v))
    return dq, dk, dv, dpk, dpv


@_prefix_attention_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, out, lse,
      causal, scale, dropout_p, deterministic, backend):
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = gradient_like(prefix_k), gradient_like(prefix_v)
    return gradient_like(q), gradient_like(k), gradient_like(v), dpk, dpv


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, causal, scale, dropout_p, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, out, lse)
    ctx.options = (causal, scale, dropout_p, deterministic, backend)
    ctx.has_prefix = prefix_k is not None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, out, lse = ctx.saved_tensors
    causal, scale, dropout_p, deterministic, backend = ctx.options
    dq, dk, dv, dpk, dpv = _prefix_attention_bwd(
        dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, out, lse,
        causal, scale, dropout_p, deterministic, backend,
    )
    if not ctx.has_prefix:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ eager CPU autograd
def _eager_torch_path(backend: str, tensors) -> bool:
    """Backend "torch" on plain CPU tensors outside torch.compile and any dispatch mode: the op runs
    through ``_EagerTorchAttention`` (or, when no gradient can be needed, the backend forward
    alone) instead of the custom op (the custom op stays the path that torch.compile, fake
    tensors and dispatch modes see)."""
    return (backend == "torch" and tensors[0].device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors))


def _eager_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale, dropout_p, seed):
    """The torch backend's forward in the op's output layout: ``(out, lse, parts)`` (see
    ``torch_attention.forward_with_parts``)."""
    from . import torch_attention as ta

    out, lse, parts = ta.forward_with_parts(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                            causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    return as_output_layout(out, q), lse, parts


class _EagerTorchAttention(torch.autograd.Function):
    """Eager autograd of the PyTorch backend, the same numbers as the custom op.

    What it saves over the custom op: the dispatcher round trip, the ``[prefix, keys]``
    K/V concatenation in the backward (float32: the fused path's key parts are saved from
    the forward, in place of k and v, so no more memory than k and v), and the layout copy of
    dq / dk / dv (they come back as ATen's flash backward gives them: ``[B, L | S, H, D]``
    storage, dk / dv possibly views into the joint gradient; autograd takes any strides).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, seed, causal, scale, dropout_p):
        seed = _seed_value(seed)
        out, lse, parts = _eager_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                         dropout_p, seed)
        ctx.options = (causal, scale, dropout_p, seed)
        ctx.k_meta = (k.shape, k.dtype)
        ctx.has_prefix = prefix_k is not None
        if parts is None or q.dtype != torch.float32:
            # blockwise path (its backward reads k and v), or 16-bit inputs: their parts are
            # float32 copies, twice the memory of k and v, so the backward rebuilds them
            ctx.part_meta = None
            ctx.save_for_backward(q, out, lse, prefix_k, prefix_v, prefix_index, key_padding_mask, k, v)
        else:
            ctx.part_meta = [(is_causal, kind) for _, _, is_causal, _, _, kind in parts]
            flat = [t for pk, pv, _, mask, seen, _ in parts for t in (pk, pv, mask, seen)]
            ctx.save_for_backward(q, out, lse, prefix_k, prefix_v, prefix_index, key_padding_mask, *flat)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        from . import torch_attention as ta

        q, out, lse, prefix_k, prefix_v, prefix_index, key_padding_mask, *rest = ctx.saved_tensors
        causal, scale, dropout_p, seed = ctx.options
        k_shape, k_dtype = ctx.k_meta
        if ctx.part_meta is None:
            k, v = rest
            dq, dk, dv, dpk, dpv = ta.attention_backward(
                dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
        else:
            parts = [(rest[4 * i], rest[4 * i + 1], is_causal, rest[4 * i + 2], rest[4 * i + 3], kind)
                     for i, (is_causal, kind) in enumerate(ctx.part_meta)]
            dq, dk, dv, dpk, dpv = ta.backward_from_parts(dout, q, parts, out, lse, prefix_k, prefix_v,
                                                          prefix_index, scale=scale, k_shape=k_shape,
                                                          k_dtype=k_dtype)
        if ctx.has_prefix:
            dpk, dpv = conform(dpk, gradient_like(prefix_k)), conform(dpv, gradient_like(prefix_v))
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None


# ------------------------------------------------------------------ public API
def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor] = None,
    prefix_v: Optional[Tensor] = None,
    *,
    prefix_index: Optional[Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
    return_lse: bool = False,
    backend: str = "auto",
    check_prefix_index: bool = True,
):
    """Attention over a learned prefix followed by the sequence's own keys.

    Args:
        q: ``[B, Hq, L, D]`` queries: the *last* L positions of the sequence.
        k, v: ``[B, Hkv, S, D]`` with ``S >= L`` and ``Hq % Hkv == 0`` (GQA/MQA: query
            head h reads kv head ``h // (Hq // Hkv)``). Any strides.
        prefix_k, prefix_v: shared ``[Hkv, P, D]``, per-row ``[B, Hkv, P, D]``, or
            multi-task ``[T, Hkv, P, D]`` with ``prefix_index``. Same dtype as q. The
            prefix is always visible (never causal- or padding-masked) and carries no
            positions. ``P == 0`` or None: plain attention.
        prefix_index: int64 ``[B]`` in ``[0, T)``: the task whose prefix row b uses.
        causal: bottom-right aligned over the sequence part: key j is visible to query
            i iff ``j <= i + S - L``.
        key_padding_mask: bool ``[B, S]``, True = real token.
        softmax_scale: defaults to ``D ** -0.5``.
        dropout_p: attention dropout on the probabilities (after the softmax); the mask
            is drawn from a seed taken from torch's default CPU generator, so
            ``torch.manual_seed`` reproduces it.
        deterministic: deterministic prefix-gradient reduction (same bits every run);
            False allows a faster atomic reduction on backends that have one.
        return_lse: also return ``lse [B, Hq, L]`` float32, the natural-log
            logsumexp of the scaled scores (``-inf`` where a row sees nothing). It is
            not differentiable.
        backend: ``"auto"`` (Triton for CUDA tensors; on CPU the PyTorch path, or the
            Triton interpreter when ``TRITON_INTERPRET=1``), ``"triton"``, ``"cuda"``,
            ``"torch"``.
        check_prefix_index: check ``prefix_index`` against ``[0, T)`` on the host before
            any kernel runs (one device sync per call on a GPU). ``False`` is for callers
            that checked it once themselves (the HF integration checks once per forward,
            not per layer): the range is then asserted on device and the index clamped,
            so nothing is ever read outside the prefix tensor.

    Returns:
        ``out [B, Hq, L, D]`` in q's dtype (a row that sees no key gives zeros; contiguous
        when q is, else a view of ``[B, L, Hq, D]`` storage, see ``ops/layout.py``), or
        ``(out, lse)``. Gradients flow to q, k, v and the prefix; the prefix gradient
        comes back in the prefix's own shape, summed over the rows (and query heads of
        each kv group) that used it.
    """
    is_t = isinstance(q, Tensor)
    backend = resolve_backend(backend, q.device if is_t else None, q.dtype if is_t else None)
    _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, dropout_p, backend,
                  bool(check_prefix_index))
    scale = _check_scale(softmax_scale, q.shape[-1])
    pk, pv, idx = _normalise_prefix(q, prefix_k, prefix_v, prefix_index, bool(check_prefix_index))
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device="cpu")
    if q.shape[0] * q.shape[1] * q.shape[2] and _eager_torch_path(backend, (q, k, v, pk, pv, key_padding_mask)):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, pk, pv)):
            out, lse = _EagerTorchAttention.apply(q, k, v, pk, pv, idx, key_padding_mask, seed, bool(causal), scale,
                                                  float(dropout_p))
        else:  # no backward can run: no autograd node, nothing saved
            out, lse, _ = _eager_forward(q, k, v, pk, pv, idx, key_padding_mask, bool(causal), scale,
                                         float(dropout_p), _seed_value(seed))
    else:
        out, lse = _prefix_attention_fwd(
            q, k, v, pk, pv, idx, key_padding_mask, seed, bool(causal), scale, float(dropout_p), bool(deterministic),
            backend
        )
    if prefix_k is not None and pk is None and (prefix_k.requires_grad or prefix_v.requires_grad):
        # P = 0: no backend sees the (empty) prefix, but autograd.grad(out, prefix_k) must
        # still work: attach it with an exact zero (the sum of zero elements).
        out = out + (prefix_k.sum() + prefix_v.sum()).to(out.dtype)
    return (out, lse) if return_lse else out


def _check_scale(softmax_scale, D: int) -> float:
    """softmax_scale -> float. A tensor is accepted only without grad: the op has no
    gradient for the scale, and silently detaching one would train the wrong thing."""
    if softmax_scale is None:
        return D ** -0.5
    if isinstance(softmax_scale, Tensor):
        if softmax_scale.numel() != 1:
            raise ValueError(f"softmax_scale must be a float or a one-element tensor, got shape "
                             f"{tuple(softmax_scale.shape)}")
        if softmax_scale.requires_grad:
            raise ValueError("softmax_scale is a tensor that requires grad: prefix_attention has no gradient for "
                             "the scale; pass a float (or softmax_scale.detach() if no gradient is wanted), "
                             "or scale q yourself")
        return float(softmax_scale)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float (or None for D ** -0.5), got "
                        f"{type(softmax_scale).__name__} {softmax_scale!r}")
    return float(softmax_scale)


def dropout_keep_mask(seed: int, B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, *,
                      device="cpu", backend: str = "torch") -> Tensor:
    """The bool keep mask ``[B, Hq, L, P + S]`` that ``backend`` draws for ``seed``."""
    return attention_backend_module(backend).dropout_keep_mask(seed, B, Hq, L, P, S, dropout_p, device)
