"""The LLM path end to end: client -> orchestrator -> NATS -> provider -> upstream.

Upstreams are fakes of hosted APIs (real HTTP, real OpenAI / Anthropic / Ollama wire
protocols, scripted faults); everything else is real: NATS, Postgres, the services as
processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from shared.infra.eventstore.store import create_pool
from tests.conftest import new_database
from tests.fake_upstream import reply_text
from tests.llm_cluster import LLMCluster, start_llm_cluster
from tests.support import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("llm"), new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def key(llm: LLMCluster) -> dict[str, str]:
    llm.primary.reset()
    llm.backup.reset()
    return llm.tenant_key()


def client(llm: LLMCluster, key: dict[str, str], session: str | None = None) -> openai.OpenAI:
    headers = {"X-Nexus-Session": session} if session else None
    return openai.OpenAI(base_url=f"{llm.api}/v1", api_key=key["Authorization"].split()[1],
                         default_headers=headers, max_retries=0, timeout=30)


def types(llm: LLMCluster, session_id: str) -> list[str]:
    return [e.type for e in llm.events(session_id)]


def test_openai_sdk_non_streaming(llm: LLMCluster, key) -> None:
    sdk = client(llm, key)
    reply = sdk.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
    completion = reply.parse()
    assert completion.choices[0].message.content == reply_text(5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == 2 + 3  # the fake's stated count
    session = reply.headers["x-nexus-session"]
    messages = httpx.get(f"{llm.api}/v1/sessions/{session}/messages", headers=key).json()["messages"]
    assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
    assert messages[-1]["content"] == reply_text(5) and messages[-1]["provider"] == "primary"
    assert messages[-1]["output_tokens"] == 5 and messages[-1]["cost_usd"] == pytest.approx(15e-6)
    # the upstream got the provider's key, never the client's
    assert llm.primary.stats.last_headers["authorization"].endswith("primary-0123456789abcdefghij")


def test_openai_sdk_streaming_with_usage(llm: LLMCluster, key) -> None:
    sdk = client(llm, key)
    stream = sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "stream please"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply_text(6)
    assert finish == "length" and usage.completion_tokens == 6


def test_a_stream_ends_only_after_its_cost_and_answer_are_recorded(llm: LLMCluster, key) -> None:
    """`[DONE]` is an acknowledgement: when the client reads it, the commit and the
    conversation are already events, so a crash right after it loses nothing."""
    sid = llm.session(key, budget={"limit_tokens": 10_000})
    with httpx.stream("POST", f"{llm.api}/v1/chat/completions", timeout=30,
                      headers={**key, "X-Nexus-Session": sid},
                      json={"model": "default", "stream": True, "max_tokens": 4,
                            "messages": [{"role": "user", "content": "acknowledge me"}]}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                recorded = types(llm, sid)  # read while the response is still open
                break
        else:
            raise AssertionError("no [DONE]")
    assert recorded.count("BudgetCommitted") == 1 and recorded.count("MessageAppended") == 2


def test_models_lists_routes_and_targets(llm: LLMCluster, key) -> None:
    ids = {m.id for m in client(llm, key).models.list()}
    assert {"default", "ollama-chat", "primary/fake-small", "backup/fake-large"} <= ids


def test_session_messages_stream_as_sse_and_are_kept(llm: LLMCluster, key) -> None:
    sid = llm.session(key)
    with httpx.stream("POST", f"{llm.api}/v1/sessions/{sid}/messages", headers=key,
                      json={"content": "first turn", "stream": True, "max_tokens": 4}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = list(resp.iter_lines())
    events = [line for line in lines if line.startswith("event:")]
    # tokens that arrive together travel as one frame (issue 16): count text, not events
    assert events[0] == "event: token" and events[-1] == "event: done"
    assert set(events[:-1]) == {"event: token"}
    tokens = [json.loads(lines[i + 1].removeprefix("data:"))["content"]
              for i, line in enumerate(lines) if line == "event: token"]
    assert "".join(tokens) == reply_text(4)
    second = httpx.post(f"{llm.api}/v1/sessions/{sid}/messages", headers=key,
                        json={"content": "second turn", "max_tokens": 3}).json()
    assert second["message"]["content"] == reply_text(3)
    # the second call saw the conversation so far
    sent = llm.primary.stats.last_body["messages"]
    assert [m["content"] for m in sent] == ["first turn", reply_text(4), "second turn"]
    kept = httpx.get(f"{llm.api}/v1/sessions/{sid}/messages", headers=key).json()["messages"]
    assert [(m["role"], m["content"]) for m in kept] == [
        ("user", "first turn"), ("assistant", reply_text(4)),
        ("user", "second turn"), ("assistant", reply_text(3))]
    assert all(m["model"] == "fake-small" for m in kept if m["role"] == "assistant")
    log = types(llm, sid)
    assert log.count("LLMCallStarted") == 2 and log.count("LLMCallCompleted") == 2


def test_ollama_route(llm: LLMCluster, key) -> None:
    reply = client(llm, key).chat.completions.create(
        model="ollama-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content == reply_text(3)
    assert llm.backup.stats.count("/api/chat") == 1


@pytest.mark.parametrize("fault", [
    {"status": 500}, {"status": 429, "retry_after": 0}, {"hang": True},
    {"drop_before_first_token": True},
], ids=["500", "429", "timeout", "drop-before-first-token"])
def test_fallback_before_the_first_token(llm: LLMCluster, key, fault) -> None:
    llm.primary.script(fault, fault)  # both attempts on the primary fail
    sid = llm.session(key)
    reply = client(llm, key, sid).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    assert text == reply_text(4)  # from the backup (Anthropic protocol)
    failed = [e.event for e in llm.events(sid) if e.type == "LLMCallFailed"]
    assert [f.target for f in failed] == ["primary/fake-small"] * 2
    assert failed[0].fallback is None and failed[1].fallback == "backup/fake-large"
    [done] = [e.event for e in llm.events(sid) if e.type == "LLMCallCompleted"]
    assert done.provider == "backup" and done.attempts == 3


def test_retry_after_is_honoured_and_backoff_applied(llm: LLMCluster, key) -> None:
    """A retry on the same target waits: at least the upstream's Retry-After, else the
    exponential backoff with jitter (base 0.05s here, x0.5..1.5). The wait chosen is
    part of the failed attempt's event."""
    def call(sid: str) -> None:
        reply = client(llm, key, sid).chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content == reply_text(3)

    def attempts(sid: str) -> tuple[list, object]:
        events = llm.events(sid)
        [done] = [e.event for e in events if e.type == "LLMCallCompleted"]
        return [e.event for e in events if e.type == "LLMCallFailed"], done

    llm.primary.script({"status": 429, "retry_after": 1})
    call(limited := llm.session(key))
    [failed], done = attempts(limited)
    assert (failed.status, failed.fallback, failed.final) == (429, None, False)
    assert 1.0 <= failed.retry_in_s <= 30.0  # the upstream asked for a second
    assert (done.provider, done.attempts) == ("primary", 2)

    llm.primary.script({"status": 500})
    call(erred := llm.session(key))
    [failed], done = attempts(erred)
    assert failed.status == 500 and 0.025 <= failed.retry_in_s <= 0.075  # first backoff step
    assert (done.provider, done.attempts) == ("primary", 2)
    assert llm.primary.stats.count("/v1/chat/completions") == 4

    llm.primary.script({"status": 500}, {"status": 500})  # no retry left: fall back at once
    call(fell := llm.session(key))
    failed, done = attempts(fell)
    assert [f.retry_in_s is not None for f in failed] == [True, False]
    assert failed[1].fallback == "backup/fake-large" and done.provider == "backup"


def test_failure_after_the_first_token_ends_the_stream_cleanly(llm: LLMCluster, key) -> None:
    llm.primary.script({"drop_after_tokens": 2})
    sid = llm.session(key)
    with httpx.stream("POST", f"{llm.api}/v1/chat/completions", timeout=20,
                      headers={**key, "X-Nexus-Session": sid},
                      json={"model": "default", "stream": True, "max_tokens": 6,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][5:])["error"]
    assert error["code"] in ("StreamCut", "ConnectionError")  # cut mid-body
    assert [e.event.after_first_token for e in llm.events(sid) if e.type == "LLMCallFailed"] == [True]
    budget = httpx.get(f"{llm.api}/v1/sessions/{sid}/budget", headers=key).json()
    assert budget["session"] is None  # no budget here; with one it is released (test_budgets)


def test_client_disconnect_stops_the_upstream_generation(llm: LLMCluster, key) -> None:
    llm.primary.script({"token_delay_ms": 200})
    sid = llm.session(key)
    with httpx.stream("POST", f"{llm.api}/v1/chat/completions", timeout=20,
                      headers={**key, "X-Nexus-Session": sid},
                      json={"model": "default", "stream": True, "max_tokens": 50,
                            "messages": [{"role": "user", "content": "FAKE_TOKENS=50 go"}]}) as resp:
        for line in resp.iter_lines():
            if "tok1" in line:
                break  # leave after two tokens
    wait_until(lambda: llm.primary.stats.cancelled >= 1, 10, 0.1, "the upstream to see the cancel")
    wait_until(lambda: any(e.type == "LLMCallFailed" and e.event.error == "Cancelled"
                           for e in llm.events(sid)), 10, 0.1, "the cancellation event")


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ({"model": "default", "messages": []}, 400, "messages"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function"}]}, 400, "function"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
], ids=["unknown-model", "empty-messages", "absurd-max-tokens", "zero-max-tokens",
        "bad-tool-name", "tool-without-function", "bad-role", "n"])
def test_bad_requests_are_clear_4xx_without_event_pollution(llm: LLMCluster, key, body, status,
                                                            needle) -> None:
    sid = llm.session(key)
    before = types(llm, sid)
    resp = httpx.post(f"{llm.api}/v1/chat/completions", json=body,
                      headers={**key, "X-Nexus-Session": sid})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert needle in resp.json()["detail"]
    assert types(llm, sid) == before
    assert llm.primary.stats.count("/v1/chat/completions") == 0


def test_tool_definitions_pass_through(llm: LLMCluster, key) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    reply = client(llm, key).chat.completions.create(
        model="default", tools=tools, messages=[{"role": "user", "content": "CALL_TOOL please"}])
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert llm.primary.stats.last_body["tools"] == tools


def test_overload_beyond_the_queue_is_a_clear_429(llm: LLMCluster, key) -> None:
    """`tiny` takes one call at a time and queues none: while one streams, the others
    are refused at once with a 429 problem naming the overload (no hang, no 5xx)."""
    import concurrent.futures

    llm.primary.configure(token_delay_ms=200)
    try:
        def call(i: int) -> httpx.Response:
            return httpx.post(f"{llm.api}/v1/chat/completions", headers=key, timeout=60, json={
                "model": "tiny/fake-small", "max_tokens": 6,
                "messages": [{"role": "user", "content": f"x {i}"}]})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(call, range(4)))
    finally:
        llm.primary.configure(token_delay_ms=0)
    codes = sorted(r.status_code for r in replies)
    assert codes[0] == 200 and codes[-1] == 429 and set(codes) <= {200, 429}, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "Overloaded" in refused.json()["detail"]


def test_two_providers_share_the_queue_and_a_killed_one_fails_cleanly(llm: LLMCluster, key) -> None:
    """Kill one of two providers while streams run: its calls end with a clear error
    (within the stream's liveness timeout), the others complete; nothing hangs."""
    import concurrent.futures

    second = llm.start_provider()
    llm.primary.configure(token_delay_ms=150)
    try:
        def one(i: int) -> str:
            with httpx.stream("POST", f"{llm.api}/v1/chat/completions", headers=key, timeout=60,
                              json={"model": "primary/fake-small", "stream": True, "max_tokens": 30,
                                    "messages": [{"role": "user", "content": f"FAKE_TOKENS=30 {i}"}]}) as r:
                if r.status_code != 200:
                    return f"http-{r.status_code}"
                lines = [line for line in r.iter_lines() if line.startswith("data:")]
            if any('"error"' in line for line in lines):
                return "error"
            return "ok" if lines and lines[-1] == "data: [DONE]" else "truncated"

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(one, i) for i in range(10)]
            wait_until(lambda: llm.primary.stats.in_flight >= 8, 20, 0.05, "streams in flight")
            second.kill()
            outcomes = [f.result(timeout=60) for f in futures]  # nobody waits forever
        assert set(outcomes) <= {"ok", "error"}  # a clean end either way, never a cut stream
        # the dead provider's upstream streams were cut (the fake saw the disconnects);
        # those that had sent tokens ended with an error, the others were retried
        cut = wait_until(lambda: llm.primary.stats.cancelled, 10, 0.1, "cut streams")
        assert outcomes.count("error") <= cut
        assert outcomes.count("ok") >= 10 - cut
    finally:
        llm.primary.configure(token_delay_ms=0)
        llm.providers.remove(second)


def call_transactions(llm: LLMCluster, session_id: str,
                      types: str = "LLMCall%") -> list[tuple[str, str]]:
    """(type, inserting transaction id) of the session's events of `types` (a LIKE
    pattern), in order."""
    async def read() -> list[tuple[str, str]]:
        pool = await create_pool(llm.database_url, max_size=1)
        try:
            rows = await pool.fetch(
                "SELECT type, xmin::text AS tx FROM events WHERE metadata ->> 'correlation_id' = $1"
                " AND type LIKE $2 ORDER BY position", session_id, types)
            return [(r["type"], r["tx"]) for r in rows]
        finally:
            await pool.close()

    return asyncio.run(read())


def test_a_quick_call_records_start_and_completion_in_one_transaction(llm: LLMCluster,
                                                                      key) -> None:
    """`LLMCallStarted` waits (up to the router's grace) to share the call's next append;
    a call still waiting for its first token after the grace has it recorded alone, first."""
    sid = llm.session(key)
    client(llm, key, sid).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    [(started, tx1), (completed, tx2)] = call_transactions(llm, sid)
    assert (started, completed) == ("LLMCallStarted", "LLMCallCompleted") and tx1 == tx2

    slow = llm.session(key)
    llm.primary.script({"slow_first_byte_ms": 1500})  # three times the grace
    client(llm, key, slow).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    [(started, tx1), (completed, tx2)] = call_transactions(llm, slow)
    assert (started, completed) == ("LLMCallStarted", "LLMCallCompleted") and tx1 != tx2


def test_an_answer_is_recorded_in_the_transaction_that_settles_it(llm: LLMCluster, key) -> None:
    """The provider hands a completed call's events to the orchestrator (`Done.record`),
    which appends them with the cost and the conversation before the client gets the
    answer: one transaction records the whole answer, and nothing of it is missing."""
    sid = llm.session(key, budget={"limit_usd": 1})
    answer = client(llm, key, sid).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    settled = [(t, tx) for t, tx in call_transactions(llm, sid, "%")
               if t in {"LLMCallStarted", "LLMCallCompleted", "BudgetCommitted", "MessageAppended"}]
    assert sorted(t for t, _ in settled) == ["BudgetCommitted", "LLMCallCompleted",
                                            "LLMCallStarted", "MessageAppended", "MessageAppended"]
    assert len({tx for _, tx in settled}) == 1, settled
    [done] = [e.event for e in llm.events(sid) if e.type == "LLMCallCompleted"]
    assert done.output_tokens == answer.usage.completion_tokens


@contextlib.contextmanager
def in_the_settle(llm: LLMCluster, session_id: str, action: str) -> Iterator[None]:
    """`action` (PL/pgSQL) runs in the settle's transaction of this session's calls: a
    trigger on the insert of their `MessageAppended` events (real Postgres, nothing else
    touched)."""
    trigger = f"settle_{session_id.replace('-', '_')}"

    async def sql(statement: str) -> None:
        pool = await create_pool(llm.database_url, max_size=1)
        try:
            await pool.execute(statement)
        finally:
            await pool.close()

    asyncio.run(sql(f"""
        CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.metadata ->> 'correlation_id' = '{session_id}' AND NEW.type = 'MessageAppended' THEN
                {action}
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {trigger} BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION {trigger}();
    """))
    try:
        yield
    finally:
        asyncio.run(sql(f"DROP TRIGGER {trigger} ON events; DROP FUNCTION {trigger}()"))


def ask(llm: LLMCluster, key, sid: str, idempotency_key: str | None):
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    return client(llm, key, sid).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_headers=headers)


@pytest.mark.parametrize("idempotency_key", [None, "settle-then-answer"])
def test_an_answer_leaves_only_once_its_record_has_committed(llm: LLMCluster, key,
                                                            idempotency_key) -> None:
    """The answer is made while the settle's statement runs, but it leaves only after
    the commit: with the settle held up in Postgres, what the client has received is on
    record the moment it has it."""
    sid = llm.session(key, budget={"limit_usd": 1})
    with in_the_settle(llm, sid, "PERFORM pg_sleep(0.3);"):
        answer = ask(llm, key, sid, idempotency_key)
        recorded = types(llm, sid)  # read at once, by another connection
    assert answer.choices[0].message.content == reply_text(3)
    assert recorded.count("LLMCallCompleted") == 1 and recorded.count("MessageAppended") == 2
    assert recorded.count("BudgetCommitted") == 1


@pytest.mark.parametrize("idempotency_key", [None, "unrecorded-then-retried"])
def test_an_answer_that_cannot_be_recorded_is_not_given(llm: LLMCluster, key,
                                                       idempotency_key) -> None:
    """The settle's append fails (a real Postgres error, raised by a trigger on this
    session's events only): the client gets a 503 problem, not an answer whose cost,
    conversation and completion are on record nowhere; the next call records normally
    (under the same Idempotency-Key too: a refusal that is not final is not replayed)."""
    sid = llm.session(key, budget={"limit_usd": 1})
    with in_the_settle(llm, sid, "RAISE EXCEPTION 'refused by the test';"):
        with pytest.raises(openai.APIStatusError) as refused:
            ask(llm, key, sid, idempotency_key)
    assert refused.value.status_code == 503, refused.value
    assert refused.value.response.headers["content-type"].startswith("application/problem+json")
    assert "StoreUnavailable" in refused.value.response.text
    assert not [t for t in types(llm, sid) if t in {"LLMCallCompleted", "MessageAppended"}]

    assert ask(llm, key, sid, idempotency_key).choices[0].message.content == reply_text(3)
    assert types(llm, sid).count("LLMCallCompleted") == 1


def test_a_client_that_does_not_stream_gets_a_whole_answer_from_the_upstream(llm: LLMCluster,
                                                                            key) -> None:
    """A non-streaming call asks the upstream for one document (less work on both sides);
    a streaming one for a stream. Both answers are the same, and a whole answer claims no
    time to first token (its text came at its end)."""
    sid = llm.session(key)
    sdk = client(llm, key, sid)
    whole = sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "whole please"}], max_tokens=5)
    assert llm.primary.stats.outcomes[-1]["stream"] is False
    assert "stream_options" not in llm.primary.stats.last_body
    pieces = [choice.delta.content or "" for chunk in sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "stream please"}], max_tokens=5,
        stream=True) for choice in chunk.choices]
    assert llm.primary.stats.outcomes[-1]["stream"] is True
    assert whole.choices[0].message.content == "".join(pieces) == reply_text(5)
    completed = [e.event for e in llm.events(sid) if e.type == "LLMCallCompleted"]
    assert [c.ttft_ms is None for c in completed] == [True, False]
    assert [c.output_tokens for c in completed] == [5, 5]


def test_a_whole_answer_slower_than_the_stream_timeouts_is_waited_for(llm: LLMCluster,
                                                                      key) -> None:
    """The cluster's upstream gives a stream 3 s between reads and 3 s to the first token.
    A whole answer sends nothing until it is generated: it is waited for up to the
    upstream's `answer_timeout_s` (600 s by default) instead, not failed over."""
    llm.primary.script({"token_delay_ms": 450})  # 8 tokens: about 3.6 s
    sid = llm.session(key)
    reply = client(llm, key, sid).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "take your time"}], max_tokens=8)
    assert reply.choices[0].message.content == reply_text(8)
    assert [o["stream"] for o in llm.primary.stats.outcomes] == [False]  # one request, whole
    assert "LLMCallFailed" not in types(llm, sid)  # no attempt given up, no retry, no fallback
    [completed] = [e.event for e in llm.events(sid) if e.type == "LLMCallCompleted"]
    assert completed.attempts == 1 and completed.provider == "primary"


def test_parallel_tool_calls_in_a_whole_answer_come_back_whole_and_in_order(llm: LLMCluster,
                                                                             key) -> None:
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("lookup", "convert")]
    script = {"steps": [[{"name": "lookup", "arguments": {"q": "x"}},
                         {"name": "convert", "arguments": {"n": 2}}]]}
    reply = client(llm, key).chat.completions.create(
        model="default", tools=tools,
        messages=[{"role": "user", "content": f"FAKE_AGENT={json.dumps(script)}"}])
    assert llm.primary.stats.outcomes[-1]["stream"] is False
    calls = reply.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("lookup", {"q": "x"}), ("convert", {"n": 2})]
    assert len({c.id for c in calls}) == 2 and reply.choices[0].finish_reason == "tool_calls"
