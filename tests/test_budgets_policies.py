"""Budgets and policies wrap every LLM call; several orchestrators, one truth: Postgres."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx
import nats
import pytest

from shared.domain.budget import fold_budget, prompt_token_bound
from shared.infra.eventstore import EventStore
from shared.contracts.events import SessionClosed, session_stream
from shared.contracts.messages import ChatMessage
from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.llm_cluster import BACKUP_KEY, PRIMARY_KEY, LLMCluster, start_llm_cluster
from tests.support import wait_until

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "hi"}]
# The fake upstreams count prompt tokens as a real runtime does, chat template included:
# 1 word + 3 per message + TEMPLATE_TOKENS = 24 for PROMPT (a naive estimate says 5).
TEMPLATE_TOKENS = 20
# Worst case the orchestrator reserves for PROMPT with max_tokens=4: the prompt's bound
# (UTF-8 bytes + template allowances = 50) + 4. Actually used: 24 prompt + 4 completion.
RESERVED_PER_CALL = prompt_token_bound([ChatMessage(role="user", content="hi")]) + 4
USED_PER_CALL = 1 + 3 + TEMPLATE_TOKENS + 4


@pytest.fixture(scope="module")
def two(infra, tmp_path_factory):
    """Two orchestrator processes and one provider against the same database and NATS, on
    the exact path: a reservation per call (budget leases off; the leased path's race is
    in tests/test_leased_calls.py)."""
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("two"), new_database(infra),
                                orchestrators=2, NEXUS_BUDGET_LEASE_CALLS="0")
    cluster.primary.configure(template_tokens=TEMPLATE_TOKENS)
    cluster.backup.configure(template_tokens=TEMPLATE_TOKENS)
    try:
        yield cluster
    finally:
        cluster.stop()


async def fire(llm: LLMCluster, key: dict[str, str], sessions: list[str],
               calls: int) -> tuple[list[int], int]:
    """`calls` concurrent chat calls, alternating orchestrators and sessions: their status
    codes, and the tokens the answers themselves report as used (`usage.total_tokens`)."""
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def one(i: int) -> tuple[int, int]:
            resp = await http.post(
                f"{llm.apis[i % len(llm.apis)]}/v1/chat/completions",
                headers={**key, "X-Nexus-Session": sessions[i % len(sessions)]},
                json={"model": "default", "messages": PROMPT, "max_tokens": 4})
            if resp.status_code not in (200, 402):
                raise AssertionError(f"{resp.status_code}: {resp.text}")
            used = resp.json()["usage"]["total_tokens"] if resp.status_code == 200 else 0
            return resp.status_code, used

        results = await asyncio.gather(*(one(i) for i in range(calls)))
        return [code for code, _ in results], sum(used for _, used in results)


async def fold_vs_projection(llm: LLMCluster, stream: str) -> tuple[object, dict]:
    pool = await create_pool(llm.database_url, max_size=2)
    try:
        state = None
        for rec in await EventStore(pool).read_stream(stream):
            state = fold_budget(state, rec.event, rec.stream_version)
        row = None
        for _ in range(100):  # the projection follows the events within moments
            row = await pool.fetchrow("SELECT * FROM budgets WHERE budget_id = $1", stream)
            if row and state and row["version"] == state.version:
                break
            await asyncio.sleep(0.1)
        return state, dict(row) if row else {}
    finally:
        await pool.close()


def test_budget_race_two_orchestrators_never_overspend(two: LLMCluster) -> None:
    key = two.tenant_key()
    limit = 20 * RESERVED_PER_CALL
    sid = two.session(key, budget={"limit_tokens": limit})
    outcomes, used = asyncio.run(fire(two, key, [sid], 200))
    admitted = outcomes.count(200)
    # What the answers themselves report is the truth the budget must hold to.
    assert used == admitted * USED_PER_CALL <= limit
    # The first 20 reservations fill the budget exactly; commits give back what a call
    # reserved but did not use, which can admit more calls, never an overspend.
    assert 20 <= admitted <= limit // USED_PER_CALL
    budget = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key).json()["session"]
    assert budget["committed_tokens"] == used
    assert (budget["overrun_tokens"], budget["overruns"]) == (0, 0)
    assert budget["reserved_tokens"] == 0 and budget["open_reservations"] == 0
    state, row = asyncio.run(fold_vs_projection(two, f"budget-session-{sid}"))
    assert row["committed_tokens"] == state.committed_tokens == budget["committed_tokens"]
    assert row["reserved_tokens"] == state.reserved_tokens == 0
    assert row["version"] == state.version == budget["version"]
    denials = [e for e in two.events(sid) if e.type == "BudgetExceeded"]
    assert len(denials) == outcomes.count(402)
    assert all("tokens requested" in d.event.reason for d in denials)


def test_tenant_budget_binds_across_sessions(two: LLMCluster) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key = two.tenant_key(tenant)
    limit = 15 * RESERVED_PER_CALL
    resp = httpx.put(f"{two.api}/v1/tenants/{tenant}/budget", headers=two.admin,
                     json={"limit_tokens": limit})
    assert resp.status_code == 200
    sessions = [two.session(key, budget={"limit_tokens": 10_000}) for _ in range(4)]
    outcomes, used = asyncio.run(fire(two, key, sessions, 120))
    admitted = outcomes.count(200)
    assert used == admitted * USED_PER_CALL <= limit
    assert 15 <= admitted <= limit // USED_PER_CALL
    tenant_budget = httpx.get(f"{two.api}/v1/sessions/{sessions[0]}/budget", headers=key).json()["tenant"]
    assert tenant_budget["committed_tokens"] == used
    assert tenant_budget["open_reservations"] == 0
    for _ in range(limit // USED_PER_CALL):  # spend what commits gave back, until denied
        denied = httpx.post(f"{two.api}/v1/chat/completions",
                            headers={**key, "X-Nexus-Session": sessions[0]},
                            json={"model": "default", "messages": PROMPT, "max_tokens": 4})
        if denied.status_code != 200:
            break
    assert denied.status_code == 402
    assert denied.json()["budget"] == "tenant" and "tenant budget" in denied.json()["detail"]


def test_time_travel_shows_the_budget_as_it_stood(two: LLMCluster) -> None:
    key = two.tenant_key()
    sid = two.session(key, budget={"limit_usd": 1.0})
    seen = []
    for _ in range(3):
        assert httpx.post(f"{two.api}/v1/chat/completions", headers={**key, "X-Nexus-Session": sid},
                          json={"model": "default", "messages": PROMPT,
                                "max_tokens": 4}).status_code == 200
        now = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key).json()["session"]
        seen.append((time.time(), now))
        time.sleep(0.05)
    for moment, expected in seen:
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1e6):06d}Z"
        past = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key,
                         params={"at": at}).json()["session"]
        assert {k: past[k] for k in ("committed_usd", "reserved_usd", "version")} == \
               {k: expected[k] for k in ("committed_usd", "reserved_usd", "version")}
        by_position = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key,
                                params={"at": past["as_of_position"]}).json()["session"]
        assert by_position["version"] == expected["version"]
    assert seen[0][1]["committed_usd"] < seen[1][1]["committed_usd"] < seen[2][1]["committed_usd"]
    bad = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key, params={"at": "yesterday"})
    assert bad.status_code == 400 and "at" in bad.json()["detail"]


def chat(llm: LLMCluster, key, sid: str, api: str | None = None, **body) -> httpx.Response:
    payload = {"model": "default", "messages": PROMPT, "max_tokens": 4, **body}
    return httpx.post(f"{api or llm.api}/v1/chat/completions",
                      headers={**key, "X-Nexus-Session": sid}, json=payload, timeout=30)


@pytest.mark.parametrize(("rules", "body", "rule"), [
    ({"models_deny": ["def*"]}, {}, "models.deny"),
    ({"models_allow": ["gpt-*"]}, {}, "models.allow"),
    ({"providers_deny": ["primary", "backup"]}, {}, "providers.deny"),  # every target
    ({"max_tokens_per_call": 2}, {"max_tokens": 3}, "max_tokens_per_call"),
    ({"content": {"deny_input": ["(?i)forbidden"]}},
     {"messages": [{"role": "user", "content": "a Forbidden word"}]}, "content.input.deny[0]"),
    ({}, {"tools": [{"type": "function", "function": {"name": "rm_rf"}}]}, "default.deny_tools"),
], ids=["models-deny", "models-allow", "providers-deny", "max-tokens", "content", "tools"])
def test_each_policy_rule_denies_as_written(two: LLMCluster, rules, body, rule) -> None:
    key = two.tenant_key()
    sid = two.session(key, policy_rules=rules)
    resp = chat(two, key, sid, **body)
    assert resp.status_code == 403, resp.text
    problem = resp.json()
    assert problem["rule"] == rule and problem["type"].endswith("/policy-denied")
    [evaluated] = [e.event for e in two.events(sid) if e.type == "PolicyEvaluated"]
    assert (evaluated.allowed, evaluated.rule, evaluated.policy) == (False, rule, "inline")
    assert evaluated.reason == problem["detail"]
    assert not [e for e in two.events(sid) if e.type.startswith(("LLMCall", "Budget"))]


def test_allowed_calls_are_evaluated_and_tools_can_be_allowed(two: LLMCluster) -> None:
    key = two.tenant_key()
    sid = two.session(key, policy_rules={"tools_allow": ["get_*"], "max_tokens_per_call": 8})
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    assert chat(two, key, sid, tools=tools).status_code == 200
    assert chat(two, key, sid).status_code == 200
    decisions = [e.event for e in two.events(sid) if e.type == "PolicyEvaluated"]
    assert [(d.allowed, d.rule) for d in decisions] == [(True, "default.allow_chat")] * 2


def test_named_policies_are_versioned_and_pinned(two: LLMCluster) -> None:
    key = two.tenant_key()
    v1 = httpx.post(f"{two.api}/v1/policies", headers=key,
                    json={"name": "std", "rules": {"max_tokens_per_call": 8}}).json()
    old = two.session(key, policy="std")
    v2 = httpx.post(f"{two.api}/v1/policies", headers=key,
                    json={"name": "std", "rules": {"max_tokens_per_call": 2}}).json()
    assert (v1["version"], v2["version"]) == (1, 2)
    new = two.session(key, policy="std")
    assert chat(two, key, old).status_code == 200  # pinned to v1
    denied = chat(two, key, new)
    assert denied.status_code == 403 and denied.json()["policy"] == "std@2"
    bad = httpx.post(f"{two.api}/v1/policies", headers=key,
                     json={"name": "broken", "rules": {"content": {"deny_input": ["(?!x)y"]}}})
    assert bad.status_code == 400 and "rules.content.deny_input[0]" in bad.json()["detail"]
    assert bad.json()["errors"][0]["field"] == "rules.content.deny_input[0]"  # RE2 cannot run it
    unknown = httpx.post(f"{two.api}/v1/policies", headers=key,
                         json={"name": "typo", "rules": {"models_dney": ["x"]}})
    assert unknown.status_code == 400 and "models_dney" in unknown.json()["detail"]


def test_rate_limit_holds_across_two_orchestrators(two: LLMCluster) -> None:
    key = two.tenant_key()
    sid = two.session(key, policy_rules={"rate_per_session": {"calls_per_minute": 5}})

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as http:
            async def one(i: int) -> int:
                r = await http.post(f"{two.apis[i % 2]}/v1/chat/completions",
                                    headers={**key, "X-Nexus-Session": sid},
                                    json={"model": "default", "messages": PROMPT, "max_tokens": 2})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(12)))

    codes = asyncio.run(burst())
    # The burst may straddle a minute (window semantics are tested with an injected clock
    # in test_bounded_state.py): whatever the split, no window admitted more than 5, every
    # admitted call was counted in one, and a window that denied is full.
    windows = asyncio.run(_rate_windows(two, sid))
    assert codes.count(200) + codes.count(429) == 12
    assert sum(windows) == codes.count(200) and all(w <= 5 for w in windows)
    assert 5 in windows and codes.count(429) >= 12 - 5 * len(windows)
    rules = {e.event.rule for e in two.events(sid) if e.type == "PolicyEvaluated" and not e.event.allowed}
    assert rules == {"rate.calls_per_minute.session"}


def test_a_call_denied_by_policy_or_budget_consumes_no_rate_slot(two: LLMCluster) -> None:
    """Rate admission commits with the decision: a call the policy or a budget denies
    takes no slot of any scope, so it never counts toward the per-minute limit."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key = two.tenant_key(tenant)

    def tenant_budget(limit_tokens: int) -> int:
        return httpx.put(f"{two.api}/v1/tenants/{tenant}/budget", headers=two.admin,
                         json={"limit_tokens": limit_tokens}).status_code

    def call(api: str, max_tokens: int) -> httpx.Response:
        return httpx.post(f"{api}/v1/chat/completions", timeout=30,
                          headers={**key, "X-Nexus-Session": sid},
                          json={"model": "default", "messages": PROMPT, "max_tokens": max_tokens})

    assert tenant_budget(RESERVED_PER_CALL - 1) == 200  # no call fits the tenant's month
    limits = {"calls_per_minute": 2}
    sid = two.session(key, policy_rules={"max_tokens_per_call": 8, "rate_per_session": limits,
                                         "rate_per_tenant": limits})
    denied = [call(two.apis[i % 2], 100) for i in range(3)] + \
             [call(two.apis[i % 2], 4) for i in range(3)]
    assert [r.status_code for r in denied] == [403] * 3 + [402] * 3, [r.text for r in denied]
    assert {r.json()["rule"] for r in denied[:3]} == {"max_tokens_per_call"}
    assert {r.json()["budget"] for r in denied[3:]} == {"tenant"}
    assert asyncio.run(_rate_windows(two, sid)) == []
    assert asyncio.run(_rate_windows(two, tenant, scope="tenant")) == []
    # six denials in this minute, a limit of two: both slots are still there
    assert tenant_budget(10_000) == 200
    admitted = [call(two.api, 4) for _ in range(2)]
    assert [r.status_code for r in admitted] == [200, 200], [r.text for r in admitted]
    assert sum(asyncio.run(_rate_windows(two, sid))) == 2
    assert sum(asyncio.run(_rate_windows(two, tenant, scope="tenant"))) == 2


def test_secrets_are_redacted_before_a_hosted_provider_only(two: LLMCluster) -> None:
    key = two.tenant_key()
    sid = two.session(key, policy_rules={})
    text = "mail me at jane.doe@example.com, card 4111 1111 1111 1111, key sk-abcdef0123456789abcdef"
    assert chat(two, key, sid, messages=[{"role": "user", "content": text}]).status_code == 200
    sent = two.primary.stats.last_body["messages"][0]["content"]
    assert "jane.doe@example.com" not in sent and "4111 1111" not in sent and "sk-abcdef" not in sent
    assert "[REDACTED:email]" in sent and "[REDACTED:card]" in sent
    local = chat(two, key, sid, model="ollama-chat", messages=[{"role": "user", "content": text}])
    assert local.status_code == 200
    assert two.backup.stats.last_body["messages"][-1]["content"] == text  # not hosted: as written


def test_reservation_of_a_dead_orchestrator_is_released(infra, tmp_path) -> None:
    llm = start_llm_cluster(infra, tmp_path, new_database(infra), NEXUS_RESERVATION_TTL_S="2",
                            NEXUS_BUDGET_SWEEP_S="0.3", NEXUS_BUDGET_LEASE_CALLS="0")
    try:
        key = llm.tenant_key()
        sid = llm.session(key, budget={"limit_tokens": 1000})
        llm.primary.script({"token_delay_ms": 500})

        async def doomed() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream("POST", f"{llm.api}/v1/chat/completions",
                                       headers={**key, "X-Nexus-Session": sid},
                                       json={"model": "default", "messages": PROMPT,
                                             "max_tokens": 8, "stream": True}) as resp:
                    async for _ in resp.aiter_lines():
                        llm.orchestrators[0].kill()  # dies holding the reservation
                        return

        asyncio.run(doomed())
        llm.start_orchestrator()  # a fresh process recovers it from the events
        api = llm.apis[-1]

        def released() -> bool:
            b = httpx.get(f"{api}/v1/sessions/{sid}/budget", headers=key).json()["session"]
            return b["open_reservations"] == 0 and b["reserved_tokens"] == 0

        wait_until(released, 20, 0.2, "the orphaned reservation to be released")
        releases = [e.event for e in llm.events(sid) if e.type == "BudgetReleased"]
        assert [r.reason for r in releases] == ["expired"]
    finally:
        llm.stop()


def test_no_secret_reaches_logs_events_errors_or_nats(infra, tmp_path) -> None:
    """A full run with every kind of secret in play, then grep everything it left."""
    llm = start_llm_cluster(infra, tmp_path, new_database(infra))
    captured: list[bytes] = []

    def traffic() -> list[str]:
        key = llm.tenant_key()
        member = httpx.post(f"{llm.api}/v1/keys", headers=key, json={"name": "m"}).json()["key"]
        sid = llm.session(key, budget={"limit_usd": 1}, policy_rules={"models_deny": ["nope*"]})
        bodies = []
        llm.primary.script({"status": 500}, {"status": 401})
        for body in ({}, {"model": "nope-x"}, {"max_tokens": 0}, {"stream": True}):
            bodies.append(chat(llm, key, sid, **body).text)
        # a provider whose key is wrong: the upstream's 401 echoing it must go no further
        llm.primary.script({"status": 401, "message": f"bad key {PRIMARY_KEY}"})
        llm.backup.script({"status": 500}, {"status": 500})
        bodies.append(chat(llm, key, sid).text)
        bodies.append(httpx.get(f"{llm.api}/v1/sessions",
                                headers={"Authorization": "Bearer " + member[:-3] + "xyz"}).text)
        return [member, key["Authorization"].split()[1], *bodies]

    async def run() -> list[str]:
        nc = await nats.connect(llm.nats.url)

        async def capture(m) -> None:
            captured.append(m.subject.encode() + m.data + json.dumps(m.headers or {}).encode())

        await nc.subscribe(">", cb=capture)
        await nc.flush()
        result = await asyncio.to_thread(traffic)  # the NATS client keeps reading meanwhile
        # positive evidence that the capture has everything routed so far: a PING/PONG
        # round trip (the server answers after what it queued for us), then a drain that
        # runs the callbacks of every message received
        await nc.flush()
        await nc.drain()
        return result

    try:
        member, tenant_key, *bodies = asyncio.run(run())
    finally:
        llm.stop()
    secrets = [llm.admin_key, member, tenant_key, PRIMARY_KEY, BACKUP_KEY]
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    events = asyncio.run(_dump_events(llm.database_url))
    for secret in secrets:
        assert secret not in logs, "a key reached a log"
        assert secret not in events, "a key reached an event"
        assert all(secret not in b for b in bodies), "a key reached an error body"
        assert all(secret.encode() not in m for m in captured), "a key reached a NATS message"
    assert re.search(r"sk-test-primary", logs + events) is None
    assert len(captured) > 10  # the capture did see the traffic


async def _rate_windows(llm: LLMCluster, subject: str, scope: str = "session") -> list[int]:
    pool = await create_pool(llm.database_url, max_size=1)
    try:
        rows = await pool.fetch("SELECT calls FROM rate_windows WHERE scope = $2"
                                " AND subject = $1 ORDER BY window_start", subject, scope)
        return [r["calls"] for r in rows]
    finally:
        await pool.close()


async def _dump_events(url: str) -> str:
    pool = await create_pool(url, max_size=1)
    try:
        rows = await pool.fetch("SELECT data::text || metadata::text AS t FROM events")
        return "\n".join(r["t"] for r in rows)
    finally:
        await pool.close()


def test_output_rules_deny_the_answer_but_the_spend_is_kept(two: LLMCluster) -> None:
    key = two.tenant_key()
    rules = {"content": {"deny_output": ["tok2"]}}  # the fake's answers contain "tok2"
    sid = two.session(key, budget={"limit_tokens": 1000}, policy_rules=rules)
    denied = chat(two, key, sid)
    assert denied.status_code == 403, denied.text
    assert denied.json()["rule"] == "content.output.deny[0]"
    events = two.events(sid)
    outputs = [e.event for e in events if e.type == "PolicyEvaluated" and e.event.action == "output"]
    assert [(o.allowed, o.rule) for o in outputs] == [(False, "content.output.deny[0]")]
    assert [e.type for e in events if e.type == "BudgetCommitted"]  # tokens were spent
    assert not [e for e in events if e.type == "MessageAppended"]  # the answer is not kept

    # streamed: the tokens have left already, so the stream ends with the denial
    with httpx.stream("POST", f"{two.api}/v1/chat/completions", timeout=30,
                      headers={**key, "X-Nexus-Session": sid},
                      json={"model": "default", "messages": PROMPT, "max_tokens": 4,
                            "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["error"]["code"] == "PolicyDenied"

    allowed_sid = two.session(key, policy_rules={"content": {"deny_output": ["never-said"]}})
    assert chat(two, key, allowed_sid).status_code == 200
    [ok] = [e.event for e in two.events(allowed_sid)
            if e.type == "PolicyEvaluated" and e.event.action == "output"]
    assert (ok.allowed, ok.rule) == (True, "default.allow_output")


def test_an_overrun_is_committed_shown_and_blocks_until_the_limit_is_raised(two: LLMCluster) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key = two.tenant_key(tenant)
    assert httpx.put(f"{two.api}/v1/tenants/{tenant}/budget", headers=two.admin,
                     json={"limit_tokens": 100}).status_code == 200
    sid = two.session(key)
    two.primary.script({"ignore_max_tokens": True})  # a provider that ignores max_tokens
    long = [{"role": "user", "content": "FAKE_TOKENS=200"}]
    first = chat(two, key, sid, messages=long)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    reserved = prompt_token_bound([ChatMessage(role="user", content=long[0]["content"])]) + 4
    assert used == 1 + 3 + TEMPLATE_TOKENS + 200 > 100  # far beyond what was reserved
    budget = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key).json()["tenant"]
    assert budget["committed_tokens"] == used  # what was spent, not clamped
    assert (budget["overrun_tokens"], budget["overruns"]) == (used - reserved, 1)
    assert budget["remaining_tokens"] == 0
    [commit] = [e.event for e in two.events(sid) if e.type == "BudgetCommitted"]
    assert (commit.tokens, commit.overrun_tokens) == (used, used - reserved)
    for api in two.apis:  # every orchestrator refuses until the limit is raised
        denied = chat(two, key, sid, api=api, messages=[{"role": "user", "content": "x"}])
        assert denied.status_code == 402, denied.text
        assert f"limit reached: {used} of 100 tokens committed" in denied.json()["detail"]
    assert httpx.put(f"{two.api}/v1/tenants/{tenant}/budget", headers=two.admin,
                     json={"limit_tokens": used + 1000}).status_code == 200
    assert chat(two, key, sid).status_code == 200
    raised = httpx.get(f"{two.api}/v1/sessions/{sid}/budget", headers=key).json()["tenant"]
    assert (raised["limit_tokens"], raised["committed_tokens"]) == (used + 1000, used + USED_PER_CALL)


def test_a_session_closed_on_one_orchestrator_refuses_calls_on_every_other(two: LLMCluster) -> None:
    """Once a close has answered through one orchestrator, a call through any other is
    refused (409; another tenant's id stays a 404): however each one knows its sessions,
    none may serve a session that is closed."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    key = two.tenant_key(tenant)
    other_key = two.tenant_key(f"t{uuid.uuid4().hex[:8]}")
    sid = two.session(key, budget={"limit_usd": 5})

    def call(api: str, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{api}/v1/chat/completions", headers={**headers, "X-Nexus-Session": sid},
                          json={"model": "default", "messages": PROMPT, "max_tokens": 4})

    first, second = two.apis
    for _ in range(2):  # each orchestrator has the open session in memory now
        assert call(first, key).status_code == 200 and call(second, key).status_code == 200
    assert call(second, other_key).status_code == 404  # another tenant's, cached or not
    closed = httpx.post(f"{first}/v1/sessions/{sid}/close", headers=key, json={})
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    for api in (second, first):
        refused = call(api, key)
        assert refused.status_code == 409 and refused.json()["type"].endswith("session-closed"), \
            refused.text
        assert call(api, other_key).status_code == 404


def test_a_close_committed_anywhere_refuses_the_next_call_however_the_session_was_known(
        two: LLMCluster) -> None:
    """The call path serves a session it has seen open from memory, so its admission
    requires the session stream unchanged: a close committed by any writer (here straight
    into the event store: no orchestrator is told) refuses the next call on every
    orchestrator, whether the admission reserves a budget or only records a policy
    decision (no call slips through)."""
    key = two.tenant_key(f"t{uuid.uuid4().hex[:8]}")
    for body in ({"budget": {"limit_usd": 5}}, {"policy_rules": {"max_tokens_per_call": 64}}):
        sid = two.session(key, **body)

        def call(api: str, sid: str = sid) -> httpx.Response:
            return httpx.post(f"{api}/v1/chat/completions", headers={**key, "X-Nexus-Session": sid},
                              json={"model": "default", "messages": PROMPT, "max_tokens": 4})

        for api in two.apis:
            assert call(api).status_code == 200  # each has seen it open now

        async def close(sid: str = sid) -> None:
            pool = await create_pool(two.database_url, max_size=1)
            try:
                await EventStore(pool).append(session_stream(sid), [SessionClosed(
                    session_id=sid, reason="closed elsewhere")], expected_version=1)
            finally:
                await pool.close()

        asyncio.run(close())
        for api in two.apis:
            refused = call(api)
            assert refused.status_code == 409 and refused.json()["type"].endswith("session-closed"), \
                refused.text
