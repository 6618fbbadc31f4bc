"""The upstream adapters' HTTP (shared.infra.upstreams.base): the line reader under the
wire protocols, whole (not streamed) answers and their timeout, the HTTP client span each
request makes, and the trace context it sends to the upstream (the fake upstream over
real HTTP)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.tracing import setup_tracing, tracer
from shared.infra.upstreams import End, Text, UpstreamConfig, UpstreamError, adapter_for
from shared.infra.upstreams.base import MAX_LINE, _split_lines
from tests.fake_upstream import FakeUpstream, reply_text


async def chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    """A body as the socket delivered it (what `Response.chunks` yields)."""
    for piece in pieces:
        yield piece


async def lines(*pieces: bytes) -> list[bytes]:
    return [line async for line in _split_lines(chunks(*pieces), "up")]


async def test_lines_are_split_wherever_the_chunks_end() -> None:
    body = b'data: {"a": 1}\r\n\r\ndata: {"b": "x\xc3\xa9"}\n\nevent: end\ndata: [DONE]\n\nlast'
    expected = [b'data: {"a": 1}', b"", b'data: {"b": "x\xc3\xa9"}', b"", b"event: end",
                b"data: [DONE]", b"", b"last"]
    assert await lines(body) == expected
    for size in (1, 2, 3, 7):  # every split, a byte at a time included
        assert await lines(*(body[i:i + size] for i in range(0, len(body), size))) == expected
    assert await lines(b"a\r", b"\nb\n") == [b"a", b"b"]  # a CRLF cut between two chunks
    assert await lines() == []


async def test_a_line_longer_than_the_limit_is_a_bad_response() -> None:
    piece = b"x" * (64 * 1024)
    with pytest.raises(UpstreamError) as caught:
        await lines(b"ok\n", *([piece] * (MAX_LINE // len(piece) + 1)), b"\n")
    assert caught.value.kind == "BadResponse" and not caught.value.retryable
    # a line just under the limit is read whole
    assert await lines(b"ok\n", *([piece] * (MAX_LINE // len(piece) - 1)), b"\n") == [
        b"ok", piece * (MAX_LINE // len(piece) - 1)]


class Collect(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


@pytest.fixture(scope="module")
def spans() -> Iterator[Collect]:
    collect = Collect()
    setup_tracing("nexus-test").add_span_processor(collect)
    yield collect
    collect.spans = []


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(reply_tokens=4, models=("m",), api_key="sk-test-0123456789") as fake:
        yield fake


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_each_request_has_a_client_span_and_sends_its_trace_context(
        kind: str, fake: FakeUpstream, spans: Collect, monkeypatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test-0123456789")
    base = fake.url + "/v1" if kind == "openai" else fake.url
    adapter = adapter_for(UpstreamConfig(name=kind, kind=kind, base_url=base,
                                         api_key_env="TEST_UPSTREAM_KEY"))
    request = CompletionRequest(call_id="c", session_id="s", tenant="t", model="m",
                                messages=(ChatMessage(role="user", content="héllo"),),
                                max_tokens=4)
    try:
        with tracer("test").start_as_current_span(f"parent {kind}") as parent:
            pieces = [p async for p in adapter.stream("m", request, request.messages)]
    finally:
        await adapter.close()
    assert "".join(p.content for p in pieces if isinstance(p, Text)) == reply_text(4)
    assert isinstance(pieces[-1], End) and pieces[-1].output_tokens == 4
    [http] = [s for s in spans.spans if s.parent is not None
              and s.parent.span_id == parent.get_span_context().span_id]
    assert http.name == "POST" and http.kind.name == "CLIENT"
    assert http.attributes["http.method"] == "POST"
    assert http.attributes["http.status_code"] == 200
    assert str(http.attributes["http.url"]).startswith(fake.url)
    # the upstream continues the trace under the HTTP span
    traceparent = fake.stats.last_headers["traceparent"]
    assert traceparent.startswith(f"00-{http.context.trace_id:032x}-{http.context.span_id:016x}-")
    # and no instrumentation adds a second span for the same request
    assert len([s for s in spans.spans if s.context.trace_id == http.context.trace_id]) == 2


async def test_an_error_status_marks_the_span(fake: FakeUpstream, spans: Collect,
                                              monkeypatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test-0123456789")
    fake.script({"status": 400})
    adapter = adapter_for(UpstreamConfig(name="up", kind="openai", base_url=fake.url + "/v1",
                                         api_key_env="TEST_UPSTREAM_KEY"))
    request = CompletionRequest(call_id="c", session_id="s", tenant="t", model="m",
                                messages=(ChatMessage(role="user", content="hi"),))
    try:
        with tracer("test").start_as_current_span("parent error") as parent, \
                pytest.raises(UpstreamError) as caught:
            [p async for p in adapter.stream("m", request, request.messages)]
    finally:
        await adapter.close()
    assert caught.value.kind == "HTTP400" and not caught.value.retryable
    [http] = [s for s in spans.spans if s.parent is not None
              and s.parent.span_id == parent.get_span_context().span_id]
    assert http.attributes["http.status_code"] == 400 and http.status.status_code.name == "ERROR"


class ClosesAfterEachStream:
    """An OpenAI-compatible server with llama-server's connection habit: a streamed
    completion is sent with `Keep-Alive: timeout=5, max=100`, then the server closes the
    connection (measured on llama-server: EOF right after the terminating chunk). Here the
    close waits for the client's next request on that connection, so the race a client
    loses now and then (it reuses the pooled connection before it sees the FIN) happens
    every time: the request is read and the connection closed without an answer."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for served in itertools.count():
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if served:  # this connection has answered its stream: closed, no answer
                    self.dropped += 1
                    return
                chunks = [{"choices": [{"index": 0, "delta": {"content": "hi"}}]},
                          {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                          {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
                events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
                             + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_pooled_connection_the_server_closed_is_not_a_failed_call() -> None:
    """A completion that lands on a pooled connection the upstream has just closed is
    sent once more on a new one, instead of failing as a ConnectionError (which a busy
    node's retried call turned into a 502: issue s7, busy node)."""
    request = CompletionRequest(call_id="c", session_id="s", tenant="t", model="m",
                                messages=(ChatMessage(role="user", content="hi"),))
    upstream = ClosesAfterEachStream()
    async with upstream as url:
        adapter = adapter_for(UpstreamConfig(name="up", kind="openai", base_url=url))
        try:
            for _ in range(3):
                pieces = [p async for p in adapter.stream("m", request, request.messages)]
                assert pieces == [Text("hi"), End("stop", 3, 1, None)]
        finally:
            await adapter.close()
    assert upstream.answered == 3
    assert upstream.dropped == 2 and upstream.connections == 3  # each reuse resent once


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_a_whole_answer_yields_what_its_stream_yields(kind: str, fake: FakeUpstream,
                                                            monkeypatch) -> None:
    """`CompletionRequest.stream=False`: one document from the upstream, the same pieces."""
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-test-0123456789")
    base = fake.url + "/v1" if kind == "openai" else fake.url
    adapter = adapter_for(UpstreamConfig(name=kind, kind=kind, base_url=base,
                                         api_key_env="TEST_UPSTREAM_KEY"))
    answers = []
    try:
        for stream in (True, False):
            request = CompletionRequest(call_id="c", session_id="s", tenant="t", model="m",
                                        messages=(ChatMessage(role="user", content="héllo"),),
                                        max_tokens=3, stream=stream)
            pieces = [p async for p in adapter.stream("m", request, request.messages)]
            assert fake.stats.outcomes[-1]["stream"] is stream
            answers.append(("".join(p.content for p in pieces if isinstance(p, Text)), pieces[-1]))
    finally:
        await adapter.close()
    streamed, whole = answers
    assert whole == streamed
    assert whole[0] == reply_text(3) and whole[1].finish_reason == "length"
    assert whole[1].input_tokens is not None and whole[1].output_tokens == 3


async def test_a_whole_answer_is_waited_for_up_to_its_own_timeout(fake: FakeUpstream) -> None:
    """Nothing arrives before a whole answer is generated: `answer_timeout_s`, not the
    stream's `timeout_s`, bounds the wait; past it the attempt is a retryable timeout."""
    request = CompletionRequest(call_id="c", session_id="s", tenant="t", model="m",
                                messages=(ChatMessage(role="user", content="hi"),), stream=False)
    patient = adapter_for(UpstreamConfig(name="up", kind="ollama", base_url=fake.url,
                                         timeout_s=0.1, answer_timeout_s=30))
    hasty = adapter_for(UpstreamConfig(name="up", kind="ollama", base_url=fake.url,
                                       timeout_s=30, answer_timeout_s=0.1))
    try:
        fake.script({"slow_first_byte_ms": 400})
        pieces = [p async for p in patient.stream("m", request, request.messages)]
        assert isinstance(pieces[-1], End)
        fake.script({"hang": True})
        with pytest.raises(UpstreamError) as caught:
            [p async for p in hasty.stream("m", request, request.messages)]
        assert caught.value.kind == "Timeout" and caught.value.retryable
    finally:
        await patient.close()
        await hasty.close()
