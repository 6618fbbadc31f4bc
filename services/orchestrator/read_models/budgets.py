"""The `budgets` read model: each budget stream folded with `fold_budget` (the manager's fold)."""

from __future__ import annotations

import asyncpg
import msgspec

from shared.contracts.events import RecordedEvent
from shared.domain.budget import (
    BUDGET_EVENT_TYPE_NAMES,
    BudgetState,
    Lease,
    Reservation,
    fold_budget,
)
from shared.infra.eventstore import EventStore, Projection


def _budget_from_json(raw: str) -> BudgetState:
    data = msgspec.json.decode(raw)
    data["reservations"] = {k: Reservation(**v) for k, v in data["reservations"].items()}
    data["lapsed"] = tuple(data.get("lapsed", ()))
    data["leases"] = {k: Lease(**v) for k, v in data.get("leases", {}).items()}  # issue 16
    return BudgetState(**data)


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
            "INSERT INTO budgets (budget_id, scope, owner, tenant, period, limit_micro_usd, limit_tokens,"
            " reserved_micro_usd, reserved_tokens, committed_micro_usd, committed_tokens,"
            " open_reservations, state, version, updated_at)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13::jsonb,$14,$15)"
            " ON CONFLICT (budget_id) DO UPDATE SET limit_micro_usd = EXCLUDED.limit_micro_usd,"
            " limit_tokens = EXCLUDED.limit_tokens, reserved_micro_usd = EXCLUDED.reserved_micro_usd,"
            " reserved_tokens = EXCLUDED.reserved_tokens,"
            " committed_micro_usd = EXCLUDED.committed_micro_usd,"
            " committed_tokens = EXCLUDED.committed_tokens,"
            " open_reservations = EXCLUDED.open_reservations, state = EXCLUDED.state,"
            " version = EXCLUDED.version, updated_at = EXCLUDED.updated_at",
            rec.stream_id, new.scope, new.owner, rec.metadata.tenant, new.period,
            new.limit_micro_usd, new.limit_tokens, new.reserved_micro_usd, new.reserved_tokens,
            new.committed_micro_usd, new.committed_tokens, len(new.reservations) + len(new.leases),
            msgspec.json.encode(new).decode(), new.version, rec.recorded_at,
        )


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
