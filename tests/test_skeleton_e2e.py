"""The walking skeleton, end to end: three service processes over real NATS and Postgres."""

from __future__ import annotations

import asyncio
import signal
import uuid

import httpx
import pytest

from shared.infra.eventstore.store import EventStore, create_pool
from tests.support import ServiceProc, wait_until

PROBLEM = "application/problem+json"


def test_health_reports_nats_and_postgres(platform) -> None:
    body = httpx.get(f"{platform.api}/health").json()
    assert body["status"] == "ok" and body["nats"] is True and body["postgres"] is True


def test_every_service_answers_a_ping_over_nats(platform) -> None:
    body = httpx.get(f"{platform.api}/v1/system/ping", timeout=10, headers=platform.admin).json()
    for service in ("orchestrator", "provider", "node"):
        assert body[service]["ok"] is True, body
        assert body[service]["instance_id"] == f"{service}-test"


def test_create_then_read_a_session(platform, infra) -> None:
    policy = httpx.post(f"{platform.api}/v1/policies", headers=platform.admin,
                        json={"name": "default", "rules": {"max_tokens_per_call": 512}})
    assert policy.status_code == 201, policy.text
    created = httpx.post(f"{platform.api}/v1/sessions", json={
        "budget": {"limit_usd": 2.5, "limit_tokens": 10000},
        "policy": "default", "metadata": {"team": "qa"},
    }, headers=platform.admin)
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["status"] == "open"
    assert session["budget"] == {"limit_usd": 2.5, "limit_tokens": 10000}
    assert session["policy"] == "default" and session["policy_version"] == policy.json()["version"]
    fetched = httpx.get(f"{platform.api}/v1/sessions/{session['session_id']}", headers=platform.admin)
    assert fetched.status_code == 200
    assert fetched.json() == session

    async def stored():
        pool = await create_pool(infra.database_url, max_size=1)
        try:
            return await EventStore(pool).read_stream(f"session-{session['session_id']}")
        finally:
            await pool.close()

    [event] = asyncio.run(stored())
    assert event.type == "SessionStarted"
    assert event.event.budget.limit_usd == 2.5
    assert event.metadata.trace_id == session["trace_id"]  # the request's trace


def test_openapi_is_served(platform) -> None:
    schema = httpx.get(f"{platform.api}/schema/openapi.json").json()
    assert "/v1/sessions" in schema["paths"]
    assert "/v1/sessions/{session_id}" in schema["paths"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"budget": {"limit_usd": -1}}, "budget.limit_usd"),
        ({"budget": {"limit_usd": "ten"}}, "budget.limit_usd"),
        ({"budget": {"limit_tokens": 1.5}}, "budget.limit_tokens"),
        ({"metadata": {"k": 5}}, "metadata"),
        ({"budgte": {}}, "budgte"),
        ({"policy": "no spaces allowed"}, "policy"),
        ({"budget": {"limit_usd": 1, "limit_dollars": 2}}, "limit_dollars"),
        ([1, 2], "body"),
    ],
)
def test_invalid_session_bodies_are_problems_naming_the_field(platform, body, field) -> None:
    resp = httpx.post(f"{platform.api}/v1/sessions", json=body, headers=platform.admin)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    problem = resp.json()
    assert problem["status"] == 400 and problem["type"].endswith("/validation")
    assert field in problem["detail"], problem


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"budget": {"limit_usd": 1}', b"\xff\xfe"])
def test_malformed_json_is_a_400_problem(platform, raw: bytes) -> None:
    resp = httpx.post(f"{platform.api}/v1/sessions", content=raw,
                      headers={"content-type": "application/json", **platform.admin})
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)


def test_oversized_body_is_a_413_problem(platform) -> None:
    big = {"metadata": {"k": "x" * 1000}, "pad": "y" * 2_000_000}
    resp = httpx.post(f"{platform.api}/v1/sessions", json=big, headers=platform.admin)
    assert resp.status_code == 413
    assert resp.headers["content-type"].startswith(PROBLEM)


def test_unknown_session_and_wrong_method_are_problems(platform) -> None:
    missing = httpx.get(f"{platform.api}/v1/sessions/{uuid.uuid4()}", headers=platform.admin)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(PROBLEM)
    assert "not found" in missing.json()["detail"]
    wrong = httpx.delete(f"{platform.api}/v1/sessions", headers=platform.admin)
    assert wrong.status_code == 405 and wrong.headers["content-type"].startswith(PROBLEM)
    nowhere = httpx.get(f"{platform.api}/v1/nothing-here", headers=platform.admin)
    assert nowhere.status_code == 404 and nowhere.headers["content-type"].startswith(PROBLEM)


def test_services_stop_cleanly_on_sigterm(infra, platform, tmp_path) -> None:
    """Fresh provider and node processes (the shared ones keep serving) exit 0 on SIGTERM."""
    for name in ("provider", "node"):
        proc = ServiceProc(name, {**platform.env, "NEXUS_INSTANCE_ID": f"{name}-sigterm"},
                           tmp_path / f"{name}.log").start()
        wait_until(lambda proc=proc: "service started" in proc.log(), 20, what=f"{name} to start")
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0, proc.log()
        assert "service stopping" in proc.log()
