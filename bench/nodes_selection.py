"""Node selection benchmark: `.venv/bin/python bench/nodes_selection.py`.

Times `NodeSelector.select()` (`shared.domain.selection`) for 10, 100, 1000 and 10,000 nodes
and each strategy, next to a naive full scan (`min(qualifying, key=rank)` over every
node, the seed's approach) on the same kind of fleet, in one run.

The fleet: every node serves 2 of 4 models and has an 80 GiB GPU; 2% are draining, 1%
offline, 1% online but silent (their metrics are stale). Requests cycle through the 4
models and every 4th also asks for 16 GiB of free GPU memory. One heartbeat (random
load, round robin over the heartbeating nodes) is applied every 10 selections,
outside the timed region, and a virtual clock advances so that each node heartbeats
every 2 s of virtual time. Each case gets its own view with only the measured
selector subscribed. Only `select()` itself is timed (`time.perf_counter_ns`), which
includes its `note_dispatch` and the index upkeep that triggers.

Timings are printed, never asserted: a benchmark does not fail on numbers.
"""

from __future__ import annotations

import gc
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.contracts.messages import (  # noqa: E402
    GpuInfo,
    GpuLoad,
    Heartbeat,
    NodeRegistration,
    RuntimeInfo,
)
from shared.domain.nodes import DRAINING, OFFLINE, ONLINE, NodeLoad, NodeRecord, NodeView  # noqa: E402
from shared.domain.selection import STRATEGIES, NodeSelector, NoEligibleNode, score  # noqa: E402

SIZES = (10, 100, 1000, 10_000)
MODELS = ("llama-3-8b", "qwen-2.5-7b", "mistral-7b", "phi-3-mini")
GIB = 1 << 30
GPU_TOTAL = 80 * GIB
GPU_ASK = 16 * GIB
HEARTBEAT_EVERY = 10      # selections per heartbeat
HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 6.0
ITERATIONS = 20_000
WARMUP = 1_000
NAIVE_ITERATIONS = {10: 20_000, 100: 20_000, 1000: 3_000, 10_000: 300}
GOAL = "selection p99 <= 50 us at 1000 nodes (seed asked < 10 ms)"


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """A view of `n` nodes plus what drives it: heartbeats and the virtual clock."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = VirtualClock()
        self.view = NodeView()
        self.seq = 0
        self.beating: list[str] = []
        for i in range(n):
            node_id = f"node-{i:05d}"
            reg = NodeRegistration(
                node_id=node_id, hostname=f"{node_id}.local", cpu_count=32,
                memory_total_bytes=256 * GIB,
                gpus=(GpuInfo(index=0, name="H100", uuid=f"GPU-{i}", memory_total_bytes=GPU_TOTAL),),
                runtime=RuntimeInfo(kind="vllm", models=(MODELS[i % 4], MODELS[(i + 1) % 4])),
                agent_version="bench", heartbeat_interval_s=HEARTBEAT_INTERVAL_S)
            roll = self.rng.random()
            status = DRAINING if roll < 0.02 else OFFLINE if roll < 0.03 else ONLINE
            self.view.apply_record(NodeRecord(node_id, status, reg, 1))
            silent = 0.03 <= roll < 0.04
            self.heartbeat(node_id, self.clock.now - (30.0 if silent else self.rng.random()))
            if not silent:
                self.beating.append(node_id)
        self.next_beat = 0
        # Each node heartbeats once per HEARTBEAT_INTERVAL_S of virtual time.
        self.dt = HEARTBEAT_INTERVAL_S / (HEARTBEAT_EVERY * max(1, len(self.beating)))

    def heartbeat(self, node_id: str, at: float) -> None:
        self.seq += 1
        r = self.rng
        self.view.apply_heartbeat(Heartbeat(
            node_id=node_id, seq=self.seq, sent_at=1.7e9, cpu_pct=r.uniform(0, 100),
            memory_pct=r.uniform(10, 90), active_requests=r.randrange(0, 16),
            queue_depth=r.randrange(0, 4), avg_response_ms=r.uniform(100, 5000),
            gpus=(GpuLoad(index=0, utilization_pct=r.uniform(0, 100),
                          memory_used_bytes=r.randrange(0, 72 * GIB)),)), now=at)

    def tick(self, i: int) -> None:
        """Between selections (untimed): virtual time passes, maybe a heartbeat."""
        self.clock.now += self.dt
        if i % HEARTBEAT_EVERY == 0 and self.beating:
            node_id = self.beating[self.next_beat % len(self.beating)]
            self.next_beat += 1
            self.heartbeat(node_id, self.clock.now)


def request(i: int) -> tuple[str, int | None]:
    return MODELS[i % 4], (GPU_ASK if i % 4 == 3 else None)


def naive_selector(fleet: Fleet) -> Callable[[str | None, int | None], NodeLoad]:
    """The seed's approach: scan every node, keep the qualifying ones, take the minimum."""
    view, clock = fleet.view, fleet.clock

    def select(model: str | None, gpu: int | None) -> NodeLoad:
        now = clock()
        eligible = [n for n in view.nodes.values()
                    if n.eligible and (model is None or model in n.models)
                    and (gpu is None or n.gpu_memory_free_bytes >= gpu)]
        if not eligible:
            raise NoEligibleNode("none", "nothing qualifies")
        best = min(eligible, key=lambda n: (not n.fresh(now, STALE_AFTER_S), score(n)))
        view.note_dispatch(best.node_id)
        return best

    return select


def measure(fleet: Fleet, select: Callable[[str | None, int | None], NodeLoad],
            iterations: int) -> list[int]:
    """Per-selection nanoseconds; a selection that finds nothing (rare: every node
    serving the model lacks memory or drains) counts like any other."""
    clock = time.perf_counter_ns
    for i in range(WARMUP):
        fleet.tick(i)
        try:
            select(*request(i))
        except NoEligibleNode:
            pass
    samples = []
    gc.collect()
    for i in range(iterations):
        fleet.tick(i)
        model, gpu = request(i)
        t0 = clock()
        try:
            select(model, gpu)
        except NoEligibleNode:
            pass
        samples.append(clock() - t0)
    return samples


def pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


def main() -> None:
    started = time.perf_counter()
    print(f"Node selection benchmark ({platform.python_implementation()} "
          f"{platform.python_version()}, {platform.machine()})")
    print(f"goal: {GOAL}")
    print(f"{ITERATIONS} timed selections per case ({WARMUP} warm-up), one heartbeat per "
          f"{HEARTBEAT_EVERY} selections (untimed); naive scan: "
          + ", ".join(f"{NAIVE_ITERATIONS[n]} at {n}" for n in SIZES))
    print()
    header = f"{'nodes':>6}  {'strategy':<16} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}" \
             f"   {'naive/this p50':>14} {'naive/this p99':>14}"
    print(header)
    print("-" * len(header))
    results: dict[tuple[int, str], tuple[float, float]] = {}
    for n in SIZES:
        fleet = Fleet(n, seed=n)
        naive = measure(fleet, naive_selector(fleet), NAIVE_ITERATIONS[n])
        naive_p50, naive_p99 = pct(naive, 0.50), pct(naive, 0.99)
        rows = []
        for strategy in STRATEGIES:
            fleet = Fleet(n, seed=n)
            sel = NodeSelector(fleet.view, strategy, stale_after_s=STALE_AFTER_S,
                               rng=random.Random(n), clock=fleet.clock)
            samples = measure(fleet, sel.select, ITERATIONS)
            p50, p99 = pct(samples, 0.50), pct(samples, 0.99)
            results[(n, strategy)] = (p50, p99)
            rows.append(f"{n:>6}  {strategy:<16} {p50:>9.2f} {p99:>9.2f} "
                        f"{statistics.fmean(samples) / 1000:>9.2f}   {naive_p50 / p50:>13.1f}x"
                        f" {naive_p99 / p99:>13.1f}x")
        rows.append(f"{n:>6}  {'naive full scan':<16} {naive_p50:>9.2f} {naive_p99:>9.2f} "
                    f"{statistics.fmean(naive) / 1000:>9.2f}   {'1.0x':>14} {'1.0x':>14}")
        print("\n".join(rows))
    print()
    for strategy in STRATEGIES:
        p99 = results[(1000, strategy)][1]
        verdict = "met" if p99 <= 50.0 else "MISSED"
        print(f"goal at 1000 nodes, {strategy:<13}: p99 {p99:6.2f} us -> {verdict}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
