"""The set-based appends (migration 20261202150000, issue 16) answer and write exactly
as the per-stream forms they replaced on the hot path: same rows, same refusal, same
events stored, whatever the streams, versions, counts, groups and reused event ids."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

SET_BASED = "SELECT * FROM nexus_append_atomic_at($1, $2, $3, $4, $5, $6, $7)"
# the per-stream form: `nexus_append_atomic`, then each stream's last event read back
PER_STREAM = "SELECT * FROM nexus_append_atomic($1, $2, $3, $4, $5, $6, $7)"
GROUPS_SET_BASED = "SELECT * FROM nexus_append_groups_at($1, $2, $3, $4, $5, $6, $7, $8)"
GROUPS_PER_STREAM = "SELECT * FROM nexus_append_groups($1, $2, $3, $4, $5, $6, $7, $8)"


async def _append(conn: asyncpg.Connection, sql: str, *args: object) -> list[dict]:
    rows = [dict(r) for r in await conn.fetch(sql, *args)]
    for row in rows:
        if "recorded_at" not in row:
            row["recorded_at"] = await conn.fetchval(
                "SELECT recorded_at FROM events WHERE position = $1", row["last_position"])
    return rows

STREAMS = ("s0", "s1", "s2", "s3")  # s0 and s1 hold events before each append
EXISTING = {"s0": 2, "s1": 1}

_stream = st.tuples(
    st.sampled_from(STREAMS),
    st.sampled_from(["right", "next", "wrong", "any"]),  # the expected version (next:
    # as the stream will be after one event more, e.g. one an earlier group appends)
    st.lists(st.sampled_from(["new", "stored", "stored-elsewhere", "repeated"]),
             max_size=3),  # event ids: "repeated" gives the append's previous id again
)


async def _setup(conn: asyncpg.Connection, tag: str) -> tuple[dict[str, list[uuid.UUID]], int]:
    """The streams that exist before the append (and their event ids), and the position
    of the first of their events (positions are compared as offsets from it)."""
    stored: dict[str, list[uuid.UUID]] = {}
    origin = None
    for stream, count in EXISTING.items():
        ids = [uuid.uuid4() for _ in range(count)]
        stored[stream] = ids
        [row] = await conn.fetch(PER_STREAM, [f"{tag}-{stream}"], [0], [count], ids,
                                 ["Seeded"] * count, ['{"n": 1}'] * count,
                                 ['{"tenant": "t"}'] * count)
        origin = row["first_position"] if origin is None else origin
    assert origin is not None
    return stored, origin


def _arguments(tag: str, plan: list, stored: dict[str, list[uuid.UUID]]) -> list:
    stream_ids, expected, counts, ids, types, data = [], [], [], [], [], []
    for n, (stream, version, events) in enumerate(plan):
        at = EXISTING.get(stream, 0)
        stream_ids.append(f"{tag}-{stream}")
        expected.append({"right": at, "next": at + 1, "wrong": at + 3, "any": None}[version])
        counts.append(len(events))
        for k, kind in enumerate(events):
            own, other = stored.get(stream, []), stored["s1" if stream == "s0" else "s0"]
            if kind == "stored" and k < len(own):
                ids.append(own[k])
            elif kind == "stored-elsewhere":
                ids.append(other[k % len(other)])
            elif kind == "repeated" and ids:
                ids.append(ids[-1])
            else:
                ids.append(uuid.uuid4())
            types.append(f"T{n}{k % 2}")
            data.append(json.dumps({"stream": n, "k": k}))
    return [stream_ids, expected, counts, ids, types, data, ['{"tenant": "t"}'] * len(ids)]


async def _outcome(conn: asyncpg.Connection, sql: str, plan: list,
                   groups: list[int] | None = None, *, ranks: bool = False) -> tuple:
    """What the function answered (positions as offsets from the streams' first event,
    or with `ranks` as their rank among the positions: a refused group of the
    subtransaction form leaves a gap) and what it stored, rolled back afterwards."""
    tag = uuid.uuid4().hex[:12]
    transaction = conn.transaction()
    await transaction.start()
    try:
        stored, origin = await _setup(conn, tag)
        before = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
        arguments = _arguments(tag, plan, stored)
        try:
            rows = await _append(conn, sql, *([groups] if groups is not None else []), *arguments)
        except asyncpg.PostgresError as exc:
            # NX409 names the refused stream; another error (an id given twice within a
            # stream: a unique violation, refused by the store before it gets here) names
            # the random id, so only its SQLSTATE is compared
            detail = json.loads(exc.detail or "null") if exc.sqlstate == "NX409" else None
            return ("refused", exc.sqlstate, detail)
        written = await conn.fetch(
            "SELECT position, stream_id, stream_version, type, data::text, recorded_at "
            "FROM events WHERE position > $1 ORDER BY position", before)
        moment = written[0]["recorded_at"] if written else None

        known = sorted({origin, *(w["position"] for w in written)})

        def relative(position: int | None) -> int | None:
            if position is None:
                return None
            if ranks and position > before:
                return len(known) + known.index(position)
            return position - origin

        def relative_time(at: object) -> object:
            return None if at is None else ("now" if at == moment else "earlier")

        answered = [(r["idx"], r["status"], relative(r["first_position"]),
                     relative(r["last_position"]), r["last_version"], r["actual"],
                     relative_time(r["recorded_at"])) for r in rows]
        events = [(relative(w["position"]), w["stream_id"].removeprefix(f"{tag}-"),
                   w["stream_version"], w["type"], w["data"]) for w in written]
        return ("answered", sorted(answered), events)
    finally:
        await transaction.rollback()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(_stream, min_size=1, max_size=4))
@example(plan=[("s2", "right", ["new", "new", "new"]), ("s0", "any", ["new"]),
               ("s3", "any", ["new", "new"]), ("s1", "right", ["new"])])  # a call's settle
@example(plan=[("s0", "right", ["stored", "stored"])])  # a retry: a duplicate
@example(plan=[("s2", "right", ["new"]), ("s2", "any", ["new"])])  # a stream named twice
@example(plan=[("s2", "right", []), ("s0", "wrong", ["new"])])  # nothing to append, refused
def test_the_set_based_append_answers_as_the_per_stream_form(fresh_db: str, plan: list) -> None:
    async def compare() -> None:
        conn = await asyncpg.connect(fresh_db)
        try:
            assert await _outcome(conn, SET_BASED, plan) == await _outcome(conn, PER_STREAM, plan)
        finally:
            await conn.close()

    asyncio.run(compare())


async def test_an_answered_append_notifies_its_last_position_and_types(fresh_db: str) -> None:
    """Followers wake on "<last position> <Type>,...": the types the append wrote."""
    listener, writer = await asyncpg.connect(fresh_db), await asyncpg.connect(fresh_db)
    try:
        heard: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("nexus_events", lambda *args: heard.put_nowait(args[3]))
        tag = uuid.uuid4().hex[:12]
        rows = await writer.fetch(SET_BASED, [f"{tag}-a", f"{tag}-b"], [0, None], [2, 1],
                                  [uuid.uuid4() for _ in range(3)], ["Zeta", "Alpha", "Zeta"],
                                  ['{}'] * 3, ['{}'] * 3)
        payload = await asyncio.wait_for(heard.get(), 10)
        assert payload == f"{max(r['last_position'] for r in rows)} Alpha,Zeta"
    finally:
        await listener.close()
        await writer.close()


_groups = st.lists(st.lists(_stream, min_size=1, max_size=3), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_groups)
@example(batch=[[("s2", "right", ["new", "new"]), ("s0", "right", ["new"])],
                [("s3", "right", ["new"]), ("s1", "wrong", ["new"])],  # refused: writes nothing
                [("s0", "right", ["new"])],  # s0 as the first group left it: refused
                [("s0", "any", ["new"]), ("s0", "any", ["new", "new"])]])  # s0 twice in a group
@example(batch=[[("s2", "right", ["new"]), ("s1", "wrong", ["new"])],  # refused: s2 stays at 0
                [("s2", "right", ["new"])]])
@example(batch=[[("s0", "right", ["stored", "stored"])], [("s2", "right", ["new"])]])  # a retry
@example(batch=[[("s2", "right", [])], [("s1", "wrong", [])]])  # checks: nothing appended
def test_the_set_based_group_append_answers_as_the_subtransaction_form(
        fresh_db: str, batch: list) -> None:
    plan = [request for group in batch for request in group]
    numbers = [n for n, group in enumerate(batch) for _ in group]

    async def compare() -> None:
        conn = await asyncpg.connect(fresh_db)
        try:
            assert await _outcome(conn, GROUPS_SET_BASED, plan, numbers, ranks=True) == \
                await _outcome(conn, GROUPS_PER_STREAM, plan, numbers, ranks=True)
        finally:
            await conn.close()

    asyncio.run(compare())
