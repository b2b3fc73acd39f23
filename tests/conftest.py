import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared not found beside the project root ({SHARED})")
    return SHARED
