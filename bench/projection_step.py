"""The projection work a chat call brings (issue 16): `.venv/bin/python bench/projection_step.py`.

Appends the events of `--calls` chat calls (what the settle appends: LLMCallStarted,
LLMCallCompleted, PolicyEvaluated, BudgetCommitted against a lease, MessageAppended x2;
over `--sessions` sessions, each opened with SessionStarted, BudgetOpened, BudgetLeased)
into an embedded Postgres, then folds them with the orchestrator's projections
(`read_models.PROJECTIONS`) the way a notified runner does: group steps of one call's
events ("sequential") or of `--concurrent` calls' events (coalesced steps under load).
Each form runs twice batched (`apply_batch`) and twice one event at a time (each
projection's `apply`, the loop the runner ran before), alternated, each round on
sessions of its own; also the poll pass's "who has work?" asked with one query for all
projections (`_with_work`) and with the `EXISTS` query per projection it replaced.

Per call it prints the statements the steps issued and their Postgres execution time
(pg_stat_statements) and this process's CPU time in the steps, and the ratio batched /
one by one measured in the same run. CPU time, not wall time: the figures hold on a
shared machine better than latencies, but are still noisy. Never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg

from services.orchestrator.read_models import PROJECTIONS
from shared.contracts.events import (
    BudgetCommitted,
    BudgetLeased,
    BudgetOpened,
    LLMCallCompleted,
    LLMCallStarted,
    MessageAppended,
    Metadata,
    PolicyEvaluated,
    RecordedEvent,
    SessionStarted,
    conversation_stream,
    session_stream,
)
from shared.domain.budget import budget_stream_for_session
from shared.infra.eventstore import EventStore, Projection, ProjectionRunner
from shared.infra.eventstore.store import create_pool
from shared.infra.migrate import migrate
from shared.infra.postgres import EmbeddedPostgres


class _StatsPostgres(EmbeddedPostgres):
    def command(self) -> list[str]:
        return [*super().command(), "-c", "shared_preload_libraries=pg_stat_statements",
                "-c", "pg_stat_statements.track=top"]


class OneByOne(Projection):
    """A projection folded one event at a time (`apply_batch` left to the default loop)."""

    def __init__(self, inner: Projection) -> None:
        self.inner, self.name, self.handles, self.tables = inner, inner.name, inner.handles, inner.tables

    async def apply(self, conn: asyncpg.Connection, event: RecordedEvent) -> None:
        await self.inner.apply(conn, event)


async def _sessions(store: EventStore, n: int, meta: Metadata) -> list[str]:
    sids = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    for sid in sids:
        budget = budget_stream_for_session(sid)
        await store.append_atomic([
            (session_stream(sid), [SessionStarted(session_id=sid, tenant="bench")], 0),
            (budget, [BudgetOpened(budget_id=budget, scope="session", owner=sid,
                                   limit_micro_usd=10**12),
                      BudgetLeased(budget_id=budget, lease_id="l1", micro_usd=10**9,
                                   tokens=10**9, expires_at=time.time() + 3600)], 0)], meta)
    return sids


async def _calls(store: EventStore, sids: list[str], calls: int, meta: Metadata) -> None:
    versions = {sid: (2, 0, 0) for sid in sids}  # budget, conversation, session-call streams
    for i in range(calls):
        sid = sids[i % len(sids)]
        b, c, s = versions[sid]
        call = f"call-{uuid.uuid4().hex[:12]}"
        budget = budget_stream_for_session(sid)
        await store.append_atomic([
            (f"call-{call}", [
                LLMCallStarted(call_id=call, session_id=sid, model="default", targets=("p/m",)),
                PolicyEvaluated(session_id=sid, call_id=call, action="chat", allowed=True,
                                rule="r", reason="ok"),
                LLMCallCompleted(call_id=call, session_id=sid, model="m", provider="p",
                                 target="p/m", node=None, latency_ms=1.5, ttft_ms=None,
                                 input_tokens=5, output_tokens=8, usage_estimated=False,
                                 cost_micro_usd=13, finish_reason="stop", attempts=1)], 0),
            (budget, [BudgetCommitted(budget_id=budget, call_id=call, micro_usd=13, tokens=13,
                                      lease="l1")], b),
            (conversation_stream(sid), [
                MessageAppended(session_id=sid, message_id=uuid.uuid4().hex, role="user",
                                content="hi"),
                MessageAppended(session_id=sid, message_id=uuid.uuid4().hex, role="assistant",
                                content="hello there", call_id=call, model="m", provider="p",
                                input_tokens=5, output_tokens=8, cost_micro_usd=13,
                                finish_reason="stop")], c)], meta)
        versions[sid] = (b + 1, c + 2, s)


async def _stats(pool: asyncpg.Pool) -> tuple[int, float]:
    row = await pool.fetchrow(
        "SELECT coalesce(sum(calls), 0) AS n, coalesce(sum(total_exec_time), 0) AS ms"
        " FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'")
    return int(row["n"]), float(row["ms"])


async def round_(store: EventStore, batched: bool, calls: int, sessions: int,
                 per_step: int) -> tuple[float, float, float]:
    """(statements, Postgres exec ms, this process's CPU ms) per call."""
    projections = list(PROJECTIONS) if batched else [OneByOne(p) for p in PROJECTIONS]
    meta = Metadata(tenant="bench")
    runner = ProjectionRunner(store, projections)
    await runner.catch_up()
    sids = await _sessions(store, sessions, meta)
    await runner.catch_up()
    await _calls(store, sids, calls, meta)
    group = runner._concerned(frozenset({"LLMCallStarted", "LLMCallCompleted", "PolicyEvaluated",
                                         "BudgetCommitted", "MessageAppended"}))
    # a call's events the group reads: 2 messages, 1 budget event, 1 completion
    runner.batch_size = 4 * per_step
    await store.pool.execute("SELECT pg_stat_statements_reset()")
    cpu = 0.0
    while True:
        t = time.process_time()
        read = await runner.step_group(group)
        cpu += time.process_time() - t
        if read < runner.batch_size:
            break
    n, ms = await _stats(store.pool)
    return n / calls, ms / calls, cpu * 1000 / calls


async def _exists_after_checkpoint(store: EventStore, projection: Projection) -> bool:
    if projection.handles is None:
        return await store.head() > await store.pool.fetchval(
            "SELECT coalesce((SELECT position FROM projection_checkpoints WHERE name = $1), 0)",
            projection.name)
    return bool(await store.pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM events WHERE type = ANY($2::text[]) AND position >"
        " coalesce((SELECT position FROM projection_checkpoints WHERE name = $1), 0))",
        projection.name, sorted(projection.handles)))


async def poll_pass(store: EventStore, rounds: int) -> tuple[tuple[float, float, float], ...]:
    runner = ProjectionRunner(store, PROJECTIONS)
    out = []
    for one_query in (True, False):
        await store.pool.execute("SELECT pg_stat_statements_reset()")
        t = time.process_time()
        for _ in range(rounds):
            if one_query:
                await runner._with_work(list(PROJECTIONS))
            else:  # the query `_has_work` asked of each projection before
                [p for p in PROJECTIONS if await _exists_after_checkpoint(store, p)]
        cpu = time.process_time() - t
        n, ms = await _stats(store.pool)
        out.append((n / rounds, ms / rounds, cpu * 1000 / rounds))
    return tuple(out)


async def bench(url: str, args: argparse.Namespace) -> None:
    pool = await create_pool(url, max_size=4)
    try:
        await pool.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        store = EventStore(pool)
        w = sys.stdout.write
        for label, per_step in (("sequential (one call per step)", 1),
                                (f"coalesced ({args.concurrent} calls per step)", args.concurrent)):
            res: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
            for _ in range(2):
                for batched in (False, True):
                    res[batched].append(await round_(store, batched, args.calls, args.sessions,
                                                     per_step))
            w(f"\n{label}: {args.calls} calls per round, rounds alternated, per call\n")
            w(f"  {'':14} {'statements':>22} {'Postgres exec ms':>22} {'CPU ms (this process)':>24}\n")
            for batched in (False, True):
                cols = ["  ".join(f"{r[k]:6.3f}" for r in res[batched]) for k in range(3)]
                w(f"  {'batched' if batched else 'one by one':14} {cols[0]:>22} {cols[1]:>22} {cols[2]:>24}\n")
            ratio = [min(r[k] for r in res[True]) / min(r[k] for r in res[False]) for k in range(3)]
            w(f"  {'ratio (best)':14} {ratio[0]:>22.2f} {ratio[1]:>22.2f} {ratio[2]:>24.2f}\n")
        one, each = await poll_pass(store, 50)
        w("\npoll pass, \"which projections have work?\" over all projections, per pass"
          f" ({await store.head():,} events in the log):\n"
          f"  one query for all   {one[0]:5.1f} statements, {one[1]:6.3f} ms Postgres exec,"
          f" {one[2]:6.3f} ms CPU here\n"
          f"  one query each      {each[0]:5.1f} statements, {each[1]:6.3f} ms Postgres exec,"
          f" {each[2]:6.3f} ms CPU here\n")
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-projection-"))
    pg = _StatsPostgres(tmp, ephemeral=False)
    try:
        pg.start()
        migrate(pg.url())
        asyncio.run(bench(pg.url(), args))
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
