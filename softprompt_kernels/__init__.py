"""softprompt-kernels: fused prefix attention and prefix MLP for soft-prompt tuning.

Public API: ``prefix_attention``, ``prefix_mlp``, ``PrefixEncoder``, ``apply``, ``remove``;
``softprompt_kernels.reference`` holds the plain-PyTorch ground truth.
"""
from .ops.prefix_attention import prefix_attention
from .ops.prefix_mlp import prefix_mlp
from .prefix_encoder import PrefixEncoder

__version__ = "0.1.0"
__all__ = ["prefix_attention", "prefix_mlp", "PrefixEncoder"]
