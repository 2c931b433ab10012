"""Plain-PyTorch ground truth for every op (also the readable spec)."""
from .attention import prefix_attention_reference, prefix_attention_reference_f64, visibility_mask

__all__ = ["prefix_attention_reference", "prefix_attention_reference_f64", "visibility_mask"]

try:  # the MLP reference lives next to the attention one
    from .mlp import prefix_mlp_reference  # noqa: F401

    __all__.append("prefix_mlp_reference")
except ImportError:  # pragma: no cover - only while the module is being written
    pass
