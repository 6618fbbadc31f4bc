"""The `nexus` CLI against the test session's real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from shared.contracts.events import SessionStarted, session_stream
from shared.infra.eventstore import EventStore
from tests.support import REPO


def nexus(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_migrate_twice_is_a_no_op(fresh_db: str) -> None:
    first = nexus("migrate", database_url=fresh_db)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "up to date"  # fresh_db was migrated already
    second = nexus("migrate", database_url=fresh_db)
    assert second.returncode == 0 and second.stdout.strip() == "up to date"


async def test_events_tail_prints_a_stream_as_json_lines(infra, store: EventStore) -> None:
    sid = str(uuid.uuid4())
    await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="cli")], 0)
    result = nexus("events", "tail", "--from", "0", "--no-follow",
                   "--stream", session_stream(sid), database_url=infra.database_url)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    record = json.loads(line)
    assert record["stream_id"] == session_stream(sid)
    assert record["event"] == {"type": "SessionStarted", "session_id": sid, "tenant": "cli",
                               "budget": None, "policy": None, "policy_version": None,
                               "policy_rules": None, "agent": None, "metadata": {},
                               "agent_version": None, "agent_source": None}


async def test_projections_list_and_rebuild(fresh_db: str) -> None:
    from shared.infra.eventstore.store import create_pool

    pool = await create_pool(fresh_db, max_size=2)
    try:
        store = EventStore(pool)
        for _ in range(3):
            sid = str(uuid.uuid4())
            await store.append(session_stream(sid), [SessionStarted(session_id=sid, tenant="c")], 0)
        listed = nexus("projections", "list", database_url=fresh_db)
        assert listed.returncode == 0, listed.stderr
        [row] = [line.split() for line in listed.stdout.splitlines() if line.startswith("sessions")]
        assert row == ["sessions", "0", "3", "3"]
        rebuilt = nexus("projections", "rebuild", "sessions", database_url=fresh_db)
        assert rebuilt.returncode == 0 and "3 events applied" in rebuilt.stdout
        assert await pool.fetchval("SELECT count(*) FROM sessions") == 3
        unknown = nexus("projections", "rebuild", "nope", database_url=fresh_db)
        assert unknown.returncode != 0 and "unknown projection 'nope'" in unknown.stderr
    finally:
        await pool.close()


def test_keys_create_prints_a_key_once_and_stores_its_hash(fresh_db: str) -> None:
    import asyncio

    from shared.infra.eventstore.store import create_pool

    result = nexus("keys", "create", "--tenant", "acme", "--name", "ci", database_url=fresh_db)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.count(" "))
    key = fields["key"].strip()
    assert key.startswith("nx_") and fields["tenant"].strip() == "acme"

    async def stored() -> str:
        pool = await create_pool(fresh_db, max_size=1)
        try:
            return await pool.fetchval("SELECT string_agg(data::text, '') FROM events")
        finally:
            await pool.close()

    events = asyncio.run(stored())
    assert key not in events and "key_hash" in events
