"""Description of one shipped Triton kernel configuration, for ahead-of-time compiles.

Every Triton kernel module exposes ``aot_specs() -> list[KernelSpec]`` listing every
configuration its launcher can choose (block sizes, warps, stages, dtypes, constexpr
flags).  ``softprompt_kernels.triton.aot`` compiles them for sm_80 / sm_90 without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One compile unit.

    name:        human-readable id, e.g. ``"attn_fwd[d=128,fp16,causal]"``.
    fn:          the ``@triton.jit`` function (a ``JITFunction``; compile with
                 ``TRITON_INTERPRET`` unset).
    signature:   ``{arg_name: triton type string}`` for every non-constexpr argument,
                 e.g. ``{"Q": "*fp16", "stride_qb": "i64", "L": "i32", "scale": "fp32"}``.
    constexprs:  ``{arg_name: value}`` for every ``tl.constexpr`` argument.
    num_warps, num_stages: launch options.
    expect_wgmma: the sm_90 PTX must contain ``wgmma`` (main fp16/bf16 GEMM kernels).
    archs:       the archs the spec ships for (its launcher picks it there); the AOT driver
                 compiles it for those only.
    divisible:   integer arguments compiled with Triton's divisible-by-16 hint
                 (``tt.divisibility = 16``), as a launch specialises them when their value is a
                 multiple of 16 (element strides of 16-element-aligned rows).
    """

    name: str
    fn: Any
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 2
    expect_wgmma: bool = False
    archs: tuple = (80, 90)
    divisible: tuple = field(default=(), hash=False)
