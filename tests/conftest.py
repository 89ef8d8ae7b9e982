import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing when tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA
