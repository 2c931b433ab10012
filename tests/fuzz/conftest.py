"""Hypothesis profiles for the fuzz suite (see the package docstring)."""
import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, database=None, max_examples=100, **_common)
settings.register_profile("long", derandomize=False, max_examples=2000, **_common)

_profile = os.environ.get("SOFTPROMPT_FUZZ_PROFILE")
if _profile:
    settings.load_profile(_profile)
elif settings._current_profile == "default":  # not set by --hypothesis-profile
    settings.load_profile("ci")

