"""Benchmarks of the main job ``softprompt-kernels bench``.

``main(argv) -> int`` runs the self-check, then the quick suite (``--full``: every shape):
microbenchmarks of ``prefix_attention`` / ``prefix_mlp`` against the PEFT-style
baselines (``micro``), the end-to-end training step PEFT vs ``apply`` (``e2e``), a
table, ``bench.json`` and ``bench.png`` (``results``).  Shapes live in ``cases``,
timing and memory methods in ``measure``.

``--gpu`` runs ``softprompt_kernels.bench.gpu`` instead: every GPU test, then the GPU
benchmark grid (TFLOP/s against SDPA, FlexAttention and PEFT's path), ``./dev gpu``.
"""


def main(argv=None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "--gpu" in args:
        from .gpu import main as _gpu_main

        return _gpu_main([a for a in args if a != "--gpu"])
    from .runner import main as _main

    return _main(argv)


__all__ = ["main"]
