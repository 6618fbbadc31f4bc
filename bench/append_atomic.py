"""`EventStore.append_atomic` in its three forms: `.venv/bin/python bench/append_atomic.py [--rounds 3]`.

The admission of every chat call (policy verdict + budget reservation) and every session
creation (session + budget streams) is an `append_atomic`. Measured, in one process
against one embedded Postgres (fsync on, as in production), interleaved round by round:

- `transaction`: `BEGIN`, `nexus_append_batch`, `COMMIT` (three round trips, the global
  append lock held across the `COMMIT` round trip): the form every call took before, and
  the one `append_atomic(..., before=...)` still takes (rate slots);
- `one statement`: `nexus_append_atomic` in its implicit transaction (one round trip,
  the lock released at that commit): what `append_atomic` without `before` did before
  group commit took it over;
- `group commit`: the group-commit writer's `nexus_append_groups`, every atomic append
  of the moment in one statement and one commit, each all or nothing in a
  subtransaction: what `append_atomic` without `before` does now.

Each append writes two new streams of one event. Printed: sequential latency p50/p99
and appends per second with 64 concurrent writers, medians over the rounds, and the
ratios. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.contracts.events import Metadata, SessionStarted, session_stream
from shared.infra import EmbeddedPostgres
from shared.infra.eventstore.store import EventStore, create_pool
from shared.infra.migrate import migrate

SEQUENTIAL = 300
CLIENTS = 64
SECONDS = 3.0


async def _in_transaction(conn) -> None:  # `before=`: forces the transaction form
    return None


async def run(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-atomic-"))
    pg = EmbeddedPostgres(tmp / "pg")
    pg.start()
    try:
        url = pg.url()
        migrate(url)
        pool = await create_pool(url, max_size=CLIENTS + 8)
        store = EventStore(pool)
        meta = Metadata(tenant="bench", actor="bench")

        async def one(form) -> None:
            before, store._groups_fn = form
            a, b = str(uuid.uuid4()), str(uuid.uuid4())
            await store.append_atomic(
                [(session_stream(a), [SessionStarted(session_id=a, tenant="bench")], 0),
                 (session_stream(b), [SessionStarted(session_id=b, tenant="bench")], 0)],
                meta, before=before)

        async def sequential(before) -> tuple[float, float]:
            lat = []
            for _ in range(SEQUENTIAL):
                t = time.perf_counter()
                await one(before)
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]

        async def concurrent(before) -> float:
            stop, done = time.perf_counter() + SECONDS, [0]

            async def writer() -> None:
                while time.perf_counter() < stop:
                    await one(before)
                    done[0] += 1
            await asyncio.gather(*(writer() for _ in range(CLIENTS)))
            return done[0] / SECONDS

        forms = {"transaction": (_in_transaction, False), "one statement": (None, False),
                 "group commit": (None, True)}
        for before in forms.values():  # warm-up: connections, prepared statements
            for _ in range(50):
                await one(before)
        results: dict[str, list[tuple[float, float, float]]] = {f: [] for f in forms}
        load0 = os.getloadavg()[0]
        for r in range(rounds):
            for form, before in forms.items():
                p50, p99 = await sequential(before)
                rate = await concurrent(before)
                results[form].append((p50, p99, rate))
                print(f"round {r + 1} {form:<14} sequential p50 {p50:6.2f} ms p99 {p99:6.2f} ms;"
                      f" {CLIENTS} writers {rate:6.0f}/s", flush=True)
        med = {f: [statistics.median(x[i] for x in v) for i in range(3)] for f, v in results.items()}
        print(f"\nappend_atomic of two streams, medians over {rounds} rounds "
              f"({SEQUENTIAL} sequential, {CLIENTS} writers for {SECONDS:g} s):")
        for form, (p50, p99, rate) in med.items():
            print(f"  {form:<14} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  {rate:6.0f} appends/s")
        t = med["transaction"]
        for form in ("one statement", "group commit"):
            o = med[form]
            print(f"  {form} / transaction: p50 x{o[0] / t[0]:.2f}, p99 x{o[1] / t[1]:.2f}, "
                  f"throughput x{o[2] / t[2]:.2f}")
        print(f"load average (1 min) {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
              f"({os.cpu_count()} CPUs, shared with other work)")
        await pool.close()
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
