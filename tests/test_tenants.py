"""API keys, tenants, sessions, idempotency: what a tenant sees and may do."""

from __future__ import annotations

import uuid

import httpx
import pytest

PROBLEM = "application/problem+json"


def tenant_admin(platform, tenant: str) -> dict[str, str]:
    resp = httpx.post(f"{platform.api}/v1/keys", headers=platform.admin,
                      json={"name": "admin", "role": "admin", "tenant": tenant})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['key']}"}


def member_of(platform, admin: dict[str, str], name: str = "ci") -> tuple[str, dict[str, str]]:
    resp = httpx.post(f"{platform.api}/v1/keys", headers=admin, json={"name": name})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return body["key_id"], {"Authorization": f"Bearer {body['key']}"}


@pytest.fixture
def two_tenants(platform):
    a, b = f"acme{uuid.uuid4().hex[:6]}", f"bolt{uuid.uuid4().hex[:6]}"
    return (a, tenant_admin(platform, a)), (b, tenant_admin(platform, b))


def test_every_api_call_needs_a_valid_key(platform) -> None:
    for method, path in [("get", "/v1/sessions"), ("post", "/v1/sessions"), ("get", "/v1/nodes"),
                         ("get", "/v1/keys"), ("get", "/v1/system/ping")]:
        resp = httpx.request(method, f"{platform.api}{path}", json={})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.headers["content-type"].startswith(PROBLEM)
        assert resp.headers["www-authenticate"].startswith("Bearer")
        bad = httpx.request(method, f"{platform.api}{path}", json={},
                            headers={"Authorization": "Bearer nx_0123456789abcdef_wrongwrongwrongwrongwrong"})
        assert bad.status_code == 401
    assert httpx.get(f"{platform.api}/health").status_code == 200  # public


def test_keys_are_shown_once_stored_hashed_and_revocable(platform, two_tenants, infra) -> None:
    (tenant, admin), _ = two_tenants
    key_id, member = member_of(platform, admin)
    assert httpx.get(f"{platform.api}/v1/sessions", headers=member).status_code == 200
    listed = httpx.get(f"{platform.api}/v1/keys", headers=admin).json()["keys"]
    assert {k["key_id"] for k in listed} >= {key_id}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    # a member is no admin
    assert httpx.post(f"{platform.api}/v1/keys", headers=member, json={"name": "x"}).status_code == 403
    assert httpx.delete(f"{platform.api}/v1/keys/{key_id}", headers=admin).status_code == 204

    def revoked() -> bool:
        return httpx.get(f"{platform.api}/v1/sessions", headers=member).status_code == 401

    from tests.support import wait_until
    wait_until(revoked, 10, 0.2, "the revoked key to stop working")


def test_tenant_admin_cannot_issue_keys_for_another_tenant(platform, two_tenants) -> None:
    (a, admin_a), (b, _) = two_tenants
    resp = httpx.post(f"{platform.api}/v1/keys", headers=admin_a, json={"name": "x", "tenant": b})
    assert resp.status_code == 403 and resp.headers["content-type"].startswith(PROBLEM)


def test_sessions_list_paginates_filters_and_closes(platform, two_tenants) -> None:
    (_, admin), _ = two_tenants
    _, key = member_of(platform, admin)
    ids = []
    for i in range(5):
        resp = httpx.post(f"{platform.api}/v1/sessions", headers=key,
                          json={"agent": "writer" if i % 2 else "coder", "metadata": {"i": str(i)}})
        assert resp.status_code == 201
        ids.append(resp.json()["session_id"])
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{platform.api}/v1/sessions", headers=key, params=params).json()
        seen += [s["session_id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    writers = httpx.get(f"{platform.api}/v1/sessions", headers=key, params={"agent": "writer"}).json()
    assert {s["session_id"] for s in writers["sessions"]} == {ids[1], ids[3]}

    closed = httpx.post(f"{platform.api}/v1/sessions/{ids[0]}/close", headers=key,
                        json={"reason": "done"})
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    again = httpx.post(f"{platform.api}/v1/sessions/{ids[0]}/close", headers=key)
    assert again.status_code == 200 and again.json()["status"] == "closed"
    open_ones = httpx.get(f"{platform.api}/v1/sessions", headers=key, params={"status": "open"}).json()
    assert ids[0] not in {s["session_id"] for s in open_ones["sessions"]}

    log = httpx.get(f"{platform.api}/v1/sessions/{ids[0]}/events", headers=key).json()
    assert [e["type"] for e in log["events"]] == ["SessionStarted", "SessionClosed"]
    assert all(e["trace_id"] for e in log["events"])
    assert log["events"][1]["data"]["reason"] == "done"
    bad = httpx.get(f"{platform.api}/v1/sessions", headers=key, params={"cursor": "garbage!"})
    assert bad.status_code == 400 and "cursor" in bad.json()["detail"]
    assert httpx.get(f"{platform.api}/v1/sessions", headers=key,
                     params={"limit": 0}).status_code == 400


def test_tenants_never_see_each_other(platform, two_tenants) -> None:
    (a, admin_a), (b, admin_b) = two_tenants
    _, key_a = member_of(platform, admin_a)
    _, key_b = member_of(platform, admin_b)
    sid = httpx.post(f"{platform.api}/v1/sessions", headers=key_a, json={}).json()["session_id"]
    for method, path in [("get", f"/v1/sessions/{sid}"), ("post", f"/v1/sessions/{sid}/close"),
                         ("get", f"/v1/sessions/{sid}/events")]:
        resp = httpx.request(method, f"{platform.api}{path}", headers=key_b)
        assert resp.status_code == 404, (path, resp.text)  # not 403: existence stays hidden
    assert sid not in {s["session_id"] for s in
                       httpx.get(f"{platform.api}/v1/sessions", headers=key_b).json()["sessions"]}
    keys_b = httpx.get(f"{platform.api}/v1/keys", headers=admin_b).json()["keys"]
    assert all(k["tenant"] == b for k in keys_b)
    a_key_ids = [k["key_id"] for k in httpx.get(f"{platform.api}/v1/keys", headers=admin_a).json()["keys"]]
    assert httpx.delete(f"{platform.api}/v1/keys/{a_key_ids[0]}", headers=admin_b).status_code == 404
    # nor find another tenant's events by trace id
    trace = httpx.get(f"{platform.api}/v1/sessions/{sid}", headers=key_a).json()["trace_id"]
    assert httpx.get(f"{platform.api}/v1/events", headers=key_a,
                     params={"trace_id": trace}).json()["events"]
    assert httpx.get(f"{platform.api}/v1/events", headers=key_b,
                     params={"trace_id": trace}).json()["events"] == []
    # a tenant's key cannot administer nodes
    assert httpx.delete(f"{platform.api}/v1/nodes/whatever", headers=admin_a).status_code == 403


def test_idempotency_key_replays_and_refuses_a_different_body(platform, two_tenants) -> None:
    (_, admin), _ = two_tenants
    _, key = member_of(platform, admin)
    idem = {**key, "Idempotency-Key": f"create-{uuid.uuid4()}"}
    body = {"metadata": {"purpose": "retry-me"}}
    first = httpx.post(f"{platform.api}/v1/sessions", headers=idem, json=body)
    second = httpx.post(f"{platform.api}/v1/sessions", headers=idem, json=body)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    listed = httpx.get(f"{platform.api}/v1/sessions", headers=key).json()["sessions"]
    assert sum(s["metadata"] == {"purpose": "retry-me"} for s in listed) == 1  # no second effect
    other = httpx.post(f"{platform.api}/v1/sessions", headers=idem, json={"metadata": {"x": "y"}})
    assert other.status_code == 422 and other.headers["content-type"].startswith(PROBLEM)
    assert "Idempotency-Key" in other.json()["detail"]
    # the same key in another tenant is another request
    _, (b, admin_b) = two_tenants
    elsewhere = httpx.post(f"{platform.api}/v1/sessions", headers={**admin_b, "Idempotency-Key":
                                                                    idem["Idempotency-Key"]}, json=body)
    assert elsewhere.status_code == 201 and elsewhere.json()["session_id"] != first.json()["session_id"]
