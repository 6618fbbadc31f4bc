"""Per-minute rate counters in Postgres, so limits hold across orchestrator processes.

Admission is an atomic conditional increment (`calls < limit`), so two processes
can never both take the last slot of a window. Tokens are added when a call ends.

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

    async def admit(self, scope: str, subject: str, calls_limit: int | None) -> bool:
        """Take one call slot in this window; False if the limit is reached."""
        start = self.window()
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO rate_windows (scope, subject, window_start) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING", scope, subject, start)
            row = await conn.fetchrow(
                "UPDATE rate_windows SET calls = calls + 1 WHERE scope = $1 AND subject = $2"
                " AND window_start = $3 AND ($4::int IS NULL OR calls < $4) RETURNING calls",
                scope, subject, start, calls_limit)
            if self._pruned_at != start:
                self._pruned_at = start
                await self._prune(conn, start)
        return row is not None

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
