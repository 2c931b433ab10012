"""softprompt-kernels: fused prefix attention and prefix MLP for soft-prompt tuning.

Public API: ``prefix_attention``, ``prefix_mlp``, ``PrefixEncoder``, ``apply``, ``remove``;
``softprompt_kernels.reference`` holds the plain-PyTorch ground truth.
"""
from .ops.prefix_attention import prefix_attention
from .ops.prefix_mlp import prefix_mlp
from .prefix_encoder import PrefixEncoder

__version__ = "0.1.0"
__all__ = ["prefix_attention", "prefix_mlp", "PrefixEncoder", "apply", "remove"]


def apply(model, *, backend: str = "auto"):
    """Make a PEFT prefix-tuned ``model`` use the fused ops, in place; returns it.

    See ``softprompt_kernels.integrations.peft.apply`` (imported lazily, so the core
    ops work without transformers / peft installed).
    """
    from .integrations.peft import apply as _apply

    return _apply(model, backend=backend)


def remove(model):
    """Undo ``apply``: the model goes back to stock PEFT behaviour; returns it."""
    from .integrations.peft import remove as _remove

    return _remove(model)
