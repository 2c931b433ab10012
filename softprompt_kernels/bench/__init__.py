"""Benchmarks of the main job ``softprompt-kernels bench``.

``main(argv) -> int`` runs the self-check, then the quick suite (``--full``: every shape):
microbenchmarks of ``prefix_attention`` / ``prefix_mlp`` against the PEFT-style
baselines (``micro``), the end-to-end training step PEFT vs ``apply`` (``e2e``), a
table, ``bench.json`` and ``bench.png`` (``results``).  Shapes live in ``cases``,
timing and memory methods in ``measure``.
"""


def main(argv=None) -> int:
    from .runner import main as _main

    return _main(argv)


__all__ = ["main"]
