"""A lean HTTP/1.1 client for the upstreams: one pool of keep-alive connections per
upstream, each an asyncio protocol with httptools' parser (llhttp, the one uvicorn uses).

Why not aiohttp (issue 16): a relayed call is one small POST and one response read as it
arrives; aiohttp's general machinery (its request and response objects, cookie jar,
tracing signals, compression, redirects, the stream reader) cost 0.37 ms of CPU per
request here, this client 0.11 ms, and 0.5 ms of latency per request (measured side by
side against the fake upstream in one run, the note of issue 16). What it does:

* **Pool:** at most `max_connections` requests at once per upstream (the others wait
  their turn), idle connections reused newest first, a connection the server closed
  dropped as soon as it is seen closed. A request written on a reused connection that
  the server closes before answering anything is sent once more on a new connection
  (llama-server announces keep-alive, then closes after each streamed completion).
* **Bodies:** `Content-Length`, chunked, or read until the server closes; the response
  body is handed over as the socket delivers it, what one read brought at once
  (`Response.chunks`).
* **Bounded memory:** a response whose reader does not keep up stops being read from
  the socket once `BUFFER_HIGH` bytes wait (the server then waits on TCP), until the
  reader takes them: no upstream can make the process buffer without bound.
* **Timeouts:** `connect_timeout_s` to connect (and the TLS handshake), `read_timeout_s`
  between two reads (the response head included; a request may set its own: a whole
  answer is not sent before it is generated); `TimeoutError` when one runs out.
* **TLS** for `https://` (the system's trust store, the host name checked).
* **Credentials** in the base URL (`https://user:pass@host/...`) become a Basic
  `Authorization` header, unless the request carries its own. No header value may hold a
  line break (a value is never able to inject a header).

Failures are `HTTPConnectionError` (no connection, or one lost before the response
ended) or `TimeoutError`; a response that is not HTTP is a `HTTPConnectionError` too.
Nothing here logs or raises a header's value.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import httptools

BUFFER_HIGH = 1 << 20
"""Unread response bytes at which a connection stops reading from its socket."""
MAX_HEAD = 64 * 1024
"""The most bytes a response's head (status line and headers) may take."""


class HTTPConnectionError(ConnectionError):
    """No connection could be made, or it was lost (or spoke no HTTP) before the response
    ended. `connected`: whether a connection was made at all."""

    def __init__(self, message: str, *, connected: bool = True) -> None:
        super().__init__(message)
        self.connected = connected


def _timeout_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection: the request written, the response parsed as it arrives."""

    def __init__(self, pool: Pool) -> None:
        self.owner = pool
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False  # a request is on it (an idle connection expects nothing)
        # the response being read
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.keep_alive = False
        self.interim = False
        self.complete = False
        self.received = False  # any byte of this response
        self.head_bytes = self.head_size = 0
        self.error: BaseException | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for (a server's parting "408"): not reusable
            self.abort()
            return
        self.received = True
        if not self.head_done:  # one header that never ends (the parser would keep it all)
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD + BUFFER_HIGH:  # (a read may hold the body's start)
                self._fail(HTTPConnectionError(f"a response head over {MAX_HEAD} bytes"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HTTPConnectionError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(HTTPConnectionError(f"not an HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner._forget(self)
        if self.complete:
            return
        if self.head_done and exc is None and self._until_close:
            self.complete = True  # a body that ends where the connection does
            self._wake()
        else:
            self._fail(HTTPConnectionError("the upstream closed the connection before the "
                                           "response ended" + (f": {exc}" if exc else "")))

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request, in the same read
            self.keep_alive = False  # not reusable; what was read stands

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            self._fail(HTTPConnectionError(f"a response head over {MAX_HEAD} bytes"))
            return
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response (100 Continue): the real one follows
            self.interim = True
            self.headers = {}
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()  # (not known after the end)
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered >= BUFFER_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # -- the request's side -----------------------------------------------------------

    @property
    def _until_close(self) -> bool:
        return "content-length" not in self.headers and "transfer-encoding" not in self.headers

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reset(self) -> None:
        self.status, self.headers = 0, {}
        self.head_done = self.keep_alive = self.interim = self.complete = self.received = False
        self.error, self.buffered, self.head_bytes, self.head_size = None, 0, 0, 0
        self.body.clear()
        self.parser = httptools.HttpResponseParser(self)

    async def wait(self, timeout: float) -> None:
        """Until the parser or the connection has news, at most `timeout` seconds."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _timeout_waiter, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes | None:
        """What was received of the body since the last take, if anything (the pieces of
        one read together: a streamed response sends each event as its own chunk)."""
        if not self.body:
            return None
        piece = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return piece

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """A response whose head has arrived; its body is read with `chunks` or `read`.
    `close()` (or leaving `async with`) hands the connection back: to the pool when the
    body was read to its end and the server keeps it alive, closed otherwise."""

    def __init__(self, pool: Pool, conn: _Connection, read_timeout_s: float) -> None:
        self._pool = pool
        self._read_timeout_s = read_timeout_s
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers  # names in lower case

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as received, to its end."""
        conn = self._conn
        assert conn is not None, "the response is closed"
        timeout = self._read_timeout_s
        while True:
            piece = conn.take()
            if piece is not None:
                yield piece
            elif conn.error is not None:
                raise conn.error
            elif conn.complete:
                return
            else:
                await conn.wait(timeout)

    async def read(self, limit: int | None = None) -> bytes:
        """The body (its first `limit` bytes at least, when `limit` is given: the rest is
        not waited for)."""
        parts: list[bytes] = []
        size = 0
        async for piece in self.chunks():
            parts.append(piece)
            size += len(piece)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Pool:
    """The connections to one upstream (`base_url`: scheme, host, port, path prefix)."""

    def __init__(self, base_url: str, *, max_connections: int = 32,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0,
                 tls: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {url.scheme}://{url.hostname or ''}")
        self.host = url.hostname
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self._host_header = (host if default_port else f"{host}:{self.port}").encode("idna")
        self._basic: bytes | None = None
        if url.username is not None:
            pair = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            self._basic = b"Basic " + base64.b64encode(pair)
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[_Connection, None] = {}  # insertion order: newest last
        self._busy: set[_Connection] = set()
        self._ssl = tls  # None: the system's trust store, made at the first connection

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str],
                      read_timeout_s: float | None = None) -> Response:
        """Send `method base_path+path` with `body`; the response once its head arrived.
        `read_timeout_s`: this request's wait between two reads (default: the pool's)."""
        head = self._head(method, path, body, headers)
        timeout = read_timeout_s if read_timeout_s is not None else self.read_timeout_s
        await self._slots.acquire()
        try:
            conn = self._reuse()
            if conn is not None:
                try:
                    return await self._exchange(conn, head, body, timeout)
                except HTTPConnectionError:
                    if conn.received:
                        raise  # it answered something: not a connection closed while idle
            return await self._exchange(await self._connect(), head, body, timeout)
        except BaseException:
            self._slots.release()
            raise

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode("ascii"),
                 b"Host: " + self._host_header, b"Content-Length: %d" % len(body)]
        own_auth = False
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name.splitlines()[0][:40]!r}: a line break or colon")
            own_auth = own_auth or name.lower() == "authorization"
            lines.append(f"{name}: {value}".encode("latin-1"))
        if self._basic is not None and not own_auth:
            lines.append(b"Authorization: " + self._basic)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _reuse(self) -> _Connection | None:
        while self._idle:
            conn, _ = self._idle.popitem()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self._ssl if self.tls else None)
        except OSError as exc:  # refused, unreachable, name unknown, TLS refused
            raise HTTPConnectionError(f"cannot connect to {self.host}:{self.port}: "
                                      f"{type(exc).__name__}: {exc}", connected=False) from None
        return conn

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes,
                        read_timeout_s: float) -> Response:
        self._busy.add(conn)
        conn.reset()
        conn.busy = True
        try:
            assert conn.transport is not None
            conn.transport.write(head + body)
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(read_timeout_s)
        except BaseException:
            self._busy.discard(conn)
            conn.abort()
            raise
        return Response(self, conn, read_timeout_s)

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        conn.busy = False
        self._slots.release()
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self._idle[conn] = None
        else:
            conn.abort()

    def _forget(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)

    async def close(self) -> None:
        """Close every connection (idle and in use)."""
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        self._idle.clear()
        self._busy.clear()
        await asyncio.sleep(0)  # the transports' closing callbacks run
