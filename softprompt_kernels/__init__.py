"""softprompt-kernels: fused prefix attention and prefix MLP for soft-prompt tuning.

Public API: ``prefix_attention``, ``prefix_mlp``, ``PrefixEncoder``, ``apply``, ``remove``,
``add_visual_prompts``, ``remove_visual_prompts``;
``softprompt_kernels.reference`` holds the plain-PyTorch ground truth.
"""
from .ops.prefix_attention import prefix_attention
from .ops.prefix_mlp import prefix_mlp
from .prefix_encoder import PrefixEncoder

__version__ = "0.1.0"
__all__ = ["prefix_attention", "prefix_mlp", "PrefixEncoder", "apply", "remove", "add_visual_prompts",
           "remove_visual_prompts"]


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


def add_visual_prompts(model, num_prompts: int, *, deep: bool = True, prompt_dropout: float = 0.0,
                       init: str = "uniform", backend: str = "auto"):
    """VPT prompts for a Hugging Face ViT-style model (deep ones run as prefix attention); returns
    the ``VisualPrompts`` module.  See ``softprompt_kernels.integrations.vision``."""
    from .integrations.vision import add_visual_prompts as _add

    return _add(model, num_prompts, deep=deep, prompt_dropout=prompt_dropout, init=init, backend=backend)


def remove_visual_prompts(model):
    """Undo ``add_visual_prompts``; returns the removed prompts module (or None)."""
    from .integrations.vision import remove_visual_prompts as _remove

    return _remove(model)
