"""Fixtures for the merge tests (the model family itself lives in merge_fixtures.py)."""

from __future__ import annotations

import pytest
from merge_fixtures import write_family


@pytest.fixture
def family(tmp_path):
    """(seed_dir, {unit: checkpoint_dir}) for a seed and three unit models."""
    return write_family(str(tmp_path))
