"""Triton backend of prefix attention (backend contract: see softprompt_kernels/ops/prefix_attention.py).

attention_forward / attention_backward / dropout_keep_mask launch the kernels in
prefix_attention_fwd.py and prefix_attention_bwd.py; aot_specs() lists every shipped configuration.
"""
from __future__ import annotations

from .kernel_spec import KernelSpec
from .prefix_attention_bwd import attention_backward, bwd_specs
from .prefix_attention_fwd import attention_forward, dropout_keep_mask, fwd_specs


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, BLOCK_D) configuration the launchers can choose."""
    return fwd_specs() + bwd_specs()


__all__ = ["aot_specs", "attention_backward", "attention_forward", "dropout_keep_mask"]
