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
