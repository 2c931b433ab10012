"""Fixtures of the integration tests.  The model builders live in ``hf_tiny.py``: a
module named ``conftest`` is ambiguous (tests/conftest.py exists too), which broke the
DDP test's spawned workers when they re-imported the test module."""
import pytest

from hf_tiny import AttentionSpy


@pytest.fixture
def spy(monkeypatch):
    return AttentionSpy(monkeypatch)


@pytest.fixture
def workdir():
    """A private temp dir.  Not pytest's tmp_path: a concurrent pytest session on the same machine
    rotates (deletes) older basetemp dirs, which broke long tests mid-run."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="softprompt-it-") as d:
        yield __import__("pathlib").Path(d)


def pytest_report_header(config):
    import peft
    import transformers

    return f"transformers {transformers.__version__} ({transformers.__file__}), peft {peft.__version__}"


def pytest_sessionstart(session):
    """``./dev test`` runs this directory a second time on a side-installed transformers; make sure the
    side install is really the one imported (a silent fallback would test the newest release twice)."""
    import os

    import transformers

    want = os.environ.get("SOFTPROMPT_EXPECT_TRANSFORMERS")
    if want and transformers.__version__ != want:
        raise RuntimeError(f"expected transformers {want}, imported {transformers.__version__} "
                           f"from {transformers.__file__}")
