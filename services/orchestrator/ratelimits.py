"""Per-minute rate counters in Postgres, so limits hold across orchestrator processes.

Admission is an atomic conditional increment (`calls < limit`), so two processes
can never both take the last slot of a window. Tokens are added when a call ends.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import asyncpg

from shared.policy import RateUsage, WindowUsage


def window_start(now: float | None = None) -> datetime:
    t = int(now or time.time())
    return datetime.fromtimestamp(t - t % 60, tz=UTC)


class RateCounter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def usage(self, subjects: dict[str, str]) -> RateUsage:
        """Current-window usage for the given scopes ({scope: subject})."""
        if not subjects:
            return RateUsage()
        rows = await self.pool.fetch(
            "SELECT scope, calls, tokens FROM rate_windows WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            window_start(), list(subjects), list(subjects.values()))
        found = {r["scope"]: WindowUsage(calls=r["calls"], tokens=r["tokens"]) for r in rows}
        return RateUsage(**{scope: found.get(scope, WindowUsage()) for scope in subjects})

    async def admit(self, scope: str, subject: str, calls_limit: int | None) -> bool:
        """Take one call slot in this window; False if the limit is reached."""
        start = window_start()
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO rate_windows (scope, subject, window_start) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING", scope, subject, start)
            row = await conn.fetchrow(
                "UPDATE rate_windows SET calls = calls + 1 WHERE scope = $1 AND subject = $2"
                " AND window_start = $3 AND ($4::int IS NULL OR calls < $4) RETURNING calls",
                scope, subject, start, calls_limit)
        return row is not None

    async def add_tokens(self, subjects: dict[str, str], tokens: int) -> None:
        if not subjects or tokens <= 0:
            return
        await self.pool.execute(
            "UPDATE rate_windows SET tokens = tokens + $4 WHERE window_start = $1"
            " AND (scope, subject) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
            window_start(), list(subjects), list(subjects.values()), tokens)
