"""uvicorn's HTTP/1.1 protocol (httptools), sending a response's head with its body.

uvicorn writes a response's status line and headers as soon as the app sends
`http.response.start`, and its body at `http.response.body`: two sends on the socket,
two TCP segments, and a client that may wake twice, for every response (issue 16: the
writes were about 6% of the orchestrator's CPU at 64 clients). Here the head is held
back and leaves with the write that follows it: a whole response (Litestar sends its
start and its body in one turn of the loop) goes out in one send. A head that no write
follows in the same turn (a stream waiting for its first event) leaves at the end of
that turn, so nothing waits longer than the turn it was written in, and the order of
the bytes on the connection never changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadWithBody:
    """The connection's transport, holding back the next write once asked
    (`hold_next`) until the write after it, or the end of the loop's turn."""

    __slots__ = ("inner", "_loop", "_hold", "_held")

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = inner
        self._loop = loop
        self._hold = False
        self._held: bytes | None = None

    def hold_next(self) -> None:
        self._hold = True

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.inner.write(held + data)
        elif self._hold:
            self._hold = False
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self.inner.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.inner.write(held)

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self.inner, name)


class OneSendHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose responses' heads leave with their bodies (module doc);
    pass it to `uvicorn.Config(http=...)`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadWithBody(transport, self.loop)  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:  # not an upgrade
            self.transport.hold_next()  # type: ignore[attr-defined]

    def handle_websocket_upgrade(self) -> None:
        joined = self.transport
        if isinstance(joined, _HeadWithBody):  # the WebSocket protocol takes the socket
            joined.flush()
            self.transport = joined.inner
        super().handle_websocket_upgrade()
