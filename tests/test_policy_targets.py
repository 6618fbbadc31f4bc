"""Policies through the real services: every target a call can reach is evaluated, and
user-written patterns cannot stall the orchestrator (issue #9, sections 2 and 6).

The platform is tests/llm_cluster.py: route `default` is `primary/fake-small` (hosted)
then `backup/fake-large` (hosted); `local-first` is `local/fake-small` (not hosted, an
Ollama API on the backup fake) then `primary/fake-small`.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("policy-targets"),
                                new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


def chat(llm: LLMCluster, key, sid: str, timeout: float = 30, **body) -> httpx.Response:
    payload = {"model": "default", "messages": PROMPT, "max_tokens": 4, **body}
    return httpx.post(f"{llm.api}/v1/chat/completions", headers={**key, "X-Nexus-Session": sid},
                      json=payload, timeout=timeout)


def of_type(llm: LLMCluster, sid: str, kind: str) -> list:
    return [e.event for e in llm.events(sid) if e.type == kind]


def test_a_fallback_to_a_denied_provider_never_happens(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    # without the rule, a failing first target falls back to the backup provider ...
    open_sid = llm.session(key, policy_rules={})
    before = llm.backup.stats.count("/v1/messages")
    llm.primary.script({"status": 500}, {"status": 500})
    assert chat(llm, key, open_sid).status_code == 200
    assert llm.backup.stats.count("/v1/messages") == before + 1

    # ... with backup denied it is dropped from the chain before the call
    sid = llm.session(key, policy_rules={"providers_deny": ["backup"]})
    before = llm.backup.stats.count("/v1/messages")
    llm.primary.script({"status": 500}, {"status": 500})
    failed = chat(llm, key, sid)
    assert failed.status_code == 502, failed.text
    assert llm.primary.stats.script_pending == 0  # both attempts reached the first target
    assert llm.backup.stats.count("/v1/messages") == before  # the denied one: never
    [evaluated] = of_type(llm, sid, "PolicyEvaluated")
    assert (evaluated.allowed, evaluated.rule) == (True, "default.allow_chat")
    assert evaluated.targets == ("primary/fake-small",)
    [dropped] = evaluated.dropped
    assert (dropped.target, dropped.rule, dropped.reason) == (
        "backup/fake-large", "providers.deny", "provider 'backup' is denied by pattern 'backup'")
    [started] = of_type(llm, sid, "LLMCallStarted")
    assert started.targets == ("primary/fake-small",)
    assert {f.target for f in of_type(llm, sid, "LLMCallFailed")} == {"primary/fake-small"}

    # a model rule on the target's own model drops it the same way
    by_model = llm.session(key, policy_rules={"models_deny": ["fake-large"]})
    assert chat(llm, key, by_model).status_code == 200
    [evaluated] = of_type(llm, by_model, "PolicyEvaluated")
    assert [(d.target, d.rule) for d in evaluated.dropped] == [("backup/fake-large", "models.deny")]


def test_a_route_whose_every_target_is_denied_is_a_403_naming_the_rule(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    sid = llm.session(key, policy_rules={"providers_deny": ["primary"],
                                         "providers_allow": ["primary", "local"]})
    before = (llm.primary.stats.total, llm.backup.stats.total)
    denied = chat(llm, key, sid)
    assert denied.status_code == 403, denied.text
    problem = denied.json()
    assert problem["rule"] == "providers.deny" and problem["type"].endswith("/policy-denied")
    assert problem["detail"] == (
        "no target of 'default' is allowed: primary/fake-small: provider 'primary' is denied "
        "by pattern 'primary'; backup/fake-large: provider 'backup' is not allowed: it matches "
        "none of 'primary', 'local'")
    [evaluated] = of_type(llm, sid, "PolicyEvaluated")
    assert (evaluated.allowed, evaluated.rule, evaluated.reason) == (
        False, "providers.deny", problem["detail"])
    assert evaluated.targets == ()
    assert [(d.target, d.rule) for d in evaluated.dropped] == [
        ("primary/fake-small", "providers.deny"), ("backup/fake-large", "providers.allow")]
    assert not [e for e in llm.events(sid) if e.type.startswith(("LLMCall", "Budget"))]
    assert (llm.primary.stats.total, llm.backup.stats.total) == before


def test_redaction_follows_each_targets_hosted_flag(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    sid = llm.session(key, policy_rules={})
    text = "write to jane.doe@example.com about card 4111 1111 1111 1111"
    asked = {"model": "local-first", "messages": [{"role": "user", "content": text}]}
    assert chat(llm, key, sid, **asked).status_code == 200  # the local target answers
    assert llm.backup.stats.last_body["messages"][-1]["content"] == text  # not hosted: as written

    llm.backup.script({"status": 500}, {"status": 500})  # local fails: the hosted one answers
    assert chat(llm, key, sid, **asked).status_code == 200
    sent = llm.primary.stats.last_body["messages"][-1]["content"]
    assert "jane.doe@example.com" not in sent and "4111 1111" not in sent
    assert "[REDACTED:email]" in sent and "[REDACTED:card]" in sent
    evaluated = of_type(llm, sid, "PolicyEvaluated")
    assert [e.targets for e in evaluated] == [("local/fake-small", "primary/fake-small")] * 2


def test_an_evil_pattern_on_a_big_message_blocks_no_other_request(llm: LLMCluster) -> None:
    """Patterns that backtrack exponentially (`(a|aa)*b` on 34 "a"s took 3.95 s with a
    backtracking engine, on the event loop) and one that defeats RE2's DFA, on a message of about 600 KB,
    while `/health` is polled back to back: calls and health checks take about what
    they take with a trivial pattern (measured first, in this test; generous slack)."""
    key = llm.tenant_key()
    rng = random.Random(3)
    # a run of "a"s, then random a/b text (the part that defeats RE2's DFA); no "c"
    # anywhere, so the evil patterns scan it all; every session's last pattern, "!",
    # matches: each call ends in the same 403
    text = "a" * 300_000 + "!" + "".join(rng.choice("ab") for _ in range(300_000))
    trivial = llm.session(key, policy_rules={"content": {"deny_input": ["no such text", "!"]}})
    evil = llm.session(key, policy_rules={"content": {"deny_input": [
        r"(a|aa)*c", r"(.*a){20}c", r"(a|a)*!c", r"(a|b)*a(a|b){25}c", "!"]}})

    async def phase(sid: str, health_timeout: float) -> tuple[list[float], list[float]]:
        calls: list[float] = []
        health: list[float] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=120) as http:
            async def call_all() -> None:
                try:
                    for _ in range(3):
                        started = loop.time()
                        resp = await http.post(
                            f"{llm.api}/v1/chat/completions",
                            headers={**key, "X-Nexus-Session": sid},
                            json={"model": "default",  # no max_tokens: no context check first
                                  "messages": [{"role": "user", "content": text}]})
                        calls.append(loop.time() - started)
                        assert resp.status_code == 403, resp.text
                        assert resp.json()["rule"].startswith("content.input.deny[")
                finally:
                    done.set()

            async def poll_health() -> None:
                while not done.is_set():
                    started = loop.time()
                    resp = await http.get(f"{llm.api}/health", timeout=health_timeout)
                    assert resp.status_code == 200
                    health.append(loop.time() - started)

            await asyncio.gather(call_all(), poll_health())
        return calls, health

    base_calls, base_health = asyncio.run(phase(trivial, health_timeout=60))
    # generous: ten times the slowest baseline call or health check; a stalled event
    # loop (exponential backtracking) blows through it by orders of magnitude
    bound = 10 * max(base_calls + base_health)
    calls, health = asyncio.run(phase(evil, health_timeout=bound))
    assert max(health) <= bound, (max(health), max(base_health), bound)
    # the evil calls themselves are linear too (RE2's NFA, which the DFA-defeating
    # pattern forces, is slower per byte than its DFA: a wider margin)
    assert max(calls) <= 100 * max(base_calls), (calls, base_calls)
    assert len(health) >= 3  # health checks did run while the big calls were evaluated
    denials = of_type(llm, evil, "PolicyEvaluated")
    assert [d.rule for d in denials] == ["content.input.deny[4]"] * 3


@pytest.mark.parametrize(("rules", "field"), [
    ({"content": {"deny_input": ["ok", "(?<=a)b"]}}, "policy_rules.content.deny_input[1]"),
    ({"content": {"deny_output": [r"(a)\1"]}}, "policy_rules.content.deny_output[0]"),
    ({"providers_deny": ["[z-a]*"]}, "policy_rules.providers_deny[0]"),
])
def test_a_pattern_the_linear_time_engine_cannot_run_is_a_400_naming_the_field(
        llm: LLMCluster, rules, field) -> None:
    resp = httpx.post(f"{llm.api}/v1/sessions", headers=llm.tenant_key(),
                      json={"policy_rules": rules})
    assert resp.status_code == 400, resp.text
    problem = resp.json()
    assert problem["type"].endswith("/validation") and field in problem["detail"]
    assert [e["field"] for e in problem["errors"]] == [field]
