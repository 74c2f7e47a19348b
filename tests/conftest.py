"""Shared pytest fixtures (keep generic: specific fixtures live in their test modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hih_settings import Settings


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The face data folder (HIH_DATA_DIR, default ../shared/data); skips the test where it is absent."""
    path = Settings.from_env().data_dir
    if not path.is_dir():
        pytest.skip(f"needs the face data at {path} (set HIH_DATA_DIR)")
    return path
