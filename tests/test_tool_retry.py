"""A retried tool call (the same Idempotency-Key) never runs the tool twice.

Found by the chaos suite (tests/chaos.py): Postgres was killed while a side-effecting
tool ran; the tool's endpoint was hit, the orchestrator could not record the outcome,
answered 503 and released the key; the client's retry with the same key ran the tool a
second time. Now the call's id derives from the key, so the retry finds the call its
earlier attempt started: it is not run again but ends `outcome_unknown` for a human to
judge. What the interrupted attempt left is written here as a killed orchestrator leaves
it (its events in the real store); the rest is the real platform over HTTP.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx

from services.orchestrator.idempotency import derived_id
from shared.contracts.events import (Metadata, ToolCallDecided, ToolCallRequested,
                                     ToolCallStarted, toolcall_stream)
from shared.infra.eventstore import EventStore
from shared.infra.eventstore.store import create_pool
from tests.test_tenants import tenant_admin
from tests.test_tools import call_events, invoke, session


def leave_an_interrupted_attempt(database_url: str, tenant_name: str, sid: str, call_id: str,
                                 node: str) -> None:
    async def append() -> None:
        pool = await create_pool(database_url, max_size=1)
        try:
            requested = ToolCallRequested(session_id=sid, tool_call_id=call_id, tool="python",
                                          tool_version=0, arguments={"code": "print(1)"})
            await EventStore(pool).append(toolcall_stream(call_id), [
                requested,
                ToolCallDecided(session_id=sid, tool_call_id=call_id, tool="python",
                                verdict="allowed", rule="tools_allow", reason="allowed"),
                ToolCallStarted(session_id=sid, tool_call_id=call_id, tool="python", node=node)],
                expected_version=0, metadata=Metadata(tenant=tenant_name, actor="test",
                                                      correlation_id=sid, causation_id=call_id))
        finally:
            await pool.close()

    asyncio.run(append())


def test_a_retry_never_runs_a_started_call_again(platform, infra) -> None:
    name = f"tr{uuid.uuid4().hex[:8]}"
    headers = tenant_admin(platform, name)
    sid = session(platform, headers)
    # the ordinary case: a retry of a completed call replays its answer
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = invoke(platform, {**headers, **key}, sid, "python", {"code": "print(6 * 7)"})
    assert first.status_code == 200 and first.json()["status"] == "finished", first.text
    again = invoke(platform, {**headers, **key}, sid, "python", {"code": "print(6 * 7)"})
    assert again.json()["tool_call_id"] == first.json()["tool_call_id"]
    assert call_events(platform, headers, sid, first.json()["tool_call_id"]).count(
        "ToolCallStarted") == 1

    # an attempt that started the call and died before recording its outcome
    key = uuid.uuid4().hex
    call_id = str(derived_id(name, key, f"tool-call {sid} python"))
    node = httpx.get(f"{platform.api}/v1/nodes", headers=platform.admin).json()["nodes"][0]["node_id"]
    leave_an_interrupted_attempt(infra.database_url, name, sid, call_id, node)
    retry = invoke(platform, {**headers, "Idempotency-Key": key}, sid, "python",
                   {"code": "print(1)"})
    assert retry.status_code == 200, retry.text
    view = retry.json()
    assert (view["tool_call_id"], view["status"], view["error"]) == (call_id, "failed",
                                                                      "outcome_unknown")
    assert call_events(platform, headers, sid, call_id) == [
        "ToolCallRequested", "ToolCallDecided", "ToolCallStarted", "ToolCallFailed"]
    # ... and again: the same answer, still not run
    assert invoke(platform, {**headers, "Idempotency-Key": key}, sid, "python",
                  {"code": "print(1)"}).json()["status"] == "failed"
    assert call_events(platform, headers, sid, call_id).count("ToolCallStarted") == 1
