"""CUDA backend: kernels in ``csrc/``, built with ninja on first use (or ahead of time by
``SOFTPROMPT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``).

Modules: ``_build`` (locate, build and load the extension), ``prefix_attention`` and
``prefix_mlp`` (backend modules calling ``torch.ops.softprompt_kernels_cuda.*``).
Importing this package never builds anything.  ``last_path()`` (``last_path("bwd")``) tells
which forward (backward) kernels, tensor cores or SIMT and why, the last ``backend="cuda"`` call ran.
"""


def last_path(kind: str = "fwd") -> str:
    """``"tensor_core"`` or ``"simt: <reason>"`` for the last forward (``kind="bwd"``: backward)."""
    from .prefix_attention import last_path as _lp

    return _lp(kind)
