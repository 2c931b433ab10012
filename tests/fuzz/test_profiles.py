"""The fuzz profiles are registered by tests/conftest.py, whatever directory pytest was given."""
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[2]


def test_profiles_registered_and_ci_is_the_default():
    assert settings.get_profile("ci").derandomize and settings.get_profile("ci").database is None
    assert settings.get_profile("long").max_examples == 2000
    expected = os.environ.get("SOFTPROMPT_FUZZ_PROFILE") or "ci"
    if "--hypothesis-profile" not in " ".join(sys.argv):
        assert settings._current_profile == expected


def test_long_profile_selectable_from_the_top_level_tests_dir():
    probe = ROOT / "tests" / f"_probe_profile_{os.getpid()}.py"
    probe.write_text("from hypothesis import settings\n\n"
                     "def test_probe():\n    assert settings._current_profile == 'long'\n")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe),
                            "--hypothesis-profile=long"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
