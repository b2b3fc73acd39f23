import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def pytest_terminal_summary(terminalreporter):
    """Name the cause once at the end when the shared Caffe files are missing (many tests need them)."""
    if not os.path.isdir(SHARED):
        terminalreporter.write_line(f"shared Caffe files NOT FOUND at {SHARED}: the interop and model-file "
                                    f"tests need the project cloned beside ../shared", red=True)


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared not found beside the project root ({SHARED})")
    return SHARED


@pytest.fixture
def two_cores(monkeypatch):
    """layers.parallel configured for two threads, whatever this machine's core count and
    BLAS environment variables."""
    from layers import parallel
    monkeypatch.setattr(parallel, "_CPU_COUNT", 2)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
