"""What every upstream adapter shares: its config, the pieces it yields, its errors,
its connection pool and the line reader under the wire protocols.

An adapter speaks one wire protocol over HTTP and yields `Piece`s: `Text` and
`ToolCalls` as they arrive, then one `End` (finish reason, the upstream's own usage
when it reported any, the model that answered).

**Streamed or whole.** A request whose requester takes the answer as it comes
(`CompletionRequest.stream`, the default) is streamed from the upstream (SSE or NDJSON),
so its first token travels on at once and a stalled upstream is noticed within
`timeout_s`. A request for a whole answer asks the upstream for one JSON document, as
LiteLLM and other gateways do: the upstream and this process spend less per call (one
document instead of a line per token, here about half the fake upstream's CPU and a
tenth of the provider's per call, issue 16), and the same pieces are yielded at its end.
Such a request waits up to `answer_timeout_s` for the answer (nothing arrives before it
is generated), and its body is bounded (`MAX_WHOLE`).

Errors are `UpstreamError`s classified as retryable (connection errors, timeouts,
429, 5xx) or not (other 4xx), with `Retry-After` when the upstream sent one. Error
details never include the request headers (where the API key travels). A request that
lands on a pooled connection the server has just closed (llama-server closes after each
streamed completion while announcing keep-alive) is sent once more on a new connection
rather than failing (`http.Pool.request`).

HTTP is `http.Pool` (a lean HTTP/1.1 client on httptools; why: its module doc), one pool
of keep-alive connections per upstream.

Each request has an HTTP client span (`POST`, `http.method`, `http.url` without
credentials, `http.status_code`; ended when the response headers arrive), and its
trace context goes to the upstream in `traceparent`. The body is encoded with msgspec
and the stream is read as bytes: lines are decoded only where a wire protocol needs text.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.contracts.frames import Usage
from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.settings import env_secret
from shared.infra.upstreams.http import HTTPConnectionError, Pool, Response

_encoder = msgspec.json.Encoder()
_tracer = trace.get_tracer("nexus.upstreams")
_JSON = "application/json"

Positive = Annotated[float, msgspec.Meta(gt=0)]


class UpstreamConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream: where it is, how to authenticate, how long to wait."""

    name: str  # how errors name it
    kind: Literal["openai", "anthropic", "ollama"]
    base_url: str
    api_key_env: str | None = None  # the NAME of the variable; read at call time
    timeout_s: Positive = 60.0  # between two reads of the stream
    answer_timeout_s: Positive = 600.0  # for a whole (not streamed) answer
    connect_timeout_s: Positive = 5.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 32

    def api_key(self) -> str | None:
        return env_secret(self.api_key_env) if self.api_key_env else None

    def __repr__(self) -> str:  # nothing secret lives here, but keep dumps short
        return f"UpstreamConfig(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r})"


@dataclass
class Text:
    content: str


@dataclass
class ToolCalls:
    tool_calls: list[dict[str, Any]]


@dataclass
class End:
    finish_reason: str
    input_tokens: int | None  # None: the upstream reported no usage
    output_tokens: int | None
    model: str | None


Piece = Text | ToolCalls | End


def estimate_tokens(text: str) -> int:
    """Stated estimate when the runtime reports no usage: 1 token per 4 characters."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def usage_of(end: End, prompt: str, output: str) -> Usage:
    """The upstream's usage, each missing count estimated (and the usage flagged so)."""
    return Usage(
        input_tokens=end.input_tokens if end.input_tokens is not None else estimate_tokens(prompt),
        output_tokens=end.output_tokens if end.output_tokens is not None else estimate_tokens(output),
        estimated=end.input_tokens is None or end.output_tokens is None)


class UpstreamError(Exception):
    def __init__(self, kind: str, detail: str, *, status: int | None = None,
                 retryable: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def _retry_after(resp: Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


async def _raise_for_status(resp: Response, upstream: str) -> None:
    if resp.status < 400:
        return
    body = (await resp.read(300))[:300].decode(errors="replace")
    retryable = resp.status == 429 or resp.status >= 500
    kind = "RateLimited" if resp.status == 429 else f"HTTP{resp.status}"
    raise UpstreamError(kind, f"{upstream} answered {resp.status}: {body}",
                        status=resp.status, retryable=retryable,
                        retry_after_s=_retry_after(resp))


class Adapter:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self._pool: Pool | None = None
        self._urls: dict[str, str] = {}  # path -> the URL as the span shows it

    def pool(self) -> Pool:
        """The upstream's connection pool (created in the running event loop)."""
        if self._pool is None:
            self._pool = Pool(self.config.base_url, max_connections=self.config.max_connections,
                              connect_timeout_s=self.config.connect_timeout_s,
                              read_timeout_s=self.config.timeout_s)
        return self._pool

    def _shown(self, path: str) -> str:
        """The URL of `path` as spans show it: without credentials."""
        found = self._urls.get(path)
        if found is None:
            url = urlsplit(self.config.base_url.rstrip("/") + path)
            netloc = url.netloc.rpartition("@")[2]
            found = self._urls[path] = urlunsplit((url.scheme, netloc, url.path, url.query, ""))
        return found

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def stream(self, model: str, request: CompletionRequest,
               messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        raise NotImplementedError

    async def _whole(self, method: str, path: str, body: dict[str, Any],
                     headers: dict[str, str]) -> Any:
        """The response body as one JSON document (a whole answer: module doc)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self._chunks(method, path, body, headers, self.config.answer_timeout_s):
            size += len(chunk)
            if size > MAX_WHOLE:
                raise UpstreamError("BadResponse", f"{self.config.name}: an answer over 16 MiB",
                                    retryable=False)
            parts.append(chunk)
        try:
            return decode_json(b"".join(parts))
        except ValueError:
            raise UpstreamError("BadResponse", f"{self.config.name}: an undecodable answer") from None

    def _lines(self, method: str, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The response body line by line (bytes, without the line end), read to the end."""
        return _split_lines(self._chunks(method, path, body, headers, self.config.timeout_s),
                            self.config.name)

    async def _chunks(self, method: str, path: str, body: dict[str, Any],
                      headers: dict[str, str], read_timeout_s: float) -> AsyncIterator[bytes]:
        """The response body as the socket delivers it, read to the end (an HTTP error
        status raised as an `UpstreamError`)."""
        span = _tracer.start_span(method, kind=SpanKind.CLIENT,
                                  attributes={"http.method": method, "http.url": self._shown(path)})
        headers = {**headers, "Content-Type": _JSON}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        open_span = True
        try:
            async with await self.pool().request(method, path, _encoder.encode(body),
                                                 headers, read_timeout_s) as resp:
                span.set_attribute("http.status_code", resp.status)
                if resp.status >= 400:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
                open_span = False
                await _raise_for_status(resp, self.config.name)
                async for chunk in resp.chunks():
                    yield chunk
        except TimeoutError as exc:
            _failed(span, exc, open_span)
            raise UpstreamError("Timeout", f"{self.config.name}: {type(exc).__name__}") from None
        except HTTPConnectionError as exc:
            _failed(span, exc, open_span)
            raise UpstreamError("ConnectionError",
                                f"{self.config.name}: {type(exc).__name__}: {exc}") from None
        finally:
            if open_span:
                span.end()


MAX_LINE = 1 << 20  # SSE lines up to 1 MiB
MAX_WHOLE = 16 << 20  # a whole answer up to 16 MiB


async def _split_lines(chunks: AsyncGenerator[bytes, None], upstream: str) -> AsyncIterator[bytes]:
    """Lines (split at `\\n`, a trailing `\\r` dropped) of a body read to the end, from
    whatever the socket delivered at once rather than one wait per line; pieces of an
    unfinished line are joined once, when its end arrives. Closing it closes `chunks`
    at once (the response, and so its connection, is not left to the garbage collector)."""
    pending: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            if b"\n" not in chunk:
                pending.append(chunk)
                size += len(chunk)
                if size > MAX_LINE:
                    raise UpstreamError("BadResponse", f"{upstream}: a line longer than 1 MiB",
                                        retryable=False)
                continue
            if pending:
                chunk = b"".join([*pending, chunk])
                pending.clear()
            lines = chunk.split(b"\n")
            last = lines.pop()
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
            if last:
                pending.append(last)
            size = len(last)
    finally:
        await chunks.aclose()
    if pending:
        line = b"".join(pending)
        yield line[:-1] if line.endswith(b"\r") else line


def _failed(span: trace.Span, exc: BaseException, open_span: bool) -> None:
    if open_span:
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))


def decode_json(data: bytes) -> Any:
    """A JSON document of an upstream's stream (msgspec; invalid UTF-8 replaced, as
    a text decode would). Raises ValueError when it is not JSON."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        import json

        return json.loads(data.decode("utf-8", errors="replace"))
