import os

import pytest

os.environ.setdefault("DISTILL_QUIET", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own soft-label cache, so no test sees another's entries."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared_file(*parts: str) -> str:
    path = os.path.join(SHARED, *parts)
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present (../shared/data is only beside the project checkout)")
    return path


def pytest_sessionfinish(session, exitstatus):
    """Worker processes a failed test left running (a DataLoader's) are ended, each by its pid: Python joins
    its multiprocessing children at exit, and one that did not stop kept a CI run waiting to its time limit."""
    import multiprocessing
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
