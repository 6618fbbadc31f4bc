"""The fake upstream speaks the real wire protocols: checked with the official SDKs.

OpenAI and Anthropic are driven through their official Python SDKs, Ollama through raw
httpx (NDJSON). Every fault behaviour is observed from the client side, and client
disconnects are observed from the server side (``stats.cancelled``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.fake_upstream import (
    FakeUpstream,
    FakeUpstreamControl,
    FakeUpstreamProcess,
    estimate_prompt_tokens,
    reply_text,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the world"},
]
PROMPT_TOKENS = (3 + 3) + (5 + 3)  # words + 3 per message
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {
            "zone": {"type": "string", "enum": ["UTC", "CET"]}}}}},
]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(reply_tokens=8).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    server.configure(reply_tokens=8, token_delay_ms=0, first_byte_delay_ms=0)
    return server


def oai(fake: FakeUpstream, key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key=key, max_retries=0, timeout=5)


def ant(fake: FakeUpstream, key: str = "sk-ant-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key=key, max_retries=0,
                               timeout=5)


def _stream_cut_errors() -> tuple[type[BaseException], ...]:
    """What a client sees when a stream is cut: the SDKs wrap it or let the transport error
    through (newer SDKs ship their own httpx fork, httpx2)."""
    errors: list[type[BaseException]] = [openai.APIConnectionError, anthropic.APIConnectionError,
                                         httpx.RemoteProtocolError]
    try:
        import httpx2  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        errors.append(httpx2.RemoteProtocolError)
    return tuple(errors)


STREAM_CUT = _stream_cut_errors()


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------------ OpenAI


def test_openai_chat_completion(fake: FakeUpstream) -> None:
    resp = oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.model == "fake-small"
    assert resp.id.startswith("chatcmpl-") and resp.created > 0
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7" == reply_text(8)
    assert choice.finish_reason == "stop"
    assert estimate_prompt_tokens(MESSAGES) == PROMPT_TOKENS
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens,
            resp.usage.total_tokens) == (PROMPT_TOKENS, 8, PROMPT_TOKENS + 8)
    stats = fake.stats
    assert stats.count("/v1/chat/completions") == 1
    assert stats.last_body["messages"] == MESSAGES
    assert stats.last_headers["authorization"] == "Bearer sk-test"
    # the server records the outcome just after the last byte leaves: wait for it
    done = fake.wait_for(lambda st: st.outcome(resp.id) is not None, what="the outcome")
    assert done.outcome(resp.id)["outcome"] == "completed"


def test_openai_stream_with_usage(fake: FakeUpstream) -> None:
    stream = oai(fake).chat.completions.create(
        model="fake-large", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert pieces == ["tok0"] + [f" tok{i}" for i in range(1, 8)]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        PROMPT_TOKENS, 8, PROMPT_TOKENS + 8)
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_stream_raw_wire_format(fake: FakeUpstream) -> None:
    body = {"model": "fake-small", "messages": MESSAGES, "stream": True}
    resp = httpx.post(fake.openai_base_url + "/chat/completions", json=body, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.endswith("data: [DONE]\n\n")
    data = sse_data(resp.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 1 + 8 + 1  # role, 8 tokens, finish; no usage chunk when not asked
    assert "usage" not in chunks[0]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == reply_text(8)


def test_openai_max_tokens_stop_and_reply_length(fake: FakeUpstream) -> None:
    client = oai(fake)
    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES, max_tokens=3)
    assert resp.choices[0].message.content == "tok0 tok1 tok2"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3

    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES,
                                          max_completion_tokens=2)
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == ("tok0 tok1",
                                                                                "length")
    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES, max_tokens=50)
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 8

    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES,
                                          stop=[" tok5", "tok7"])
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 5

    stream = client.chat.completions.create(model="fake-small", messages=MESSAGES, stop="tok3",
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2"
    assert chunks[-1].usage.completion_tokens == 3

    # the reply length follows the configuration, or FAKE_TOKENS=N in the last user message
    fake.configure(reply_tokens=3)
    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES)
    assert resp.choices[0].message.content == reply_text(3)
    resp = client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "go FAKE_TOKENS=20"}])
    assert resp.usage.completion_tokens == 20 and resp.usage.prompt_tokens == 2 + 3


def test_openai_tool_calls(fake: FakeUpstream) -> None:
    client = oai(fake)
    ask = [{"role": "user", "content": "weather in Paris? CALL_TOOL"}]
    resp = client.chat.completions.create(model="fake-small", messages=ask, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "fake", "days": 1}
    assert resp.usage.completion_tokens == len(call.function.arguments.split())
    assert fake.stats.last_body["tools"] == TOOLS  # passed through as sent

    stream = client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "CALL_TOOL:get_time now"}],
        tools=TOOLS, stream=True)
    chunks = list(stream)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.tool_calls[0].function.name == "get_time"
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                   for c in chunks if c.choices[0].delta.tool_calls)
    assert json.loads(args) == {"zone": "UTC"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # no marker, or tool_choice="none": plain text
    resp = client.chat.completions.create(model="fake-small", messages=MESSAGES, tools=TOOLS)
    assert resp.choices[0].finish_reason == "stop" and not resp.choices[0].message.tool_calls
    resp = client.chat.completions.create(model="fake-small", messages=ask, tools=TOOLS,
                                          tool_choice="none")
    assert resp.choices[0].finish_reason == "stop"


def test_model_listings(fake: FakeUpstream) -> None:
    assert [m.id for m in oai(fake).models.list()] == ["fake-small", "fake-large"]
    assert [m.id for m in ant(fake).models.list()] == ["fake-small", "fake-large"]
    tags = httpx.get(fake.url + "/api/tags", timeout=5).json()
    assert [m["name"] for m in tags["models"]] == ["fake-small:latest", "fake-large:latest"]
    assert fake.stats.script_pending == 0


def test_invalid_requests(fake: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oai(fake).chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    resp = httpx.post(fake.openai_base_url + "/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    # Anthropic insists on anthropic-version and max_tokens
    body = {"model": "fake-small", "max_tokens": 5, "messages": MESSAGES[1:]}
    resp = httpx.post(fake.url + "/v1/messages", json=body, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        ant(fake).messages.create(model="fake-small", messages=MESSAGES[1:],
                                  max_tokens=None)  # type: ignore[arg-type]
    resp = httpx.post(fake.url + "/api/chat", json={"model": "nope", "messages": []}, timeout=5)
    assert resp.status_code == 404 and "not found" in resp.json()["error"]
    assert httpx.get(fake.url + "/v1/nothing", timeout=5).status_code == 404
    with pytest.raises(ValueError):
        fake.script({"stauts": 500})
    with pytest.raises(ValueError):
        fake.script({"hang": "yes"})
    with pytest.raises(ValueError):
        fake.script({"status": 200})


def test_api_key_is_enforced() -> None:
    with FakeUpstream(api_key="sk-right") as fake:
        with pytest.raises(openai.AuthenticationError) as err:
            oai(fake, "sk-wrong").chat.completions.create(model="fake-small", messages=MESSAGES)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            oai(fake, "sk-wrong").models.list()
        ok = oai(fake, "sk-right").chat.completions.create(model="fake-small", messages=MESSAGES)
        assert ok.choices[0].message.content == reply_text(8)

        with pytest.raises(anthropic.AuthenticationError) as aerr:
            ant(fake, "sk-wrong").messages.create(model="fake-small", max_tokens=5,
                                                  messages=MESSAGES[1:])
        assert aerr.value.body["error"]["type"] == "authentication_error"
        assert ant(fake, "sk-right").messages.create(
            model="fake-small", max_tokens=5, messages=MESSAGES[1:]).usage.output_tokens == 5
        body = {"model": "fake-small", "max_tokens": 2, "messages": MESSAGES[1:]}
        for headers, status in [({"x-api-key": "sk-right"}, 200), ({"x-api-key": "no"}, 401),
                                ({}, 401)]:
            resp = httpx.post(fake.url + "/v1/messages", json=body, timeout=5,
                              headers={"anthropic-version": "2023-06-01", **headers})
            assert resp.status_code == status
        # completion requests refused (listings are not counted); a request is counted once
        # its answer is sent, so the last one may still be in flight here
        deadline = time.monotonic() + 10
        while fake.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.stats.errors == 4


# ------------------------------------------------------------------ Anthropic


def test_anthropic_message(fake: FakeUpstream) -> None:
    client = ant(fake)
    msg = client.messages.create(model="fake-small", max_tokens=100, system="You are terse.",
                                 messages=MESSAGES[1:])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text == reply_text(8)
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 8)
    assert fake.stats.last_headers["anthropic-version"]

    msg = client.messages.create(model="fake-small", max_tokens=3, messages=MESSAGES[1:])
    assert (msg.content[0].text, msg.stop_reason, msg.usage.output_tokens) == (
        "tok0 tok1 tok2", "max_tokens", 3)
    msg = client.messages.create(model="fake-small", max_tokens=100, messages=MESSAGES[1:],
                                 stop_sequences=["tok2", "tok6"])
    assert (msg.content[0].text, msg.stop_reason, msg.stop_sequence) == (
        "tok0 tok1", "stop_sequence", "tok2")
    assert msg.usage.output_tokens == 2


def test_anthropic_stream_sdk(fake: FakeUpstream) -> None:
    with ant(fake).messages.stream(model="fake-large", max_tokens=100, system="You are terse.",
                                   messages=MESSAGES[1:]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["tok0"] + [f" tok{i}" for i in range(1, 8)]
    assert final.content[0].text == reply_text(8)
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 8)


def test_anthropic_stream_raw_event_sequence(fake: FakeUpstream) -> None:
    body = {"model": "fake-small", "max_tokens": 5, "messages": MESSAGES[1:], "stream": True}
    resp = httpx.post(fake.url + "/v1/messages", json=body, timeout=5,
                      headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in resp.text.strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    assert [n for n, _ in events] == (
        ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5
        + ["content_block_stop", "message_delta", "message_stop"])
    assert events[0][1]["message"]["usage"]["input_tokens"] == 5 + 3
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == \
        reply_text(5)
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5


def test_anthropic_tool_use(fake: FakeUpstream) -> None:
    tools = [{"name": "get_weather", "description": "w", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    ask = [{"role": "user", "content": "CALL_TOOL please"}]
    client = ant(fake)
    msg = client.messages.create(model="fake-small", max_tokens=100, tools=tools, messages=ask)
    assert msg.stop_reason == "tool_use"
    block = msg.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"city": "fake"}
    with client.messages.stream(model="fake-small", max_tokens=100, tools=tools,
                                messages=ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "fake"}


# ------------------------------------------------------------------ Ollama


def test_ollama_chat(fake: FakeUpstream) -> None:
    body = {"model": "fake-small", "messages": MESSAGES}
    with httpx.stream("POST", fake.url + "/api/chat", json=body, timeout=5) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and len(lines) == 9
    assert all(line["message"]["role"] == "assistant" and line["model"] == "fake-small"
               for line in lines)
    assert "".join(line["message"]["content"] for line in lines) == reply_text(8)
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "stop"
    assert (last["prompt_eval_count"], last["eval_count"]) == (PROMPT_TOKENS, 8)
    assert last["created_at"].endswith("Z")

    resp = httpx.post(fake.url + "/api/chat", timeout=5, json={
        "model": "fake-small:latest", "messages": MESSAGES, "stream": False,
        "options": {"num_predict": 3}})
    one = resp.json()
    assert resp.headers["content-type"] == "application/json"
    assert one["done"] is True and one["done_reason"] == "length"
    assert one["message"] == {"role": "assistant", "content": "tok0 tok1 tok2"}
    assert (one["prompt_eval_count"], one["eval_count"]) == (PROMPT_TOKENS, 3)


# ------------------------------------------------------------------ faults


def test_scripted_error_statuses(fake: FakeUpstream) -> None:
    client = oai(fake)
    fake.script({"status": 500}, {"status": 503}, {"status": 429, "retry_after": 1})
    assert fake.stats.script_pending == 3
    with pytest.raises(openai.InternalServerError) as e500:
        client.chat.completions.create(model="fake-small", messages=MESSAGES)
    assert e500.value.status_code == 500 and e500.value.type == "server_error"
    with pytest.raises(openai.APIStatusError) as e503:
        client.chat.completions.create(model="fake-small", messages=MESSAGES, stream=True)
    assert e503.value.status_code == 503
    with pytest.raises(openai.RateLimitError) as e429:
        client.chat.completions.create(model="fake-small", messages=MESSAGES)
    assert e429.value.response.headers["retry-after"] == "1"
    assert e429.value.code == "rate_limit_exceeded"
    # script exhausted: back to normal
    assert client.chat.completions.create(model="fake-small", messages=MESSAGES).choices
    stats = fake.stats
    assert (stats.errors, stats.completed, stats.script_pending) == (3, 1, 0)

    fake.script({"status": 429, "retry_after": 2}, {"status": 529, "message": "busy"})
    with pytest.raises(anthropic.RateLimitError) as a429:
        ant(fake).messages.create(model="fake-small", max_tokens=5, messages=MESSAGES[1:])
    assert a429.value.response.headers["retry-after"] == "2"
    assert a429.value.body["error"]["type"] == "rate_limit_error"
    resp = httpx.post(fake.url + "/api/chat", json={"model": "fake-small", "messages": []},
                      timeout=5)
    assert resp.status_code == 529 and resp.json() == {"error": "busy"}


def test_script_is_fifo_and_consumed_only_by_completions(fake: FakeUpstream) -> None:
    client = oai(fake)
    fake.script({}, {"status": 500})
    client.models.list()
    httpx.get(fake.url + "/api/tags", timeout=5)
    assert fake.stats.script_pending == 2
    assert client.chat.completions.create(model="fake-small", messages=MESSAGES).choices
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fake-small", messages=MESSAGES)
    assert client.chat.completions.create(model="fake-small", messages=MESSAGES).choices
    assert fake.stats.requests == {"/v1/models": 1, "/api/tags": 1, "/v1/chat/completions": 3}


def test_hang_until_client_gives_up(fake: FakeUpstream) -> None:
    fake.script({"hang": True})
    body = {"model": "fake-small", "messages": MESSAGES}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.openai_base_url + "/chat/completions", json=body, timeout=0.3)
    stats = fake.wait_cancelled(1)
    assert stats.outcomes[-1]["outcome"] == "cancelled"
    assert stats.cancelled_ids == [stats.outcomes[-1]["id"]]
    assert fake.wait_idle().in_flight == 0


def test_slow_first_byte(fake: FakeUpstream) -> None:
    """The first byte (headers included) is held back: a client that gives up sooner
    gets nothing at all; one that waits gets the normal answer."""
    url = fake.openai_base_url + "/chat/completions"
    body = {"model": "fake-small", "messages": MESSAGES}
    fake.script({"slow_first_byte_ms": 60_000}, {"slow_first_byte_ms": 60_000})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):  # streamed: not even the headers
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=0.3):
            pass
    stats = fake.wait_cancelled(2)
    assert [o["tokens_sent"] for o in stats.outcomes] == [0, 0]

    fake.script({"slow_first_byte_ms": 50}, {"slow_first_byte_ms": 50})
    reply = oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert reply.choices[0].message.content == reply_text(8)
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=5) as resp:
        assert resp.status_code == 200 and "[DONE]" in resp.read().decode()
    assert fake.stats.script_pending == 0  # consumed: back to normal
    assert oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES).choices
    assert fake.wait_idle().completed == 3  # recorded once each response has ended


def test_drop_before_first_token(fake: FakeUpstream,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    fake.script({"drop_before_first_token": True})
    body = {"model": "fake-small", "messages": MESSAGES, "stream": True}
    received = b""
    with httpx.stream("POST", fake.openai_base_url + "/chat/completions", json=body,
                      timeout=5) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        with pytest.raises(httpx.RemoteProtocolError):
            for part in resp.iter_raw():
                received += part
    assert received == b""

    fake.script({"drop_before_first_token": True}, {"drop_before_first_token": True})
    with pytest.raises(openai.APIConnectionError):
        for _ in oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES,
                                                   stream=True):
            pass
    with pytest.raises(openai.APIConnectionError):
        oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert fake.stats.dropped == 3
    # a deliberate cut is not reported as a server error
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_drop_after_tokens(fake: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    fake.script({"drop_after_tokens": 3})
    got: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES,
                                                       stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
            assert not chunk.choices or chunk.choices[0].finish_reason is None
    assert got == ["tok0", " tok1", " tok2"]

    fake.script({"drop_after_tokens": 2})
    body = {"model": "fake-small", "messages": MESSAGES, "stream": True}
    text = b""
    with httpx.stream("POST", fake.openai_base_url + "/chat/completions", json=body,
                      timeout=5) as resp:
        with pytest.raises(httpx.RemoteProtocolError):
            for part in resp.iter_raw():
                text += part
    data = sse_data(text.decode())
    assert len(data) == 1 + 2 and "[DONE]" not in data

    fake.script({"drop_after_tokens": 2})
    pieces: list[str] = []
    with pytest.raises(STREAM_CUT):
        with ant(fake).messages.stream(model="fake-small", max_tokens=10,
                                       messages=MESSAGES[1:]) as stream:
            for piece in stream.text_stream:
                pieces.append(piece)
    assert pieces == ["tok0", " tok1"]

    fake.script({"drop_after_tokens": 1})
    lines = []
    with httpx.stream("POST", fake.url + "/api/chat", timeout=5,
                      json={"model": "fake-small", "messages": MESSAGES}) as resp:
        with pytest.raises(httpx.RemoteProtocolError):
            for line in resp.iter_lines():
                lines.append(json.loads(line))
    assert [line["message"]["content"] for line in lines] == ["tok0"]

    stats = fake.stats
    assert stats.dropped == 4 and [o["tokens_sent"] for o in stats.outcomes] == [3, 2, 2, 1]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_token_delay(fake: FakeUpstream) -> None:
    """Each token waits its delay: a client that leaves after the stream's first chunk
    (the role, sent at once) leaves before any token was produced."""
    fake.script({"token_delay_ms": 60_000})
    stream = oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES,
                                               max_tokens=5, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    stream.close()
    stats = fake.wait_cancelled(1)
    assert stats.outcome(first.id)["tokens_sent"] == 0 and stats.tokens_sent == 0

    fake.script({"token_delay_ms": 10})  # a short delay: every token still comes
    pieces = [c.choices[0].delta.content for c in oai(fake).chat.completions.create(
        model="fake-small", messages=MESSAGES, max_tokens=5, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == reply_text(5)

    fake.configure(token_delay_ms=60_000)  # the configured delay also paces non-streamed replies
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake.openai_base_url + "/chat/completions", timeout=0.3,
                   json={"model": "fake-small", "messages": MESSAGES, "max_tokens": 5})
    assert fake.wait_cancelled(2).outcomes[-1]["outcome"] == "cancelled"


def test_client_disconnect_stops_generation(fake: FakeUpstream) -> None:
    fake.configure(token_delay_ms=30)
    many = [{"role": "user", "content": "talk FAKE_TOKENS=200"}]
    stream = oai(fake).chat.completions.create(model="fake-small", messages=many, stream=True)
    got = 0
    stream_id = None
    for chunk in stream:
        stream_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    stream.close()
    stats = fake.wait_cancelled(1)
    assert stats.cancelled_ids == [stream_id]
    sent = stats.outcome(stream_id)["tokens_sent"]
    assert 3 <= sent < 10
    # the outcome is recorded when the generator has returned: nothing more is produced
    assert stats.tokens_sent == sent and stats.in_flight == 0

    # the same for an Anthropic stream and an Ollama stream
    with ant(fake).messages.stream(model="fake-small", max_tokens=500, messages=many) as s:
        next(iter(s.text_stream))
    with httpx.stream("POST", fake.url + "/api/chat", timeout=5,
                      json={"model": "fake-small", "messages": many}) as resp:
        next(resp.iter_lines())
    stats = fake.wait_cancelled(3)
    assert [o["outcome"] for o in stats.outcomes] == ["cancelled"] * 3
    assert stats.completed == 0


def test_http_control_endpoints(fake: FakeUpstream) -> None:
    control = FakeUpstreamControl(fake.url)
    assert control.script({"status": 503}, {"drop_after_tokens": 1}) == 2
    with pytest.raises(ValueError):
        control.script({"explode": True})
    resp = httpx.post(fake.url + "/_fake/script", json={"behaviours": [{}]}, timeout=5)
    assert resp.json() == {"pending": 3}
    with pytest.raises(openai.APIStatusError) as err:
        oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert err.value.status_code == 503
    stats = control.stats
    assert stats.script_pending == 2 and stats.errors == 1
    assert stats.requests == {"/v1/chat/completions": 1}
    raw = httpx.get(fake.url + "/_fake/stats", timeout=5).json()
    assert raw["recent"][0]["body"]["model"] == "fake-small"
    assert control.configure(reply_tokens=3)["reply_tokens"] == 3
    control.reset()
    stats = control.stats
    assert (stats.total, stats.script_pending, stats.recent) == (0, 0, [])
    resp = oai(fake).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert resp.choices[0].message.content == reply_text(3)


async def test_64_concurrent_clients(fake: FakeUpstream) -> None:
    # 64 streams held open at once: all are in flight together, none waits for another
    fake.configure(token_delay_ms=60_000)
    async with httpx.AsyncClient(base_url=fake.openai_base_url, timeout=10,
                                 limits=httpx.Limits(max_connections=64)) as client:
        async def held() -> None:
            body = {"model": "fake-small", "messages": MESSAGES, "stream": True}
            async with client.stream("POST", "/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                await all_in_flight.wait()

        all_in_flight = asyncio.Event()
        holders = [asyncio.create_task(held()) for _ in range(64)]
        await asyncio.to_thread(fake.wait_for, lambda s: s.in_flight == 64, 30)
        all_in_flight.set()
        await asyncio.gather(*holders)
    assert fake.wait_cancelled(64, 30).in_flight == 0
    fake.reset()

    fake.configure(token_delay_ms=20, reply_tokens=5)
    body = {"model": "fake-small", "messages": MESSAGES, "stream": True}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=fake.openai_base_url, limits=limits,
                                 timeout=10) as client:
        async def one() -> str:
            async with client.stream("POST", "/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                text = (await resp.aread()).decode()
            chunks = [json.loads(d) for d in sse_data(text) if d != "[DONE]"]
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

        replies = await asyncio.gather(*(one() for _ in range(64)))
    assert replies == [reply_text(5)] * 64
    stats = fake.stats
    assert stats.completed == 64 and stats.in_flight == 0


def test_runs_as_its_own_process() -> None:
    with FakeUpstreamProcess(reply_tokens=4, api_key="sk-proc") as proc:
        assert proc.port > 0
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="sk-proc", max_retries=0,
                               timeout=5)
        resp = client.chat.completions.create(model="fake-small", messages=MESSAGES)
        assert resp.choices[0].message.content == reply_text(4)
        proc.control.script({"status": 503})
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="fake-small", messages=MESSAGES)
        assert err.value.status_code == 503
        stats = proc.control.stats
        assert (stats.completed, stats.errors) == (1, 1)
    assert proc.proc is not None and proc.proc.returncode == 0
