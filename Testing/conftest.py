"""Shared fixtures: paths to the real CTs in ../shared and small helpers every test file uses."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CT = SHARED / "data" / "ct"
COMPAT = SHARED / "reference" / "compat"


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    if not SHARED_CT.is_dir():
        pytest.skip(f"real CT fixtures not found at {SHARED_CT}")
    return SHARED_CT


@pytest.fixture(scope="session")
def compat_dir() -> Path:
    if not COMPAT.is_dir():
        pytest.skip(f"compatibility vectors not found at {COMPAT}")
    return COMPAT
