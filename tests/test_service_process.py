"""How every service process starts."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shared.infra.service import bound_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only: a no-op elsewhere")
def test_malloc_thresholds_are_fixed_on_glibc() -> None:
    """glibc accepts both thresholds (mallopt answers 1): freed large buffers go back to
    the OS instead of fragmenting the heap of a long-running service (docs/reliability.md)."""
    assert bound_malloc() is True


# A main that leaves a task behind which swallows cancels: `stubborn` of them, or all.
_LEFTOVER_MAIN = """
import asyncio, sys
from shared.infra import service
from shared.infra.logs import setup_logging
setup_logging("leftover-test", "INFO")
service.LEFTOVER_TASKS_STOP_S = 2.0

async def leftover(stubborn):
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1
            if stubborn >= 0 and swallowed > stubborn:
                raise

async def main(stubborn):
    asyncio.get_running_loop().create_task(leftover(stubborn), name="leftover")
    await asyncio.sleep(0)

service.run_service(main(int(sys.argv[1])))
print("returned")
"""


def _run_leftover_main(stubborn: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _LEFTOVER_MAIN, str(stubborn)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)


def test_a_service_exits_when_a_leftover_task_loses_its_first_cancel() -> None:
    """The node's hang: a background task whose cancel was lost (CPython gh-86296) kept
    `asyncio.run` waiting for ever after main returned. It is cancelled again."""
    done = _run_leftover_main(stubborn=1)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned"


def test_a_service_whose_task_never_stops_still_exits_and_says_so() -> None:
    done = _run_leftover_main(stubborn=-1)
    assert done.returncode == 1
    assert "tasks still running after the service stopped" in done.stderr + done.stdout
    assert "leftover" in done.stderr + done.stdout


def test_a_ready_service_freezes_its_start_up_heap_and_collects_young_objects_less_often() -> None:
    import gc

    from shared.infra.service import YOUNG_COLLECTION_EVERY, freeze_startup_heap

    before = gc.get_threshold()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0  # start-up's objects are out of the generations
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *before[1:])
        assert YOUNG_COLLECTION_EVERY > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
