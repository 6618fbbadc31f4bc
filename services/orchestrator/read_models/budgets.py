"""The `budgets` read model: each budget stream folded with `fold_budget` (the manager's fold)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import msgspec

from shared.contracts.events import RecordedEvent
from shared.domain.budget import BUDGET_EVENT_TYPE_NAMES, BudgetState, fold_budget
from shared.infra.eventstore import EventStore, Projection

# A row's `state` (`_row` writes it) straight into the typed state, five times faster
# than a decode into dicts rebuilt by hand; a row written before a field existed (the
# leases, say) decodes with that field's default.
_state = msgspec.json.Decoder(BudgetState)


def _budget_from_json(raw: str) -> BudgetState:
    return _state.decode(raw)


class BudgetsProjection(Projection):
    """`budgets` table: each budget stream folded with `fold_budget` (the manager's fold)."""

    name = "budgets"
    handles = BUDGET_EVENT_TYPE_NAMES
    tables = ("budgets",)

    async def apply(self, conn: asyncpg.Connection, rec: RecordedEvent) -> None:
        raw = await conn.fetchval("SELECT state::text FROM budgets WHERE budget_id = $1", rec.stream_id)
        state = _budget_from_json(raw) if raw else None
        new = fold_budget(state, rec.event, rec.stream_version)
        if new is None or new is state:
            return
        await conn.execute(
            f"INSERT INTO budgets ({_COLUMNS})"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13::jsonb,$14,$15)" + _UPSERT,
            *_row(rec.stream_id, (new.scope, new.owner, rec.metadata.tenant, new.period), new, rec))

    def __init__(self) -> None:
        # per budget, the state this process last wrote (its JSON, and folded): a step
        # whose events all fold one budget updates the row only while it still holds
        # exactly that state (`state = $json`), with no read first; else it reads
        self._written: dict[str, tuple[str, BudgetState]] = {}

    async def apply_batch(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> None:
        """The step's budget events in one or two statements, the folds in memory.

        Events of one budget whose state this process wrote last (a call commits on its
        session's budget): one conditional update of the row. Otherwise, or when
        the row holds another state (another runner, a rolled-back step, a rebuild):
        one read of every budget the events touch and one upsert of each changed
        budget's last state (a row new in the step takes its insert-only columns from its
        first change, as `apply` one by one would)."""
        if all(rec.stream_id == events[0].stream_id for rec in events) and (
                await self._update_written(conn, events)):
            return
        ids = list(dict.fromkeys(rec.stream_id for rec in events))
        states: dict[str, BudgetState | None] = {r["budget_id"]: _budget_from_json(r["state"])
            for r in await conn.fetch("SELECT budget_id, state::text AS state FROM budgets"
                                      " WHERE budget_id = ANY($1::text[])", ids)}
        first: dict[str, tuple] = {}
        last: dict[str, tuple[BudgetState, RecordedEvent]] = {}
        for rec in events:
            state = states.get(rec.stream_id)
            new = fold_budget(state, rec.event, rec.stream_version)
            if new is None or new is state:
                continue
            states[rec.stream_id] = new
            first.setdefault(rec.stream_id, (new.scope, new.owner, rec.metadata.tenant, new.period))
            last[rec.stream_id] = (new, rec)
        if not last:
            return
        rows = [_row(budget_id, first[budget_id], new, rec) for budget_id, (new, rec) in last.items()]
        await conn.execute(
            f"INSERT INTO budgets ({_COLUMNS}) SELECT b, sc, o, t, pe, lu, lt, ru, rt, cu, ct, n,"
            " st::jsonb, v, at FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
            " $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],"
            " $11::bigint[], $12::int[], $13::text[], $14::bigint[], $15::timestamptz[])"
            " AS u(b, sc, o, t, pe, lu, lt, ru, rt, cu, ct, n, st, v, at)" + _UPSERT,
            *(list(column) for column in zip(*rows, strict=True)))
        for row in rows:
            self._remember(row[0], row[12], last[row[0]][0])

    async def _update_written(self, conn: asyncpg.Connection, events: Sequence[RecordedEvent]) -> bool:
        """Fold one budget's `events` from the state this process wrote last and update
        the row if it still holds that state; False (nothing done) otherwise."""
        budget_id = events[0].stream_id
        known = self._written.get(budget_id)
        if known is None:
            return False
        raw, new = known
        for rec in events:
            folded = fold_budget(new, rec.event, rec.stream_version)
            if folded is None or folded is new:  # a no-op on this copy: the row decides
                return False
            new = folded
        row = _row(budget_id, (), new, events[-1])
        done = await conn.fetchval(
            "UPDATE budgets SET limit_micro_usd = $2, limit_tokens = $3, reserved_micro_usd = $4,"
            " reserved_tokens = $5, committed_micro_usd = $6, committed_tokens = $7,"
            " open_reservations = $8, state = $9::jsonb, version = $10, updated_at = $11"
            " WHERE budget_id = $1 AND state = $12::jsonb RETURNING true", *row, raw)
        if not done:
            del self._written[budget_id]
            return False
        self._remember(budget_id, row[8], new)
        return True

    def _remember(self, budget_id: str, raw: str, state: BudgetState) -> None:
        self._written.pop(budget_id, None)
        if len(self._written) >= _WRITTEN_KEPT:  # the least recently written goes
            del self._written[next(iter(self._written))]
        self._written[budget_id] = (raw, state)


_WRITTEN_KEPT = 1024


_COLUMNS = ("budget_id, scope, owner, tenant, period, limit_micro_usd, limit_tokens,"
            " reserved_micro_usd, reserved_tokens, committed_micro_usd, committed_tokens,"
            " open_reservations, state, version, updated_at")
_UPSERT = (" ON CONFLICT (budget_id) DO UPDATE SET limit_micro_usd = EXCLUDED.limit_micro_usd,"
           " limit_tokens = EXCLUDED.limit_tokens, reserved_micro_usd = EXCLUDED.reserved_micro_usd,"
           " reserved_tokens = EXCLUDED.reserved_tokens,"
           " committed_micro_usd = EXCLUDED.committed_micro_usd,"
           " committed_tokens = EXCLUDED.committed_tokens,"
           " open_reservations = EXCLUDED.open_reservations, state = EXCLUDED.state,"
           " version = EXCLUDED.version, updated_at = EXCLUDED.updated_at")


def _row(budget_id: str, created: tuple, new: BudgetState, rec: RecordedEvent) -> tuple:
    """A budget row: `created` (scope, owner, tenant, period) counts only when inserted."""
    return (budget_id, *created, new.limit_micro_usd, new.limit_tokens, new.reserved_micro_usd,
            new.reserved_tokens, new.committed_micro_usd, new.committed_tokens,
            len(new.reservations) + len(new.leases), msgspec.json.encode(new).decode(),
            new.version, rec.recorded_at)


class BudgetsReadModel:
    def __init__(self, store: EventStore) -> None:
        self.pool = store.pool

    # `open_reservations` counts the open reservations and the open leases (issue 16);
    # each query below looks at both (`_HELD`: every open reservation or lease of a row,
    # `state -> 'leases'` is absent from rows written before leases: no rows from it).

    async def with_expired_reservations(self, now: float) -> list[str]:
        """The budget streams holding a reservation or lease that expired at `now`
        (epoch seconds)."""
        rows = await self.pool.fetch(
            "SELECT budget_id FROM budgets WHERE open_reservations > 0 AND EXISTS ("
            f" SELECT 1 FROM {_HELD} WHERE (h.held ->> 'expires_at')::float8 <= $1)", now)
        return [r["budget_id"] for r in rows]

    async def reservation_holders(self) -> list[str]:
        """The orchestrator instances holding an open reservation or lease on some budget."""
        rows = await self.pool.fetch(
            f"SELECT DISTINCT h.held ->> 'instance' AS instance FROM budgets, {_HELD}"
            " WHERE open_reservations > 0 AND h.held ->> 'instance' IS NOT NULL")
        return [r["instance"] for r in rows]

    async def with_reservations_of(self, instance: str) -> list[str]:
        """The budget streams holding an open reservation or lease of `instance`."""
        rows = await self.pool.fetch(
            "SELECT budget_id FROM budgets WHERE open_reservations > 0 AND EXISTS ("
            f" SELECT 1 FROM {_HELD} WHERE h.held ->> 'instance' = $1)", instance)
        return [r["budget_id"] for r in rows]


_HELD = ("LATERAL (SELECT value FROM jsonb_each(state -> 'reservations')"
         " UNION ALL SELECT value FROM jsonb_each(state -> 'leases')) AS h(held)")
