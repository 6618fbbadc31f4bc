"""The soak harness (bench/soak.py, `make soak`) in a bounded form: 50 sessions for 20 s.

It starts its own NATS, Postgres, fake upstream and the three services as real processes
and drives streaming chat calls through them. Asserted: the harness saw every process
(memory samples for each, after its warm-up too), the calls went through, none failed,
and it reports a slope per process and a p95 per period. Speed and the verdicts are
printed, not asserted: 20 s on a shared machine says nothing about a leak (`make soak`
runs the real 10 minutes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROCESSES = {"orchestrator", "provider", "node", "nats", "postgres", "postgres private",
             "upstream"}

pytestmark = pytest.mark.slow


def test_soak_harness_samples_every_process_without_errors(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "bench/soak.py", "--sessions", "50", "--minutes", str(20 / 60),
         "--call-s", "2", "--sample-s", "1", "--warmup-s", "5", "--bucket-s", "5",
         "--report", str(report)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(report.read_text())

    assert set(figures["memory"]) == PROCESSES
    for name, m in figures["memory"].items():
        assert m["samples"] >= 10, (name, m)           # sampled about every second for 20 s
        assert m["samples_after_warmup"] >= 2, (name, m)
        assert m["last_mib"] > 1, (name, m)            # a real process's memory, not a zero
        assert m["slope_mib_per_min"] == m["slope_mib_per_min"], (name, m)  # not NaN
    assert figures["errors"] == [] and figures["direct_errors"] == []
    assert figures["sessions_served"] == 50             # every session's calls went through
    assert figures["calls"] > 50, figures["calls"]
    assert figures["direct_calls"] > 0
    buckets = figures["per_bucket"]
    assert len(buckets) == 4 and all(b["calls"] for b in buckets[1:]), buckets
    assert "memory (MiB" in run.stdout and "verdict:" in run.stdout
