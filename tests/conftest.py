"""Test configuration.

Triton decides at decoration time whether a kernel is interpreted, so the
interpreter flag must be set before anything imports ``triton``.  Ahead-of-time
compile tests run in a subprocess with the flag removed.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
