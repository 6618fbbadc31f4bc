"""Event store benchmark: `make bench` (or `.venv/bin/python bench/eventstore.py`).

Measures, in one run against one Postgres:

1. appends/s through `EventStore.append` (expected-version checks, many streams),
   batches of 1, 10 and 100 events, 8 concurrent appenders; plus one sequential
   appender with single events;
2. the same rows written by raw asyncpg into `bench_raw_events` (a copy of `events`:
   same columns, constraints and indexes, no `nexus_append`), with `executemany` and
   with `copy_records_to_table`, one transaction per batch, same concurrency; and a
   raw baseline that batches the way `EventStore` does (group commit: the appends that
   overlap in time go out as one `copy_records_to_table` in one transaction), since
   the Nexus column batches concurrent appends and the other raw columns do not;
3. projection lag: a `ProjectionRunner` follows the store in this process while 1 and
   then 20 writers append single events; lag = (projection applied the event) -
   (append was issued), and also up to the commit of the projection's batch.

Without DATABASE_URL an embedded Postgres is started in a temp dir with fsync on (as
in production) and removed at the end. With DATABASE_URL a fresh database
`bench_<random>` is created on that server, and dropped at the end.

Timings are printed, never asserted: a benchmark does not fail on numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from shared.contracts.events import (  # noqa: E402
    Metadata,
    RecordedEvent,
    SessionClosed,
    SessionStarted,
    encode_event,
    encode_metadata,
)
from shared.infra.eventstore.projections import Projection, ProjectionRunner  # noqa: E402
from shared.infra.eventstore.store import EventStore, create_pool  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402

CONCURRENCY = 8
BATCHES = (1, 10, 100)
CASE_S = 2.5            # each throughput case runs this long (after a short warm-up)
WARMUP_S = 0.3
STREAMS_PER_WORKER = 20  # each appender cycles over its own streams
LAG_S = 3.0             # each projection-lag run
GOAL_RATIO_100 = 0.5
GOAL_SINGLE = 3000

RAW_COLUMNS = ("event_id", "stream_id", "stream_version", "type", "data", "metadata", "recorded_at")
RAW_INSERT = (
    "INSERT INTO bench_raw_events (event_id, stream_id, stream_version, type, data, metadata, "
    "recorded_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)"
)


# -- payloads ----------------------------------------------------------------------------


def make_events(stream: str, version: int, n: int) -> list:
    """n events for a stream whose last version is `version` (a session start, then closes)."""
    out = []
    for i in range(n):
        if version + i == 0:
            out.append(SessionStarted(session_id=stream, tenant="bench"))
        else:
            out.append(SessionClosed(session_id=stream))
    return out


def raw_rows(stream: str, version: int, events: list, meta: str) -> list[tuple]:
    """The rows nexus_append would insert, built the way EventStore.append builds them."""
    now = datetime.now(timezone.utc)
    return [
        (uuid.uuid4(), stream, version + i + 1, type(e).__name__, encode_event(e).decode(), meta, now)
        for i, e in enumerate(events)
    ]


# -- throughput --------------------------------------------------------------------------


class Result:
    def __init__(self, events: int, appends: int, seconds: float) -> None:
        self.events, self.appends, self.seconds = events, appends, seconds

    @property
    def ev_s(self) -> float:
        return self.events / self.seconds

    @property
    def ap_s(self) -> float:
        return self.appends / self.seconds


AppendFn = Callable[[str, int, int], Awaitable[None]]


async def drive(label: str, writers: int, batch: int, fn_for_worker: Callable[[int], AppendFn],
                seconds: float = CASE_S) -> Result:
    """`writers` workers call their append function in a loop; count what finished in the window."""
    counted = [0, 0]  # events, appends within the measured window
    measuring = False
    stop = False

    async def worker(w: int) -> None:
        fn = fn_for_worker(w)
        versions = [0] * STREAMS_PER_WORKER
        k = 0
        while not stop:
            s = k % STREAMS_PER_WORKER
            stream = f"bench-{label}-b{batch}-w{w}-s{s}"
            await fn(stream, versions[s], batch)
            versions[s] += batch
            k += 1
            if measuring:
                counted[0] += batch
                counted[1] += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(writers)]
    try:
        await asyncio.sleep(WARMUP_S)
        measuring = True
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - t0
        stop = True
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return Result(counted[0], counted[1], elapsed)


def nexus_fn(store: EventStore) -> Callable[[int], AppendFn]:
    def for_worker(_: int) -> AppendFn:
        async def append(stream: str, version: int, n: int) -> None:
            result = await store.append(stream, make_events(stream, version, n), version)
            assert result.next_expected_version == version + n
        return append
    return for_worker


def executemany_fn(pool: asyncpg.Pool) -> Callable[[int], AppendFn]:
    def for_worker(_: int) -> AppendFn:
        async def append(stream: str, version: int, n: int) -> None:
            meta = encode_metadata(Metadata()).decode()
            rows = raw_rows(stream, version, make_events(stream, version, n), meta)
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(RAW_INSERT, rows)
        return append
    return for_worker


def copy_fn(pool: asyncpg.Pool) -> Callable[[int], AppendFn]:
    def for_worker(_: int) -> AppendFn:
        async def append(stream: str, version: int, n: int) -> None:
            meta = encode_metadata(Metadata()).decode()
            rows = raw_rows(stream, version, make_events(stream, version, n), meta)
            async with pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("bench_raw_events", records=rows, columns=RAW_COLUMNS)
        return append
    return for_worker


class GroupedRaw:
    """Raw rows with group commit, as `EventStore` batches: appends that arrive while a
    write is in flight wait and go out together (one COPY, one transaction, at most
    `max_batch` appends), each caller answered when its group commits."""

    def __init__(self, pool: asyncpg.Pool, max_batch: int = 128) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._queue: list[tuple[list[tuple], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, rows: list[tuple]) -> None:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop())
        await future

    async def _write_loop(self) -> None:
        while self._queue:
            group, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.copy_records_to_table(
                        "bench_raw_events", records=[r for rows, _ in group for r in rows],
                        columns=RAW_COLUMNS)
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the group
                for _, future in group:
                    future.set_exception(exc)
                continue
            for _, future in group:
                future.set_result(None)


def grouped_fn(pool: asyncpg.Pool) -> Callable[[int], AppendFn]:
    grouped = GroupedRaw(pool)

    def for_worker(_: int) -> AppendFn:
        async def append(stream: str, version: int, n: int) -> None:
            meta = encode_metadata(Metadata()).decode()
            await grouped.append(raw_rows(stream, version, make_events(stream, version, n), meta))
        return append
    return for_worker


# -- projection lag ----------------------------------------------------------------------


class LagProjection(Projection):
    """Records, per event, when it was applied and when its batch committed."""

    name = "bench_lag"
    handles = None
    tables = ("bench_proj_seen",)

    def __init__(self) -> None:
        self.issued: dict[uuid.UUID, float] = {}  # event id -> time the append was issued
        self.applied: list[float] = []             # lag to apply, seconds
        self.visible: list[float] = []             # lag to the projection's commit, seconds
        self._pending: list[float] = []

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO bench_proj_seen (position) VALUES ($1)", event.position)
        issued = self.issued.pop(event.event_id, None)
        if issued is not None:
            now = time.perf_counter()
            self.applied.append(now - issued)
            self._pending.append(issued)

    def committed(self) -> None:
        now = time.perf_counter()
        self.visible.extend(now - t for t in self._pending)
        self._pending.clear()

    def reset_samples(self) -> None:
        self.applied.clear()
        self.visible.clear()
        self._pending.clear()


class LagRunner(ProjectionRunner):
    async def step(self, projection: Projection) -> int:
        try:
            return await super().step(projection)
        finally:
            if isinstance(projection, LagProjection):
                projection.committed()  # the batch's transaction has ended (committed or not)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def lag_run(store: EventStore, proj: LagProjection, writers: int, interval_s: float | None,
                  label: str) -> dict:
    """`writers` writers append single events for LAG_S (sleeping interval_s between appends)."""
    proj.reset_samples()
    stop = False
    appended = 0
    append_lat: list[float] = []

    async def writer(w: int) -> None:
        nonlocal appended
        version = 0
        k = 0
        while not stop:
            stream = f"bench-lag-{label}-w{w}-{k // 50}"  # a new stream every 50 events
            if k % 50 == 0:
                version = 0
            eid = uuid.uuid4()
            t = time.perf_counter()
            proj.issued[eid] = t
            await store.append(stream, make_events(stream, version, 1), version, event_ids=[eid])
            append_lat.append(time.perf_counter() - t)
            version += 1
            k += 1
            appended += 1
            if interval_s:
                await asyncio.sleep(interval_s)

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    t0 = time.perf_counter()
    await asyncio.sleep(LAG_S)
    stop = True
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    deadline = time.perf_counter() + 10
    while proj.issued and time.perf_counter() < deadline:  # let the projection drain
        await asyncio.sleep(0.02)
    missing = len(proj.issued)
    proj.issued.clear()
    return {
        "rate": appended / elapsed,
        "events": appended,
        "p50": pct(proj.applied, 50) * 1000,
        "p99": pct(proj.applied, 99) * 1000,
        "vis_p50": pct(proj.visible, 50) * 1000,
        "vis_p99": pct(proj.visible, 99) * 1000,
        "append_p50": pct(append_lat, 50) * 1000,
        "append_p99": pct(append_lat, 99) * 1000,
        "missing": missing,
    }


# -- database setup ----------------------------------------------------------------------


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def _create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(_with_database(server_url, "postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(_with_database(server_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def prepare_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL);"
            "CREATE TABLE bench_proj_seen (position bigint PRIMARY KEY);"
        )


async def server_settings(pool: asyncpg.Pool) -> dict[str, str]:
    names = ("fsync", "synchronous_commit", "wal_sync_method", "server_version")
    rows = await pool.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                            list(names))
    return {r["name"]: r["setting"] for r in rows}


# -- main --------------------------------------------------------------------------------


async def bench(url: str, where: str) -> None:
    started = time.perf_counter()
    pool = await create_pool(url, min_size=CONCURRENCY, max_size=CONCURRENCY + 12)
    runner_pool = await create_pool(url, min_size=2, max_size=3)
    runner_task: asyncio.Task | None = None
    try:
        await prepare_schema(pool)
        store = EventStore(pool)
        settings = await server_settings(pool)

        # 1 + 2: throughput, interleaved per batch size so table growth hits all alike.
        rows: list[tuple[int, Result, Result, Result, Result]] = []
        for batch in BATCHES:
            nexus = await drive("nexus", CONCURRENCY, batch, nexus_fn(store))
            many = await drive("many", CONCURRENCY, batch, executemany_fn(pool))
            copy = await drive("copy", CONCURRENCY, batch, copy_fn(pool))
            grouped = await drive("grouped", CONCURRENCY, batch, grouped_fn(pool))
            rows.append((batch, nexus, many, copy, grouped))
        sequential = await drive("seq", 1, 1, nexus_fn(store))
        raw_seq = await drive("seqraw", 1, 1, executemany_fn(pool))

        # 3: projection lag, runner on its own pool (as if another orchestrator task).
        proj = LagProjection()
        runner = LagRunner(EventStore(runner_pool), [proj], batch_size=500, poll_s=1.0)
        await runner.catch_up()  # skip the throughput events
        runner_task = asyncio.create_task(runner.run(), name="bench-projections")
        lag1 = await lag_run(store, proj, 1, 0.01, "one")
        lag20 = await lag_run(store, proj, 20, 0.05, "twenty")
        lag20u = await lag_run(store, proj, 20, None, "flat")
        total_events = await pool.fetchval("SELECT count(*) FROM events")
        total_raw = await pool.fetchval("SELECT count(*) FROM bench_raw_events")
    finally:
        if runner_task is not None:
            runner_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner_task
        await runner_pool.close()
        await pool.close()

    w = sys.stdout.write
    w("\n")
    w(f"event store benchmark ({where}; fsync {settings.get('fsync')}, synchronous_commit "
      f"{settings.get('synchronous_commit')}, wal_sync_method {settings.get('wal_sync_method')}, "
      f"Postgres {settings.get('server_version')})\n")
    w(f"{CONCURRENCY} concurrent appenders, {STREAMS_PER_WORKER} streams each, every append with "
      f"its expected version; {CASE_S:g} s per case after {WARMUP_S:g} s warm-up; "
      f"client and server on {os.cpu_count()} CPUs\n")
    w("NOTE: the nexus column batches concurrent appends (group commit: appends that overlap "
      "share one statement and one commit); the raw executemany and raw copy columns do not "
      "(one transaction per append); raw grouped batches the same way as nexus (one COPY and "
      "one commit per group), so its ratio compares like with like\n\n")
    w(f"{'batch':>5}  {'nexus ev/s':>11} {'appends/s':>10}  {'raw executemany ev/s':>20} "
      f"{'ratio':>6}  {'raw copy ev/s':>13} {'ratio':>6}  {'raw grouped ev/s':>16} {'ratio':>6}\n")
    for batch, nexus, many, copy, grouped in rows:
        w(f"{batch:>5}  {nexus.ev_s:>11,.0f} {nexus.ap_s:>10,.0f}  {many.ev_s:>20,.0f} "
          f"{nexus.ev_s / many.ev_s:>5.2f}x  {copy.ev_s:>13,.0f} {nexus.ev_s / copy.ev_s:>5.2f}x  "
          f"{grouped.ev_s:>16,.0f} {nexus.ev_s / grouped.ev_s:>5.2f}x\n")
    w("\n")
    w(f"single-event appends/s (sequential, 1 appender): {sequential.ap_s:,.0f}/s "
      f"(raw executemany, sequential: {raw_seq.ap_s:,.0f}/s); "
      f"concurrent ({CONCURRENCY} appenders): {rows[0][1].ap_s:,.0f}/s\n")
    ratio100 = (rows[-1][1].ev_s / rows[-1][2].ev_s, rows[-1][1].ev_s / rows[-1][3].ev_s,
                rows[-1][1].ev_s / rows[-1][4].ev_s)
    w(f"goals (issue): >= {GOAL_RATIO_100}x raw for batches of 100 -> "
      f"{ratio100[0]:.2f}x executemany, {ratio100[1]:.2f}x copy, {ratio100[2]:.2f}x grouped; "
      f">= {GOAL_SINGLE:,} single-event appends/s -> {rows[0][1].ap_s:,.0f}/s concurrent, "
      f"{sequential.ap_s:,.0f}/s sequential\n\n")
    w("projection lag (append issued -> applied / -> projection batch committed), "
      "runner poll 1 s, LISTEN/NOTIFY:\n")
    for name, lag in (("1 writer, ~100/s", lag1), ("20 writers, ~20x20/s", lag20),
                      ("20 writers, unthrottled", lag20u)):
        w(f"  {name:<24} {lag['rate']:>7,.0f} ev/s: applied p50 {lag['p50']:6.1f} ms "
          f"p99 {lag['p99']:6.1f} ms; committed p50 {lag['vis_p50']:6.1f} ms p99 "
          f"{lag['vis_p99']:6.1f} ms; append call p50 {lag['append_p50']:5.1f} ms p99 "
          f"{lag['append_p99']:5.1f} ms"
          + (f"; {lag['missing']} never applied" if lag["missing"] else "") + "\n")
    w(f"\n{total_events:,} events in `events`, {total_raw:,} rows in `bench_raw_events`; "
      f"run took {time.perf_counter() - started:.1f} s\n")


def main() -> None:
    env_url = os.environ.get("DATABASE_URL")
    if env_url:
        name = f"bench_{secrets.token_hex(4)}"
        asyncio.run(_create_database(env_url, name))
        url = _with_database(env_url, name)
        try:
            migrate(url)
            asyncio.run(bench(url, f"DATABASE_URL, database {name}"))
        finally:
            asyncio.run(_drop_database(env_url, name))
        return

    from shared.infra.postgres import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    pg = EmbeddedPostgres(tmp, ephemeral=False)
    try:
        t = time.perf_counter()
        pg.start()
        migrate(pg.url())
        sys.stdout.write(f"embedded Postgres in {tmp} ready in {time.perf_counter() - t:.1f} s\n")
        sys.stdout.flush()
        asyncio.run(bench(pg.url(), "embedded Postgres"))
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
