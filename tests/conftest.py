"""Test configuration.

Triton decides at decoration time whether a kernel is interpreted, so the
interpreter flag must be set before anything imports ``triton``.  Ahead-of-time
compile tests run in a subprocess with the flag removed.

The fuzz suite's hypothesis profiles (``ci``, the default, and ``long``) are registered
here, at the top of the tests tree, so ``--hypothesis-profile=long`` works from any
command line (``pytest tests``, ``pytest tests/fuzz``); see ``tests/fuzz/__init__.py``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _register_hypothesis_profiles() -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the fuzz suite is then skipped by its own import
        return
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
    settings.register_profile("ci", derandomize=True, database=None, max_examples=100, **common)
    settings.register_profile("long", derandomize=False, max_examples=2000, **common)
    profile = os.environ.get("SOFTPROMPT_FUZZ_PROFILE")
    if profile:
        settings.load_profile(profile)
    elif settings._current_profile == "default":  # not set by --hypothesis-profile
        settings.load_profile("ci")


_register_hypothesis_profiles()
