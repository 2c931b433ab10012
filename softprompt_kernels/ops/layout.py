"""Memory layouts the prefix-attention op returns, shared by every backend.

* ``out`` is ``[B, Hq, L, D]``: contiguous when ``q`` is contiguous (what SDPA returns for
  such a q, so a caller in that layout gets no copy either), otherwise a view of
  ``[B, L, Hq, D]`` storage: the layout a Hugging Face attention module reshapes into
  ``[B, L, Hq * D]`` (its q is such a view, or a non-dense slice of a fused projection), so
  ``out.transpose(1, 2)`` is contiguous and the integration makes no copy.
* ``dq, dk, dv`` (and the prefix gradients) come back with the strides of ``q, k, v`` (of
  the prefix) when those are dense, possibly permuted (``torch.empty_like``'s rule), so the
  gradient flows back through the caller's ``view(...).transpose(...)`` without a copy.
  One exception: backend "torch" in eager mode on the CPU (``_EagerTorchAttention`` in
  ops/prefix_attention.py) returns dq / dk / dv as ATen's flash backward gives them
  (``[B, L | S, H, D]`` storage, dk / dv possibly views into the ``[prefix, keys]`` gradient),
  as ``F.scaled_dot_product_attention`` does, with no copy; the prefix gradients keep the rule.

A backend that allocates its results with ``empty_output`` / ``gradient_like`` is never
copied; the op layer (``conform``) copies any other layout, so the strides always match the
fake (meta) implementation that ``torch.compile`` traces with.
"""
from __future__ import annotations

import torch
from torch import Tensor


def empty_output(q: Tensor) -> Tensor:
    """Uninitialised ``[B, Hq, L, D]`` in q's dtype and device: contiguous if q is, else a view
    of ``[B, L, Hq, D]`` storage."""
    B, Hq, L, D = q.shape
    if q.is_contiguous():
        return q.new_empty(B, Hq, L, D)
    return q.new_empty(B, L, Hq, D).transpose(1, 2)


def output_strides(q: Tensor) -> tuple:
    """The strides of ``empty_output(q)``, without allocating it."""
    B, Hq, L, D = q.shape
    if q.is_contiguous():
        return (Hq * L * D, L * D, D, 1)
    return (L * Hq * D, D, Hq * D, 1)


def gradient_like(x: Tensor) -> Tensor:
    """Uninitialised tensor shaped like ``x``, with ``x``'s strides when ``x`` is dense."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


def conform(t: Tensor, template: Tensor) -> Tensor:
    """``t`` if it has ``template``'s strides, else ``t`` copied into ``template`` (same shape)."""
    if t.stride() == template.stride():
        return t
    template.copy_(t)
    return template


def as_output_layout(out: Tensor, q: Tensor) -> Tensor:
    """``out`` if it has the strides of ``empty_output(q)``, else copied into that layout."""
    return out if out.stride() == output_strides(q) else conform(out, empty_output(q))
