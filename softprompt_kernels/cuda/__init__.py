"""CUDA backend: kernels in ``csrc/``, built with ninja on first use (or ahead of time by
``SOFTPROMPT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``).

Modules: ``_build`` (locate, build and load the extension), ``prefix_attention`` and
``prefix_mlp`` (backend modules calling ``torch.ops.softprompt_kernels_cuda.*``).
Importing this package never builds anything.
"""
