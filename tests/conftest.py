"""Session fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from validators import Validators


@pytest.fixture(scope="session")
def validators() -> Iterator[Validators]:
    """Containers of each plan's Debian release with the plans' packages installed, where
    rendered files' own checks run for real (see tests/validators.py). They start on first
    use; a missing podman or image fails the tests that need it (ValidatorError)."""
    v = Validators()
    try:
        yield v
    finally:
        v.close()
