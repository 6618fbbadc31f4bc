"""`Idempotency-Key`: a retried POST never spends twice, creates twice or appends twice.

Real NATS, Postgres and service processes; the upstream is the fake hosted API, which
counts the generations it ran.
"""

from __future__ import annotations

import threading
import uuid

import httpx
import openai
import pytest

from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import wait_until

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("idem"), new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def impatient_api(llm: LLMCluster) -> str:
    """A second orchestrator (same NATS and Postgres) that does not wait for a running first."""
    env = dict(llm.env)
    llm.env["NEXUS_IDEMPOTENCY_WAIT_S"] = "0"
    try:
        return llm.start_orchestrator()
    finally:
        llm.env.clear()
        llm.env.update(env)


@pytest.fixture
def key(llm: LLMCluster) -> dict[str, str]:
    llm.primary.reset()
    llm.backup.reset()
    return llm.tenant_key()


def generations(llm: LLMCluster) -> int:
    return llm.primary.stats.count(CHAT) + llm.backup.stats.count(CHAT)


def conversation_after_marker(llm: LLMCluster, key: dict[str, str], session: str) -> list[dict]:
    """The session's messages once a later, keyless message is in the read model (so
    everything before it is too): positive evidence before counting."""
    marker = httpx.post(f"{llm.api}/v1/sessions/{session}/messages", headers=key, timeout=30,
                        json={"model": "default", "content": "marker", "max_tokens": 2})
    assert marker.status_code == 200, marker.text
    return wait_until(lambda: (lambda m: m if m and m[-2]["content"] == "marker" else None)(
        httpx.get(f"{llm.api}/v1/sessions/{session}/messages", headers=key).json()["messages"]),
        what="the marker message")


def budget(llm: LLMCluster, key: dict[str, str], session: str) -> dict:
    return httpx.get(f"{llm.api}/v1/sessions/{session}/budget", headers=key).json()["session"]


def test_chat_completion_retry_replays_the_first_answer(llm: LLMCluster, key) -> None:
    session = llm.session(key, budget={"limit_usd": 5})
    headers = {**key, "X-Nexus-Session": session, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "count for me"}],
            "max_tokens": 5}
    first = httpx.post(f"{llm.api}{CHAT}", headers=headers, json=body, timeout=30)
    second = httpx.post(f"{llm.api}{CHAT}", headers=headers, json=body, timeout=30)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.content == first.content  # the same answer, id and all
    assert second.headers["x-nexus-call-id"] == first.headers["x-nexus-call-id"]
    assert second.headers["x-nexus-session"] == session
    assert second.headers["idempotent-replayed"] == "true"
    assert generations(llm) == 1
    usage = first.json()["usage"]
    assert budget(llm, key, session)["committed_tokens"] == usage["total_tokens"]
    messages = conversation_after_marker(llm, key, session)
    assert [m["content"] for m in messages].count("count for me") == 1
    # the same key with another body (or for another session) is a 422
    other = httpx.post(f"{llm.api}{CHAT}", headers=headers, timeout=30,
                       json={**body, "max_tokens": 6})
    assert other.status_code == 422 and other.headers["content-type"].startswith(PROBLEM)
    assert "Idempotency-Key" in other.json()["detail"]
    elsewhere = httpx.post(f"{llm.api}{CHAT}", json=body, timeout=30,
                           headers={**headers, "X-Nexus-Session": llm.session(key)})
    assert elsewhere.status_code == 422


def test_streamed_answer_is_replayed_as_recorded(llm: LLMCluster, key) -> None:
    headers = {**key, "Idempotency-Key": f"s-{uuid.uuid4()}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "stream it"}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}

    def call() -> httpx.Response:
        with httpx.stream("POST", f"{llm.api}{CHAT}", headers=headers, json=body,
                          timeout=30) as resp:
            resp.read()
            return resp

    first, second = call(), call()
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"].startswith("text/event-stream")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert b'"completion_tokens":4' in first.content and first.content.endswith(b"data: [DONE]\n\n")
    assert second.content == first.content
    assert second.headers["x-nexus-call-id"] == first.headers["x-nexus-call-id"]
    assert generations(llm) == 1


def test_concurrent_retries_run_one_generation(llm: LLMCluster, key) -> None:
    session = llm.session(key, budget={"limit_usd": 5})
    headers = {**key, "Idempotency-Key": f"c-{uuid.uuid4()}"}
    body = {"model": "default", "content": "slow one", "max_tokens": 6}
    llm.primary.script({"token_delay_ms": 300})  # the first generation takes a while
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        results[name] = httpx.post(f"{llm.api}/v1/sessions/{session}/messages", headers=headers,
                                   json=body, timeout=60)

    first = threading.Thread(target=post, args=("first",))
    first.start()
    llm.primary.wait_for(lambda s: s.count(CHAT) >= 1, what="the first generation running")
    post("retry")  # while the first still runs: waits for it
    first.join(60)
    assert results["first"].status_code == results["retry"].status_code == 200, results
    assert results["retry"].content == results["first"].content
    assert generations(llm) == 1
    reply = results["first"].json()["message"]
    assert budget(llm, key, session)["committed_tokens"] == \
        reply["input_tokens"] + reply["output_tokens"]
    messages = conversation_after_marker(llm, key, session)
    assert [m["content"] for m in messages].count("slow one") == 1
    assert len(messages) == 4  # one exchange, then the marker's


def test_retry_elsewhere_while_running_gets_409_then_the_answer(llm: LLMCluster, key,
                                                                 impatient_api: str) -> None:
    headers = {**key, "Idempotency-Key": f"r-{uuid.uuid4()}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "busy"}],
            "max_tokens": 6}
    llm.primary.script({"token_delay_ms": 400})
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: results.update(first=httpx.post(
        f"{llm.api}{CHAT}", headers=headers, json=body, timeout=60)))
    first.start()
    llm.primary.wait_for(lambda s: s.count(CHAT) >= 1, what="the first generation running")
    busy = httpx.post(f"{impatient_api}{CHAT}", headers=headers, json=body, timeout=30)
    first.join(60)
    assert busy.status_code == 409 and busy.headers["content-type"].startswith(PROBLEM)
    assert int(busy.headers["retry-after"]) >= 1
    assert results["first"].status_code == 200
    replay = httpx.post(f"{impatient_api}{CHAT}", headers=headers, json=body, timeout=30)
    assert replay.status_code == 200 and replay.content == results["first"].content
    assert generations(llm) == 1


def test_a_cut_off_stream_lets_the_retry_run(llm: LLMCluster, key) -> None:
    headers = {**key, "Idempotency-Key": f"x-{uuid.uuid4()}"}
    body = {"model": "default", "messages": [{"role": "user", "content": "cut"}],
            "max_tokens": 8, "stream": True}
    llm.primary.script({"token_delay_ms": 300})
    with httpx.stream("POST", f"{llm.api}{CHAT}", headers=headers, json=body, timeout=30) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if '"content":"tok0"' in line:
                break  # the client goes away mid-answer
    llm.primary.wait_cancelled()
    retry = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(
        httpx.post(f"{llm.api}{CHAT}", headers=headers, json=body, timeout=30)),
        what="the retry to run")
    assert retry.content.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in retry.content
    assert generations(llm) == 2


def test_openai_sdk_with_an_explicit_idempotency_key(llm: LLMCluster, key) -> None:
    sdk = openai.OpenAI(base_url=f"{llm.api}/v1", api_key=key["Authorization"].split()[1],
                        max_retries=0, timeout=30)
    idem = {"Idempotency-Key": f"sdk-{uuid.uuid4()}"}
    args = {"model": "default", "messages": [{"role": "user", "content": "hi sdk"}], "max_tokens": 3}
    a = sdk.chat.completions.create(**args, extra_headers=idem)
    b = sdk.chat.completions.create(**args, extra_headers=idem)
    assert a.id == b.id and a.choices[0].message.content == b.choices[0].message.content
    assert generations(llm) == 1


def test_session_message_retry_appends_once(llm: LLMCluster, key) -> None:
    session = llm.session(key)
    headers = {**key, "Idempotency-Key": f"m-{uuid.uuid4()}"}
    body = {"model": "default", "content": "only once", "max_tokens": 3}
    url = f"{llm.api}/v1/sessions/{session}/messages"
    first = httpx.post(url, headers=headers, json=body, timeout=30)
    second = httpx.post(url, headers=headers, json=body, timeout=30)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    streamed = httpx.post(url, headers=headers, json={**body, "stream": True}, timeout=30)
    assert streamed.status_code == 422  # another body under the same key
    assert generations(llm) == 1
    messages = conversation_after_marker(llm, key, session)
    assert [m["content"] for m in messages].count("only once") == 1


def test_session_key_reused_with_a_budget_is_refused(llm: LLMCluster, key) -> None:
    headers = {**key, "Idempotency-Key": f"b-{uuid.uuid4()}"}
    first = httpx.post(f"{llm.api}/v1/sessions", headers=headers, json={})
    assert first.status_code == 201
    session = first.json()["session_id"]
    again = httpx.post(f"{llm.api}/v1/sessions", headers=headers, json={"budget": {"limit_usd": 1}})
    assert again.status_code == 422 and again.headers["content-type"].startswith(PROBLEM)
    assert again.json()["errors"][0]["field"] == "Idempotency-Key"
    assert budget(llm, key, session) is None  # no budget opened for the existing session
    # and the other way round: a budget first, then none
    headers = {**key, "Idempotency-Key": f"b-{uuid.uuid4()}"}
    with_budget = {"budget": {"limit_usd": 1}}
    assert httpx.post(f"{llm.api}/v1/sessions", headers=headers, json=with_budget).status_code == 201
    assert httpx.post(f"{llm.api}/v1/sessions", headers=headers, json=with_budget).status_code == 201
    assert httpx.post(f"{llm.api}/v1/sessions", headers=headers, json={}).status_code == 422


def test_key_creation_retry_issues_the_same_key_once(llm: LLMCluster, key) -> None:
    headers = {**key, "Idempotency-Key": f"key-{uuid.uuid4()}"}
    body = {"name": "ci-bot", "role": "member"}
    first = httpx.post(f"{llm.api}/v1/keys", headers=headers, json=body)
    second = httpx.post(f"{llm.api}/v1/keys", headers=headers, json=body)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()  # the same key, shown again to the same caller
    issued = {"Authorization": f"Bearer {first.json()['key']}"}
    assert httpx.get(f"{llm.api}/v1/sessions", headers=issued).status_code == 200
    listed = httpx.get(f"{llm.api}/v1/keys", headers=key).json()["keys"]
    assert sum(k["name"] == "ci-bot" for k in listed) == 1
    other = httpx.post(f"{llm.api}/v1/keys", headers=headers, json={**body, "name": "other"})
    assert other.status_code == 422
    # another caller cannot use the key to obtain the secret
    admin = {**llm.admin, "Idempotency-Key": headers["Idempotency-Key"]}
    tenant = httpx.get(f"{llm.api}/v1/keys", headers=key).json()["keys"][0]["tenant"]
    stolen = httpx.post(f"{llm.api}/v1/keys", headers=admin, json={**body, "tenant": tenant})
    assert stolen.status_code == 422 and first.json()["key"] not in stolen.text


def test_policy_and_tenant_budget_retries_apply_once(llm: LLMCluster, key) -> None:
    headers = {**key, "Idempotency-Key": f"p-{uuid.uuid4()}"}
    body = {"name": "strict", "rules": {"max_tokens_per_call": 100}}
    first = httpx.post(f"{llm.api}/v1/policies", headers=headers, json=body)
    second = httpx.post(f"{llm.api}/v1/policies", headers=headers, json=body)
    assert first.status_code == second.status_code == 201, first.text
    assert first.json() == second.json() and first.json()["version"] == 1
    fresh = httpx.post(f"{llm.api}/v1/policies", headers=key, json=body)
    assert fresh.json()["version"] == 2  # only the keyless call defined a new version
    assert httpx.post(f"{llm.api}/v1/policies", headers=headers,
                      json={**body, "name": "lax"}).status_code == 422
    tenant = f"t{uuid.uuid4().hex[:8]}"
    put = {**llm.admin, "Idempotency-Key": f"tb-{uuid.uuid4()}"}
    url = f"{llm.api}/v1/tenants/{tenant}/budget"
    assert httpx.put(url, headers=put, json={"limit_usd": 10}).status_code == 200
    assert httpx.put(url, headers=put, json={"limit_usd": 10}).json()["limit_usd"] == 10
    assert httpx.put(url, headers=put, json={"limit_usd": 20}).status_code == 422


def test_openapi_declares_the_header_and_its_problems(llm: LLMCluster) -> None:
    doc = httpx.get(f"{llm.api}/schema/openapi.json").json()
    for path, method in ((CHAT, "post"), ("/v1/sessions/{session_id}/messages", "post"),
                         ("/v1/policies", "post"), ("/v1/tenants/{tenant}/budget", "put")):
        op = doc["paths"][path][method]
        assert "Idempotency-Key" in [p["name"] for p in op["parameters"]], path
        assert {"409", "422"} <= set(op["responses"]), path
    for path in ("/v1/sessions", "/v1/keys"):
        op = doc["paths"][path]["post"]
        assert "Idempotency-Key" in [p["name"] for p in op["parameters"]], path
        assert "422" in op["responses"], path
