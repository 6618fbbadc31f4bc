"""Sessions, budgets and policies benchmark: `.venv/bin/python bench/sessions.py [--quick]`.

What is measured, in one run on one machine (NATS, Postgres with fsync on, the fake
OpenAI-compatible upstream as its own process, one provider and one orchestrator process,
all started by this script on 127.0.0.1):

(a) session creations/s: `POST /v1/sessions` with a budget (and an inline policy), which
    appends SessionStarted + BudgetOpened atomically and folds them into the read models
    before answering, from CONCURRENCY clients for a bounded time. Baselines in the same
    run, on the same Postgres server (a database of their own, so the orchestrator does not
    fold their rows), with the same concurrency:
    - `EventStore.append_atomic` in this process, the very call the orchestrator makes;
    - raw asyncpg: the same two rows inserted into `bench_raw_events` (a copy of `events`:
      same columns, constraints and indexes) in one transaction, one connection per worker.
(b) reserve+commit cycles/s through `services.orchestrator.budget_manager.BudgetManager` in this
    process (`charge_for`, `reserve`, `commit`), CONCURRENCY workers over many session
    budgets; then the same with a tenant month budget set, so that every cycle also
    reserves and commits on the tenant's single stream. Baseline: raw asyncpg appending
    the same two events (BudgetReserved, BudgetCommitted) in two transactions, one
    connection per worker (writes only: BudgetManager also reads each budget's new events).
(c) many concurrently open sessions streaming: each of N sessions makes one streaming chat
    call through the full path (budget reserve/commit, policy, events) against the fake
    upstream with a per-token delay, so that the calls overlap; calls start at a fixed
    rate and last longer than the ramp, so all N are in flight at the peak (the client
    counts it). Time to first token and total latency P50/P95, against the same calls sent
    straight to the fake, paired: each direct call starts with its Nexus call, so both see
    the same machine load. N = 250, then 1000, with a short reply (8 tokens, slow ones:
    on 2 cores the per-call work, not the open streams, sets how fast calls can start).

Timings are printed, never asserted. Goals (issue "Sessions, budgets, policies"):
>= 1,000 session creations/s; added P95 <= 50 ms at 1000 concurrent sessions (the seed
asked < 500 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from bench.gateway import (  # noqa: E402
    POLICY_RULES,
    CpuMeter,
    UPSTREAM_KEY,
    HttpConn,
    Platform,
    pct,
    raise_fd_limit,
    run_async,
)
from services.orchestrator.budget_manager import BudgetManager  # noqa: E402
from shared.domain.budget import (  # noqa: E402
    SESSION,
    budget_stream_for_session,
    decide_open,
    usd_to_micro,
)
from shared.contracts.events import (  # noqa: E402
    BudgetCommitted,
    BudgetLimits,
    BudgetReserved,
    Metadata,
    SessionStarted,
    encode_event,
    encode_metadata,
    new_id,
    session_stream,
)
from shared.infra.eventstore.store import EventStore, create_pool  # noqa: E402
from shared.infra.migrate import migrate  # noqa: E402
from tests.fake_upstream import FakeUpstreamControl  # noqa: E402

CONCURRENCY = 16
WARMUP_S = 0.5
MAX_OPS = 100_000            # a bound on operations per timed case, besides its time
LIMIT_USD = 1000.0
B_SESSIONS = 256             # session budgets the reserve+commit workers cycle over
STREAM_TOKENS = 8            # reply of each (c) call: short, the delay makes it long
START_RATE = 50.0            # (c): calls started per second (each kind)
GOAL_CREATIONS = 1000
GOAL_ADDED_P95_MS = 50.0
SEED_ADDED_P95_MS = 500.0

RAW_INSERT = (
    "INSERT INTO bench_raw_events (event_id, stream_id, stream_version, type, data, metadata, "
    "recorded_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)"
)


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else float("nan")

    def p(self, q: float) -> float:
        return pct(self.latencies_ms, q)


async def timed(workers: int, seconds: float, make: Callable[[int], Callable[[], Awaitable[None]]]
                ) -> Result:
    """`workers` loops run their operation back to back; those completed in the window count."""
    result = Result()
    state = {"measuring": False, "stop": False, "n": 0}

    async def loop(w: int) -> None:
        op = make(w)
        while not state["stop"] and state["n"] < MAX_OPS:
            t = time.perf_counter()
            try:
                await op()
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                if state["measuring"]:
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.05)
                continue
            if state["measuring"]:
                result.latencies_ms.append((time.perf_counter() - t) * 1000)
            state["n"] += 1

    tasks = [asyncio.create_task(loop(w)) for w in range(workers)]
    await asyncio.sleep(WARMUP_S)
    state["measuring"] = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    result.seconds = time.perf_counter() - t0
    state["stop"] = True
    _, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    return result


def session_events(session_id: str, tenant: str) -> tuple[list, str, list]:
    """What `SessionService.start` appends for a session with a budget and inline rules."""
    started = SessionStarted(session_id=session_id, tenant=tenant,
                             budget=BudgetLimits(limit_usd=LIMIT_USD),
                             policy_rules=dict(POLICY_RULES), metadata={})
    budget = budget_stream_for_session(session_id)
    opened = decide_open(None, budget, SESSION, session_id,
                         limit_micro_usd=usd_to_micro(LIMIT_USD), limit_tokens=None, period=None)
    return [started], budget, opened


def raw_row(stream: str, version: int, event, meta: str) -> tuple:
    return (uuid.uuid4(), stream, version, type(event).__name__, encode_event(event).decode(),
            meta, datetime.now(timezone.utc))


# -- (a) session creations -----------------------------------------------------------------


async def creations_nexus(platform: Platform, key: str, seconds: float,
                          created: list[str]) -> Result:
    head = (f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n").encode()
    body = json.dumps({"budget": {"limit_usd": LIMIT_USD}, "policy_rules": POLICY_RULES}).encode()

    def make(_: int) -> Callable[[], Awaitable[None]]:
        conn = HttpConn("127.0.0.1", platform.port)

        async def op() -> None:
            reply = await conn.request("POST", "/v1/sessions", head, body)
            if reply.status != 201:
                raise RuntimeError(f"{reply.status}: {reply.body[:200]!r}")
            created.append(json.loads(reply.body)["session_id"])
        return op

    return await timed(CONCURRENCY, seconds, make)


async def creations_append_atomic(store: EventStore, seconds: float) -> Result:
    def make(_: int) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            sid = new_id()
            started, budget, opened = session_events(sid, "bench")
            await store.append_atomic(
                [(session_stream(sid), started, 0), (budget, opened, 0)],
                Metadata(tenant="bench", actor="key:bench", correlation_id=sid))
        return op

    return await timed(CONCURRENCY, seconds, make)


async def creations_raw(conns: list[asyncpg.Connection], seconds: float) -> Result:
    def make(w: int) -> Callable[[], Awaitable[None]]:
        conn = conns[w]

        async def op() -> None:
            sid = new_id()
            started, budget, opened = session_events(sid, "bench")
            meta = encode_metadata(Metadata(tenant="bench", actor="key:bench",
                                            correlation_id=sid)).decode()
            async with conn.transaction():
                await conn.execute(RAW_INSERT, *raw_row(session_stream(sid), 1, started[0], meta))
                await conn.execute(RAW_INSERT, *raw_row(budget, 1, opened[0], meta))
        return op

    return await timed(CONCURRENCY, seconds, make)


# -- (b) reserve + commit ------------------------------------------------------------------


async def open_budgets(store: EventStore, tenant: str, count: int) -> list[str]:
    sessions = [new_id() for _ in range(count)]

    async def one(sid: str) -> None:
        started, budget, opened = session_events(sid, tenant)
        await store.append_atomic([(session_stream(sid), started, 0), (budget, opened, 0)],
                                  Metadata(tenant=tenant, actor="bench", correlation_id=sid))

    for i in range(0, count, 32):
        await asyncio.gather(*(one(s) for s in sessions[i:i + 32]))
    return sessions


async def cycles_budget_manager(manager: BudgetManager, tenant: str, sessions: list[str],
                                seconds: float) -> Result:
    def make(w: int) -> Callable[[], Awaitable[None]]:
        mine = sessions[w::CONCURRENCY]
        k = [0]

        async def op() -> None:
            sid = mine[k[0] % len(mine)]
            k[0] += 1
            call_id = new_id()
            meta = Metadata(tenant=tenant, actor="key:bench", correlation_id=sid,
                            causation_id=call_id)
            charge = await manager.charge_for(call_id, tenant, sid)
            await manager.reserve(charge, 200, 100, meta)
            await manager.commit(charge, 120, 60, meta)
        return op

    return await timed(CONCURRENCY, seconds, make)


async def cycles_raw(conns: list[asyncpg.Connection], seconds: float) -> Result:
    def make(w: int) -> Callable[[], Awaitable[None]]:
        conn = conns[w]
        streams = [f"budget-session-raw-{w}-{i}" for i in range(B_SESSIONS // CONCURRENCY)]
        versions = [1] * len(streams)  # BudgetOpened would be version 1
        k = [0]

        async def op() -> None:
            i = k[0] % len(streams)
            k[0] += 1
            stream, call_id = streams[i], new_id()
            meta = encode_metadata(Metadata(tenant="bench", actor="key:bench",
                                            correlation_id=stream, causation_id=call_id)).decode()
            reserved = BudgetReserved(budget_id=stream, call_id=call_id, micro_usd=200, tokens=100,
                                      expires_at=time.time() + 600)
            committed = BudgetCommitted(budget_id=stream, call_id=call_id, micro_usd=120,
                                        tokens=60)
            await conn.execute(RAW_INSERT, *raw_row(stream, versions[i] + 1, reserved, meta))
            await conn.execute(RAW_INSERT, *raw_row(stream, versions[i] + 2, committed, meta))
            versions[i] += 2
        return op

    return await timed(CONCURRENCY, seconds, make)


# -- (c) concurrently open sessions streaming ------------------------------------------------


@dataclass
class Burst:
    first_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_in_flight: int = 0
    seconds: float = 0.0


async def burst(port: int, heads: list[bytes], body: bytes, direct_port: int,
                direct_head: bytes, direct_body: bytes, rate: float) -> tuple[Burst, Burst]:
    """One streaming call per session head, started `rate` per second, each on its own
    connection; with each, the same call straight to the upstream (paired: both kinds see
    the same machine load at the same moment)."""
    nexus, direct = Burst(), Burst()
    in_flight = {id(nexus): 0, id(direct): 0}

    async def one(out: Burst, port: int, head: bytes, body: bytes) -> None:
        conn = HttpConn("127.0.0.1", port)
        in_flight[id(out)] += 1
        out.peak_in_flight = max(out.peak_in_flight, in_flight[id(out)])
        try:
            reply = await conn.request("POST", "/v1/chat/completions", head, body, timeout=120)
        except Exception as exc:  # noqa: BLE001 - counted
            out.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        finally:
            in_flight[id(out)] -= 1
            conn.close()
        if reply.status != 200 or b"[DONE]" not in reply.body or reply.first_token_s is None:
            out.errors.append(f"{reply.status}: {reply.body[:200]!r}")
            return
        out.first_ms.append(reply.first_token_s * 1000)
        out.total_ms.append(reply.total_s * 1000)

    t0 = time.perf_counter()
    tasks = []
    for i, head in enumerate(heads):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(nexus, port, head, body)))
        tasks.append(asyncio.create_task(one(direct, direct_port, direct_head, direct_body)))
    await asyncio.wait(tasks, timeout=180)
    nexus.seconds = direct.seconds = time.perf_counter() - t0
    return nexus, direct


# -- main ------------------------------------------------------------------------------------


async def create_sessions(platform: Platform, key: str, count: int) -> list[str]:
    head = f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n".encode()
    body = json.dumps({"budget": {"limit_usd": LIMIT_USD}, "policy_rules": POLICY_RULES}).encode()
    out: list[str] = []
    todo = iter(range(count))

    async def worker() -> None:
        conn = HttpConn("127.0.0.1", platform.port)
        try:
            for _ in todo:
                reply = await conn.request("POST", "/v1/sessions", head, body)
                if reply.status == 201:
                    out.append(json.loads(reply.body)["session_id"])
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


async def run(platform: Platform, seconds: float, levels: list[int]) -> None:
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    w = sys.stdout.write
    key = platform.tenant_key("bench")

    # a database of its own for the in-process baselines and (b)
    inproc_url = platform.pg.url("bench_inproc")
    await asyncio.to_thread(migrate, inproc_url)
    pool = await create_pool(inproc_url, min_size=CONCURRENCY, max_size=CONCURRENCY + 4)
    raw_conns = [await asyncpg.connect(inproc_url) for _ in range(CONCURRENCY)]
    try:
        await raw_conns[0].execute("CREATE TABLE bench_raw_events (LIKE events INCLUDING ALL)")
        store = EventStore(pool)

        # (a)
        created: list[str] = []
        a_nexus = await creations_nexus(platform, key, seconds, created)
        a_atomic = await creations_append_atomic(store, seconds)
        a_raw = await creations_raw(raw_conns, seconds)

        # (b)
        sessions_b = await open_budgets(store, "bench", B_SESSIONS)
        b_manager = await cycles_budget_manager(BudgetManager(store), "bench", sessions_b, seconds)
        tenant_manager = BudgetManager(store)
        await tenant_manager.set_tenant_budget("bench-t", usd_to_micro(10**6), None,
                                               Metadata(tenant="bench-t", actor="bench"))
        sessions_t = await open_budgets(store, "bench-t", B_SESSIONS)
        b_tenant = await cycles_budget_manager(tenant_manager, "bench-t", sessions_t, seconds)
        b_raw = await cycles_raw(raw_conns, seconds)
    finally:
        for c in raw_conns:
            await c.close()
        await pool.close()

    # (c)
    need = max(levels)
    sessions = created[:need]
    if len(sessions) < need:
        sessions += await create_sessions(platform, key, need - len(sessions))
    assert platform.fake is not None
    control = FakeUpstreamControl(platform.fake.url)
    nexus_head = [f"Authorization: Bearer {key}\r\nX-Nexus-Session: {s}\r\n"
                  "Content-Type: application/json\r\n".encode() for s in sessions]
    direct_head = (f"Authorization: Bearer {UPSTREAM_KEY}\r\n"
                   "Content-Type: application/json\r\n").encode()

    def body(model: str) -> bytes:
        return json.dumps({"model": model, "stream": True, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hello there"}]}).encode()

    meter = CpuMeter(platform.processes())
    c_results = []
    for n in levels:
        ramp = n / START_RATE
        stream_s = ramp + 1.5  # every call outlives the ramp: all n in flight at the peak
        delay_ms = stream_s * 1000 / STREAM_TOKENS
        await asyncio.to_thread(control.configure, token_delay_ms=delay_ms)
        meter.start()
        t_cpu = time.perf_counter()
        nexus, direct = await burst(platform.port, nexus_head[:n], body("default"),
                                    platform.fake.port, direct_head, body("fake-small"),
                                    START_RATE)
        cpu = meter.stop()
        cores = {k: v / (time.perf_counter() - t_cpu) for k, v in cpu.items()}
        await asyncio.sleep(1.0)
        c_results.append((n, delay_ms, nexus, direct, cores))

    # report
    w(f"\nsessions benchmark: one orchestrator and one provider process, NATS, Postgres "
      f"(fsync on), fake upstream (own process); {os.cpu_count()} CPUs shared by all of them "
      f"and this client; {seconds:g} s per timed case after {WARMUP_S:g} s warm-up, "
      f"{CONCURRENCY} concurrent clients/workers\n")
    w("\n(a) session creations (SessionStarted + BudgetOpened, one atomic append; body: budget "
      "+ inline policy)\n")
    w(f"  {'':<52}{'per s':>8}  {'p50 ms':>7} {'p95 ms':>7}  {'vs raw':>7}\n")
    for label, r in (("POST /v1/sessions (HTTP, auth, append, read-your-writes)", a_nexus),
                     ("EventStore.append_atomic, in process", a_atomic),
                     ("raw asyncpg: 2 inserts in 1 transaction", a_raw)):
        w(f"  {label:<52}{r.rate:>8,.0f}  {r.p(.5):>7.2f} {r.p(.95):>7.2f}  "
          f"{r.rate / a_raw.rate:>6.2f}x" + (f"  ({len(r.errors)} errors, first: {r.errors[0]})"
                                            if r.errors else "") + "\n")
    w("\n(b) reserve + commit cycles (BudgetManager.charge_for + reserve + commit, in process; "
      f"{CONCURRENCY} workers over {B_SESSIONS} session budgets)\n")
    w(f"  {'':<52}{'per s':>8}  {'p50 ms':>7} {'p95 ms':>7}  {'vs raw':>7}\n")
    for label, r in (("BudgetManager, session budgets", b_manager),
                     ("BudgetManager, session + one tenant month budget", b_tenant),
                     ("raw asyncpg: 2 inserts in 2 transactions", b_raw)):
        w(f"  {label:<52}{r.rate:>8,.0f}  {r.p(.5):>7.2f} {r.p(.95):>7.2f}  "
          f"{r.rate / b_raw.rate:>6.2f}x" + (f"  ({len(r.errors)} errors, first: {r.errors[0]})"
                                            if r.errors else "") + "\n")
    w(f"\n(c) concurrently open sessions streaming: one streaming call per session, "
      f"{START_RATE:g} calls started per second, {STREAM_TOKENS}-token replies with a "
      f"per-token delay that makes each call outlive the ramp; each Nexus call paired with "
      f"the same call straight to the upstream, started at the same moment\n")
    w(f"  {'sessions':>8} {'peak':>5}  {'':<7}{'first token p50/p95 ms':>24}  "
      f"{'total p50/p95 ms':>22}  {'errors':>6}\n")
    added_p95 = {}
    for n, delay_ms, nexus, direct, cores in c_results:
        for label, r in (("nexus", nexus), ("direct", direct)):
            w(f"  {n:>8} {r.peak_in_flight:>5}  {label:<7}{pct(r.first_ms, .5):>12.1f}"
              f"{pct(r.first_ms, .95):>12.1f}  {pct(r.total_ms, .5):>11.1f}"
              f"{pct(r.total_ms, .95):>11.1f}  {len(r.errors):>6}\n")
        add_first = pct(nexus.first_ms, .95) - pct(direct.first_ms, .95)
        add_total = pct(nexus.total_ms, .95) - pct(direct.total_ms, .95)
        added_p95[n] = (add_first, add_total)
        add_first50 = pct(nexus.first_ms, .5) - pct(direct.first_ms, .5)
        w(f"  {'':>8} {'':>5}  {'added':<7}{add_first50:>+12.1f}"
          f"{add_first:>+12.1f}  {pct(nexus.total_ms, .5) - pct(direct.total_ms, .5):>+11.1f}"
          f"{add_total:>+11.1f}   (token delay {delay_ms:.0f} ms)\n")
        w(f"  {'':>8} {'':>5}  CPU over the run, cores: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
          + f"; all {sum(cores.values()):.2f} of {os.cpu_count()}\n")
        for label, r in (("nexus", nexus), ("direct", direct)):
            if r.errors:
                w(f"  {'':>8} {label} errors: first: {r.errors[0]}\n")
    w("\ngoals (issue):\n")
    w(f"  >= {GOAL_CREATIONS:,} session creations/s -> {a_nexus.rate:,.0f}/s through the API "
      f"({'met' if a_nexus.rate >= GOAL_CREATIONS else 'NOT met'}); "
      f"append_atomic alone {a_atomic.rate:,.0f}/s, raw asyncpg {a_raw.rate:,.0f}/s\n")
    top = max(levels)
    add_first, add_total = added_p95[top]
    worst = max(add_first, add_total)
    w(f"  added P95 <= {GOAL_ADDED_P95_MS:g} ms at {top} concurrent sessions (seed: < "
      f"{SEED_ADDED_P95_MS:g} ms) -> first token {add_first:+.1f} ms, total {add_total:+.1f} ms "
      f"({'met' if worst <= GOAL_ADDED_P95_MS else 'NOT met'}; seed "
      f"{'met' if worst < SEED_ADDED_P95_MS else 'NOT met'})\n")
    w(f"run took {time.perf_counter() - started:.1f} s; load average (1 min) at the start "
      f"{load0:.2f}, at the end {os.getloadavg()[0]:.2f} (other work shares this machine)\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4, help="per timed case in (a), (b)")
    parser.add_argument("--quick", action="store_true", help="(c) at 250 sessions only")
    args = parser.parse_args()
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-sessions-"))
    platform = Platform(tmp, reply_tokens=STREAM_TOKENS, max_concurrency=1100, max_queue=4096)
    try:
        t = time.perf_counter()
        platform.start()
        sys.stdout.write(f"platform up in {time.perf_counter() - t:.1f} s ({tmp})\n")
        sys.stdout.flush()
        run_async(run(platform, args.seconds, [250] if args.quick else [250, 1000]))
    finally:
        platform.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
