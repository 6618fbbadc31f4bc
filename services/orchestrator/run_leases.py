"""Run leases: which orchestrator process drives which run, until when.

Technical state, not events (renewals several times a second would flood the event
log): the `run_leases` table, which this module alone reads and writes. A row exists
while a run is not over:

- `active`: `owner` drives the run and renews the lease of all its runs in one
  statement every lease/4; a process killed stops renewing, and once `expires_at`
  passes any orchestrator `claim`s it (the row's `epoch` + 1);
- `parked`: the run waits for a human; nobody holds it (no compute), `expires_at` is
  when the wait expires. An answer (`wake`) makes it active and due at once.

The lease only says who should drive; correctness comes from the run's stream: whoever
takes a run over appends `RunResumed` at the stream's version, so the previous owner's
next append fails (`WrongExpectedVersion`) and it stops (fencing).
"""

from __future__ import annotations

import asyncpg

from shared.infra.eventstore import EventStore


class RunLeases:
    def __init__(self, store: EventStore, owner: str, lease_s: float) -> None:
        self.pool = store.pool
        self.owner = owner
        self.lease_s = lease_s

    async def insert(self, conn: asyncpg.Connection, run_id: str, tenant: str) -> None:
        """The first lease of a new run, held by this process (inside the run's
        `RunStarted` transaction)."""
        await conn.execute(
            "INSERT INTO run_leases (run_id, tenant, owner, epoch, state, expires_at)"
            " VALUES ($1, $2, $3, 1, 'active', now() + make_interval(secs => $4))",
            run_id, tenant, self.owner, self.lease_s)

    async def due(self, limit: int = 50) -> list[str]:
        """Runs whose lease (or wait) has expired: theirs to take over."""
        rows = await self.pool.fetch(
            "SELECT run_id FROM run_leases WHERE expires_at < now()"
            " ORDER BY expires_at LIMIT $1", limit)
        return [r["run_id"] for r in rows]

    async def claim(self, run_id: str) -> int | None:
        """Take the run's expired lease (or a parked run whose wait is over, or one that
        was woken): the new epoch, or None when another process holds it."""
        return await self.pool.fetchval(
            "UPDATE run_leases SET owner = $2, epoch = epoch + 1, state = 'active',"
            " expires_at = now() + make_interval(secs => $3)"
            " WHERE run_id = $1 AND expires_at < now() RETURNING epoch",
            run_id, self.owner, self.lease_s)

    async def renew_all(self, run_ids: list[str]) -> int:
        """Extend the active leases this process holds of the runs it is driving; how
        many. A lease whose run nobody here drives any more (its task failed and could
        not hand it on, e.g. while Postgres was away) is left to lapse: taken over then."""
        status = await self.pool.execute(
            "UPDATE run_leases SET expires_at = now() + make_interval(secs => $2)"
            " WHERE owner = $1 AND state = 'active' AND run_id = ANY($3::text[])",
            self.owner, self.lease_s, run_ids)
        return int(status.split()[-1])

    async def holds(self, run_id: str, epoch: int) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM run_leases WHERE run_id = $1 AND owner = $2 AND epoch = $3"
            " AND state = 'active'", run_id, self.owner, epoch))

    async def park(self, run_id: str, epoch: int, until: float) -> bool:
        """Give the run up while it waits for a human, until unix time `until`."""
        status = await self.pool.execute(
            "UPDATE run_leases SET owner = NULL, state = 'parked', expires_at = to_timestamp($3)"
            " WHERE run_id = $1 AND epoch = $2 AND owner = $4", run_id, epoch, until, self.owner)
        return status.endswith(" 1")

    async def wake(self, run_id: str) -> None:
        """A parked run got its answer (or was cancelled): due now, for whoever claims it."""
        await self.pool.execute(
            "UPDATE run_leases SET expires_at = now() - interval '1 second'"
            " WHERE run_id = $1 AND state = 'parked'", run_id)

    async def drop(self, run_id: str) -> None:
        """The run is over."""
        await self.pool.execute("DELETE FROM run_leases WHERE run_id = $1", run_id)

    async def release(self, run_id: str, epoch: int) -> None:
        """Let another process take it at once (this one is shutting down)."""
        await self.pool.execute(
            "UPDATE run_leases SET expires_at = now() - interval '1 second'"
            " WHERE run_id = $1 AND owner = $2 AND epoch = $3", run_id, self.owner, epoch)

    async def open_count(self, tenant: str) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM run_leases WHERE tenant = $1", tenant)
