"""How every service process starts."""

from __future__ import annotations

import platform

import pytest

from shared.infra.service import bound_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only: a no-op elsewhere")
def test_malloc_thresholds_are_fixed_on_glibc() -> None:
    """glibc accepts both thresholds (mallopt answers 1): freed large buffers go back to
    the OS instead of fragmenting the heap of a long-running service (docs/reliability.md)."""
    assert bound_malloc() is True
