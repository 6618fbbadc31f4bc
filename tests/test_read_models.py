"""Read models own their queries; the event store owns the queries on `events`.

Every table has one owning module: a projection's tables belong to the module that
declares the projection (its read model: the fold that writes them and the queries
that read them), `events` and the checkpoints to the event store, the technical
tables to the module that keeps them. Every module of the project is parsed (not
imported): SQL naming a table may only appear in the table's owner, and only the
owners of tables (and the service runtime that opens and closes the pool) reach
into a `.pool`. This is how "nobody else writes SQL" stays true.
"""

from __future__ import annotations

import ast
import re
import uuid
from datetime import timedelta

from shared.contracts.events import Metadata, SessionClosed, SessionStarted, session_stream
from shared.infra.eventstore import EventStore
from services.orchestrator.read_models import PROJECTIONS
from tests.test_layers import REPO, module_name, project_modules

EVENT_STORE = "shared.infra.eventstore"
TABLE_OWNERS: dict[str, str] = {
    "events": EVENT_STORE,
    "projection_checkpoints": EVENT_STORE,
    "idempotency_keys": "services.orchestrator.idempotency",
    "rate_windows": "services.orchestrator.ratelimits",
    "tenant_secrets": "services.orchestrator.secrets",
    "run_leases": "services.orchestrator.run_leases",
    **{table: type(p).__module__ for p in PROJECTIONS for table in p.tables},
}
POOL_HOLDERS = {*TABLE_OWNERS.values(), "shared.infra.service"}  # the runtime opens/closes it

# a table named after FROM / JOIN / INTO / UPDATE / TRUNCATE (not a function: `unnest(`)
_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TRUNCATE)\s+(?!SET\b)([a-z_][a-z0-9_]*)\b(?!\s*\()")
_EXTRACT = re.compile(r"\bextract\s*\([^)]*\)", re.IGNORECASE)  # extract(epoch FROM x): no table


def _owned_by(module: str, owner: str) -> bool:
    return module == owner or module.startswith(owner + ".")


def check(module: str, source: str, filename: str) -> list[str]:
    """SQL on tables this module does not own, and `.pool` reached into by a non-owner."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for table in _TABLE.findall(_EXTRACT.sub("", node.value)):
                owner = TABLE_OWNERS.get(table)
                if owner is None:
                    bad.append(f"{filename}:{node.lineno}: SQL on {table!r}, a table with no owner")
                elif not _owned_by(module, owner):
                    bad.append(f"{filename}:{node.lineno}: SQL on {table!r}, owned by {owner}")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "pool"
              and not any(_owned_by(module, holder) for holder in POOL_HOLDERS)):
            bad.append(f"{filename}:{node.lineno}: reaches into .pool ({node.attr}); "
                       "call the read model or the event store instead")
    return bad


def test_sql_lives_with_the_tables_it_names() -> None:
    found = [v for path in project_modules()
             for v in check(module_name(path), path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_every_projection_table_has_one_owner() -> None:
    tables = [t for p in PROJECTIONS for t in p.tables]
    assert len(tables) == len(set(tables))
    assert all(type(p).__module__.startswith("services.orchestrator.read_models.")
               for p in PROJECTIONS)


def test_the_checker_catches_sql_and_pool_outside_their_owners() -> None:
    """The checker itself: planted SQL and a planted pool query are reported."""
    handler = "services.orchestrator.some_api"
    planted = ('async def h(store):\n'
               '    await store.pool.fetch(f"{COLS} FROM nodes WHERE node_id = $1", 1)\n')
    found = check(handler, planted, "planted.py")
    assert any("SQL on 'nodes', owned by services.orchestrator.read_models" in v for v in found)
    assert any("reaches into .pool (fetch)" in v for v in found)
    assert any("'events', owned by shared.infra.eventstore" in v
               for v in check(handler, 'Q = "SELECT max(position) FROM events"\n', "p.py"))
    assert any("no owner" in v for v in check(handler, 'Q = "DELETE FROM mystery"\n', "p.py"))
    # the owner itself may; functions after FROM and ON CONFLICT ... DO UPDATE SET are no tables
    owner = TABLE_OWNERS["nodes"]
    assert check(owner, planted, "owner.py") == []
    assert check(handler, 'Q = "SELECT * FROM unnest($1::text[])"\n'
                          'R = "ON CONFLICT (k) DO UPDATE SET v = 1"\n'
                          'S = "SELECT extract(epoch FROM until - now())"\n', "p.py") == []


async def test_the_event_store_answers_the_queries_on_events(store: EventStore) -> None:
    sid = str(uuid.uuid4())
    stream = session_stream(sid)
    trace = uuid.uuid4().hex
    assert await store.ping() is True
    assert await store.stream_head(stream) is None
    meta = Metadata(tenant="t-read", correlation_id=sid, trace_id=trace)
    first = await store.append(stream, [SessionStarted(session_id=sid, tenant="t-read")], 0, meta)
    await store.append("other-" + sid, [SessionClosed(session_id=sid, reason="noise")], 0,
                       Metadata(tenant="t-other", correlation_id=sid, trace_id=trace))
    last = await store.append(stream, [SessionClosed(session_id=sid, reason="done")], 1, meta)
    assert await store.stream_head(stream) == last.last_position

    # the events of a correlation: of one tenant, after a position, at most `limit`
    mine = await store.events_of_correlation(sid, tenant="t-read", after=0, limit=10)
    assert [(e.position, e.type) for e in mine] == [(first.last_position, "SessionStarted"),
                                                     (last.last_position, "SessionClosed")]
    assert mine[1].data == {"type": "SessionClosed", "session_id": sid, "reason": "done"}
    assert mine[0].trace_id == trace and mine[0].stream_id == stream
    assert [e.position for e in await store.events_of_correlation(
        sid, tenant="t-read", after=first.last_position, limit=10)] == [last.last_position]
    assert len(await store.events_of_correlation(sid, tenant="t-read", after=0, limit=1)) == 1

    # the events of a trace: one tenant's, or every tenant's
    assert len(await store.events_of_trace(trace, tenant="t-read", limit=10)) == 2
    assert [e.type for e in await store.events_of_trace(trace, tenant=None, limit=10)] == [
        "SessionStarted", "SessionClosed", "SessionClosed"]

    # the position at a moment: the last one recorded at or before it
    [started] = await store.read_stream(stream, to_position=first.last_position)
    assert await store.position_at(started.recorded_at) >= first.last_position
    assert await store.position_at(started.recorded_at) < last.last_position
    assert await store.position_at(started.recorded_at - timedelta(days=3650)) == 0
