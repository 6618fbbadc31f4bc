"""Skills and adaptive routing end to end: real NATS, Postgres, orchestrator and provider
processes in front of fake upstreams (tests/llm_cluster.py), the real embedding model.

Models (tests/llm_cluster.py): `primary/fake-small` (1/2 USD per Mtok), `backup/fake-large`
(3/6), and the route `default` = primary/fake-small -> backup/fake-large."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.orchestrator.read_models import PROJECTIONS
from shared.domain.skills import LlmRouting, SkillSpec, skill_problems
from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import wait_until

SMALL, LARGE = "primary/fake-small", "backup/fake-large"
SKILL = {"name": "qa", "description": "Answering factual questions about history and science.",
         "examples": ["Who discovered penicillin?", "When did the Roman empire fall?"],
         "llm_routing": {"preferred": LARGE, "fallback": [SMALL], "cost_weight": 0.3,
                         "performance_weight": 0.7}}


def test_skill_validation_names_each_field() -> None:
    spec = SkillSpec(name="Bad Name", description=" ", llm_routing=LlmRouting(
        preferred="nope", fallback=("a", "a"), cost_weight=0.0, performance_weight=0.0,
        allowed=("a",)))
    fields = {e["field"] for e in skill_problems(spec, {"a"})}
    assert {"name", "description", "llm_routing/performance_weight", "llm_routing/fallback",
            "llm_routing/preferred"} <= fields
    ok = SkillSpec(name="ok", description="d", llm_routing=LlmRouting(preferred="a"))
    assert skill_problems(ok, {"a"}) == [] and ok.models == ("a",)


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("skills"), new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


def chat(llm: LLMCluster, key, model: str, text: str, session: str | None = None) -> httpx.Response:
    headers = {**key, **({"X-Nexus-Session": session} if session else {})}
    return httpx.post(f"{llm.api}/v1/chat/completions", headers=headers, timeout=60, json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}]})


def test_skills_are_defined_checked_and_listed(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    bad = httpx.post(f"{llm.api}/v1/skills", headers=key, json={
        **SKILL, "llm_routing": {**SKILL["llm_routing"], "fallback": ["no/such-model"]}})
    assert bad.status_code == 422, bad.text
    assert bad.json()["errors"][0]["field"] == "llm_routing/fallback/0"
    weights = httpx.post(f"{llm.api}/v1/skills", headers=key, json={
        **SKILL, "llm_routing": {**SKILL["llm_routing"], "cost_weight": 1.5}})
    assert weights.status_code == 400 and "cost_weight" in weights.text
    made = httpx.post(f"{llm.api}/v1/skills", headers=key, json=SKILL)
    assert made.status_code == 201 and made.json()["version"] == 1, made.text
    names = {s["name"]: s["source"] for s in
             httpx.get(f"{llm.api}/v1/skills", headers=key).json()["skills"]}
    assert names["qa"] == "tenant" and names["coding"] == "system"
    other = llm.tenant_key()
    assert httpx.get(f"{llm.api}/v1/skills/qa", headers=other).status_code == 404


def test_routed_calls_learn_explain_and_respect_the_policy(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    assert httpx.post(f"{llm.api}/v1/skills", headers=key, json=SKILL).status_code == 201
    sid = llm.session(key, budget={"limit_usd": 5})
    resp = chat(llm, key, "skill:qa", "Who discovered penicillin?", sid)
    assert resp.status_code == 200, resp.text
    call_id = resp.headers["X-Nexus-Call-Id"]
    explain = httpx.get(f"{llm.api}/v1/calls/{call_id}/explain", headers=key).json()
    assert "routing" in explain, explain
    routing = explain["routing"]
    assert routing["skill"] == "qa" and routing["matched_by"] == "explicit"
    assert {c["model"] for c in routing["candidates"]} == {SMALL, LARGE}
    assert routing["pick"] in (SMALL, LARGE) and routing["reason"]
    assert explain["outcome"]["status"] == "completed"
    [budget] = explain["budget"]  # admitted from a slice of the budget (leases, the default)
    assert budget["lease"] and 0 < budget["committed_micro_usd"] <= 5_000_000, budget
    assert explain["plan"]["targets"][0] == routing["pick"]
    # feedback is learned for the call's cluster and model; twice is a conflict
    fb = httpx.post(f"{llm.api}/v1/calls/{call_id}/feedback", headers=key, json={"score": 0.9})
    assert fb.status_code == 200 and fb.json()["learned"] is True, fb.text
    assert httpx.post(f"{llm.api}/v1/calls/{call_id}/feedback", headers=key,
                      json={"score": 0.5}).status_code == 409
    assert httpx.post(f"{llm.api}/v1/calls/{call_id}/feedback", headers=key,
                      json={"score": 1.5}).status_code == 400
    # another tenant's call: not found, on feedback and explain alike
    other = llm.tenant_key()
    for method, path, body in (("post", "feedback", {"score": 1}), ("get", "explain", None)):
        r = httpx.request(method, f"{llm.api}/v1/calls/{call_id}/{path}", headers=other, json=body)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem")
    # a policy denying the large model: it is never picked, and says why
    denied = llm.session(key, policy_rules={"models_deny": [LARGE]})
    for _ in range(6):
        r = chat(llm, key, "skill:qa", "When did the Roman empire fall?", denied)
        assert r.status_code == 200, r.text
        x = httpx.get(f"{llm.api}/v1/calls/{r.headers['X-Nexus-Call-Id']}/explain", headers=key).json()
        assert x["routing"]["pick"] == SMALL
        [large] = [c for c in x["routing"]["candidates"] if c["model"] == LARGE]
        assert large["excluded"] == "models.deny"


def test_auto_matches_a_skill_by_meaning(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    assert httpx.post(f"{llm.api}/v1/skills", headers=key, json={
        "name": "poems", "description": "Writing poems, haiku and verse.",
        "examples": ["Write a haiku about the sea.", "Write a short poem about autumn."],
        "llm_routing": {"preferred": SMALL}}).status_code == 201
    r = chat(llm, key, "auto", "Write a haiku about autumn leaves.")
    assert r.status_code == 200, r.text
    x = httpx.get(f"{llm.api}/v1/calls/{r.headers['X-Nexus-Call-Id']}/explain", headers=key).json()
    assert x["routing"]["skill"] == "poems" and x["routing"]["matched_by"] == "auto"
    assert x["routing"]["confidence"] >= 0.55
    unknown = chat(llm, key, "skill:nope", "hello")
    assert unknown.status_code == 400 and "nope" in unknown.text


def test_explain_shows_the_fallback_of_a_call(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    llm.primary.reset()
    llm.primary.script({"status": 500}, {"status": 500})
    r = chat(llm, key, "default", "hello")
    assert r.status_code == 200, r.text
    x = httpx.get(f"{llm.api}/v1/calls/{r.headers['X-Nexus-Call-Id']}/explain", headers=key).json()
    assert [a["target"] for a in x["attempts"]] == [SMALL, SMALL]
    assert x["attempts"][-1]["fallback"] == LARGE
    assert x["outcome"]["target"] == LARGE and x["outcome"]["fell_back"] is True
    assert x["plan"]["targets"] == [SMALL, LARGE]


def test_replay_reports_the_counterfactual_and_the_statistics_rebuild(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    assert httpx.post(f"{llm.api}/v1/skills", headers=key, json=SKILL).status_code == 201
    sid = llm.session(key)
    calls = []
    for i in range(6):
        r = chat(llm, key, "skill:qa", f"Who discovered the law number {i}?", sid)
        assert r.status_code == 200, r.text
        calls.append(r.headers["X-Nexus-Call-Id"])
        x = httpx.get(f"{llm.api}/v1/calls/{calls[-1]}/explain", headers=key).json()
        score = 0.9 if x["routing"]["pick"] == LARGE else 0.3
        assert httpx.post(f"{llm.api}/v1/calls/{calls[-1]}/feedback", headers=key,
                          json={"score": score}).status_code == 200
    # documented counterfactual: quality only -> everything to the model learned better
    # (LARGE: prior 0.75 and good scores); cost only -> everything to the cheaper SMALL
    best = httpx.post(f"{llm.api}/v1/replays", headers=key, timeout=60, json={
        "since": "1h", "cost_weight": 0.0, "performance_weight": 1.0}).json()
    assert best["summary"]["calls"] == 6
    assert {row["counterfactual"] for row in best["changed_calls"]} <= {LARGE}
    cheap = httpx.post(f"{llm.api}/v1/replays", headers=key, timeout=60, json={
        "since": "1h", "cost_weight": 1.0, "performance_weight": 0.0, "execute": 1,
        "grader": "default"}).json()
    assert {row["counterfactual"] for row in cheap["changed_calls"]} <= {SMALL}
    assert cheap["summary"]["projected_cost_micro_usd"] <= best["summary"]["projected_cost_micro_usd"]
    assert cheap["summary"]["projected_quality"] <= best["summary"]["projected_quality"]
    if cheap["changed_calls"]:
        [run] = cheap["executed"]
        assert run["model"] == SMALL and run["cost_micro_usd"] > 0, run
        # the grader was asked (the fake answers "tok0 tok1 ...": no score, and it says so)
        assert run["grader_call_id"] and "no score" in run["quality_error"], run
        assert run["quality"] is None and cheap["summary"]["executed_quality"] is None
    assert httpx.post(f"{llm.api}/v1/replays", headers=key, json={"since": "yesterday"}
                      ).status_code == 400

    async def rebuilt_equals_live() -> None:
        pool = await create_pool(llm.database_url, max_size=2)
        try:
            runner = ProjectionRunner(EventStore(pool), PROJECTIONS)
            await runner.wait_for(await EventStore(pool).head(), names=("routing_stats",), timeout=20)
            query = ("SELECT tenant, cluster, model, round(alpha::numeric, 9), round(beta::numeric, 9),"
                     " feedback_n, cost_n, round(cost_mean::numeric, 6), skill_counts,"
                     " round(sq::numeric, 9), round(cusum::numeric, 9), run_n, resets FROM routing_stats"
                     " ORDER BY 1, 2, 3")
            live = [tuple(r) for r in await pool.fetch(query)]
            calls_live = [tuple(r) for r in await pool.fetch("SELECT * FROM routed_calls ORDER BY 1")]
            await runner.rebuild("routing_stats")
            assert [tuple(r) for r in await pool.fetch(query)] == live
            assert [tuple(r) for r in await pool.fetch("SELECT * FROM routed_calls ORDER BY 1")] == calls_live
            assert any(r[5] for r in live)  # feedback was learned
        finally:
            await pool.close()

    asyncio.run(rebuilt_equals_live())


def test_the_plan_of_an_answered_call_rides_on_its_llm_call_started(llm: LLMCluster) -> None:
    """No `CallPlanned` append on the hot path: the plan is in `LLMCallStarted`."""
    key = llm.tenant_key()
    sid = llm.session(key)
    r = chat(llm, key, "default", "hello", sid)
    assert r.status_code == 200, r.text
    call_id = r.headers["X-Nexus-Call-Id"]
    x = httpx.get(f"{llm.api}/v1/calls/{call_id}/explain", headers=key).json()
    assert x["plan"]["targets"][0] == SMALL
    types = [e.type for e in llm.events(sid) if getattr(e.event, "call_id", None) == call_id]
    assert "LLMCallStarted" in types and "CallPlanned" not in types, types


POET = """---
name: poet
description: Writes verse.
skills: [poems]
---
You write short poems."""


def test_a_run_naming_no_agent_gets_the_agent_whose_skills_fit(llm: LLMCluster) -> None:
    key = llm.tenant_key()
    assert httpx.post(f"{llm.api}/v1/skills", headers=key, json={
        "name": "poems", "description": "Writing poems, haiku and verse.",
        "examples": ["Write a haiku about the sea.", "Write a short poem about autumn."],
        "llm_routing": {"preferred": SMALL}}).status_code == 201
    bad = httpx.post(f"{llm.api}/v1/agents", headers=key,
                     json={"markdown": POET.replace("[poems]", "['not a name!']")})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "skills", bad.text
    made = httpx.post(f"{llm.api}/v1/agents", headers=key, json={"markdown": POET})
    assert made.status_code == 201 and made.json()["skills"] == ["poems"], made.text
    sid = llm.session(key)
    picks = {}
    for agent, task in ((None, "Write a haiku about the first snow."),
                        ("auto", "Fix the failing unit test in my Python module and explain the bug.")):
        resp = httpx.post(f"{llm.api}/v1/sessions/{sid}/runs", headers=key, timeout=60, json={
            "input": task, **({"agent": agent} if agent else {})})
        assert resp.status_code == 202, resp.text
        picks[agent] = resp.json()
    assert picks[None]["agent"] == "poet" and picks["auto"]["agent"] == "coder"  # system, `coding`
    run_id = picks[None]["run_id"]

    def linked() -> str | None:
        return next((e.event.call_id for e in llm.events(sid) if e.type == "RunLLMCallLinked"
                     and e.event.run_id == run_id), None)

    call_id = wait_until(linked, 60, 0.2, "the run's LLM call")

    def explained() -> dict | None:
        x = httpx.get(f"{llm.api}/v1/calls/{call_id}/explain", headers=key)
        return x.json() if x.status_code == 200 and x.json().get("run") else None

    x = wait_until(explained, 60, 0.2, "the run's call to be explained")
    sel = x["run"]["agent_selection"]
    assert x["run"]["agent"] == "poet" and sel["skill"] == "poems" and sel["requested"] == ""
    assert 0 < sel["confidence"] <= 1 and sel["candidates"][0]["agent"] == "poet"
    assert {c["agent"] for c in sel["candidates"]} >= {"poet", "coder", "research", "data-analysis"}
