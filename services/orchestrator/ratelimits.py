"""Per-minute rate counters in Postgres, so limits hold across orchestrator processes.

The policy decides on the usage read here (`usage`); the call then takes its slots with
`take`, inside the transaction that records the decision (and reserves the budget):
every scope's slot or none, `calls < limit` checked on locked rows, so two processes
can never both take the last slot of a window, and a call denied for any reason (by
the policy, the budget, or a slot taken meanwhile) consumes nothing: its transaction
rolls back. Tokens are added when a call ends.

Windows are UTC minutes of the counter's `clock` (unix seconds; `time.time` unless one
is injected, as tests do to cross a minute without waiting for one). Windows that ended
before the previous minute are of no use to any decision: each process deletes them
once per minute, with its first admission in a new window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.domain.policy import RateUsage, WindowUsage

WINDOW = timedelta(minutes=1)


def window_start(now: float | None = None) -> datetime:
    t = int(time.time() if now is None else now)
    return datetime.fromtimestamp(t - t % 60, tz=UTC)


class RateLimited(Exception):
    """No slot left in `scope`'s window (`limit` calls per minute)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} rate limit reached: {limit} calls per minute")
        self.scope = scope
        self.limit = limit


class RateCounter:
    def __init__(self, pool: asyncpg.Pool, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.clock = clock
        self._pruned_at: datetime | None = None  # the window of this process's last prune

    def window(self) -> datetime:
        return window_start(self.clock())

    async def usage(self, subjects: dict[str, str]) -> RateUsage:
        """Current-window usage for the given scopes ({scope: subject})."""
        if not subjects:
            return RateUsage()
        rows = await self.pool.fetch(
            "SELECT scope, calls, tokens FROM rate_windows WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            self.window(), list(subjects), list(subjects.values()))
        found = {r["scope"]: WindowUsage(calls=r["calls"], tokens=r["tokens"]) for r in rows}
        return RateUsage(**{scope: found.get(scope, WindowUsage()) for scope in subjects})

    async def take(self, conn: asyncpg.Connection,
                   slots: dict[str, tuple[str, int | None]]) -> None:
        """Take one call slot in this window for every scope of `slots` ({scope: (subject,
        calls limit or None)}), inside the caller's transaction on `conn`: all of them,
        or raise `RateLimited` for the first full scope (in `slots`' order) and take
        none (the caller's transaction rolls back). The rows stay locked until it ends."""
        if not slots:
            return
        start = self.window()
        scopes = list(slots)
        subjects = [subject for subject, _ in slots.values()]
        await conn.execute(
            "INSERT INTO rate_windows (scope, subject, window_start)"
            " SELECT s, j, $3 FROM unnest($1::text[], $2::text[]) AS u(s, j)"
            " ORDER BY s, j ON CONFLICT DO NOTHING", scopes, subjects, start)
        rows = await conn.fetch(
            "SELECT scope, calls FROM rate_windows WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))"
            " ORDER BY scope, subject FOR UPDATE", start, scopes, subjects)
        calls = {r["scope"]: r["calls"] for r in rows}
        for scope, (_, limit) in slots.items():
            if limit is not None and calls.get(scope, 0) >= limit:
                raise RateLimited(scope, limit)
        await conn.execute(
            "UPDATE rate_windows SET calls = calls + 1 WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            start, scopes, subjects)
        if self._pruned_at != start:
            self._pruned_at = start
            await self._prune(conn, start)

    async def admit(self, scope: str, subject: str, calls_limit: int | None) -> bool:
        """Take one call slot of one scope in this window, in a transaction of its own;
        False if the limit is reached."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await self.take(conn, {scope: (subject, calls_limit)})
            except RateLimited:
                return False
        return True

    async def prune(self) -> int:
        """Delete the windows older than the previous minute; how many went."""
        async with self.pool.acquire() as conn:
            return await self._prune(conn, self.window())

    @staticmethod
    async def _prune(conn: asyncpg.Connection, start: datetime) -> int:
        status = await conn.execute("DELETE FROM rate_windows WHERE window_start < $1",
                                    start - WINDOW)
        return int(status.split()[-1])

    async def add_tokens(self, subjects: dict[str, str], tokens: int) -> None:
        if not subjects or tokens <= 0:
            return
        await self.pool.execute(
            "UPDATE rate_windows SET tokens = tokens + $4 WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            self.window(), list(subjects), list(subjects.values()), tokens)
