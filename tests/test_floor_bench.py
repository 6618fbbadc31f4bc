"""The call path's floor (bench/floor.py) in a bounded form: its own NATS, Postgres, fake
upstream, edge and relay processes, every case run briefly.

Asserted: every request of every case went through (the edge answers only with the
upstream's reply after its INSERT committed; a request that failed is counted as an
error and prints an `errors (...)` line) and every row has figures. Timings are printed, not
asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_floor_bench_runs_every_case_without_errors() -> None:
    run = subprocess.run([sys.executable, "bench/floor.py", "--seconds", "0.5", "--sequential", "25"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("floor")]
    assert len(rows) == 6, run.stdout  # sequential, 16 and 64 clients; with and without the write
    assert not any("nan" in row for row in rows), run.stdout
    assert "(0 errors)" in run.stdout and "errors (" not in run.stdout
