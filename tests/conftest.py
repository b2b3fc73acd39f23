import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def pytest_report_header(config):
    """Say up front whether the Caffe-written fixtures and model files are where the tests expect them."""
    if os.path.isdir(SHARED):
        return f"shared Caffe files: {SHARED}"
    return (f"shared Caffe files: NOT FOUND at {SHARED}; the interop and model-file tests will fail "
            f"(clone the project beside ../shared)")


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared not found beside the project root ({SHARED})")
    return SHARED
