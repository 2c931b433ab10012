"""Plain-PyTorch ground truth for every op (also the readable spec)."""
from .attention import prefix_attention_reference, prefix_attention_reference_f64, visibility_mask
from .mlp import prefix_mlp_reference

__all__ = ["prefix_attention_reference", "prefix_attention_reference_f64", "visibility_mask", "prefix_mlp_reference"]
