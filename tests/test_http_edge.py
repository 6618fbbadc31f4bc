"""The HTTP edge (issue 16): synchronous dependency providers resolve without a task group,
and what handlers receive is unchanged (services/orchestrator/dependencies.py); a
response's head leaves with its body (shared/infra/http_protocol.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, get
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException
from litestar.routes import HTTPRoute, WebSocketRoute
from litestar.testing import TestClient

from services.orchestrator.app import create_app
from services.orchestrator.dependencies import inline_sync_dependencies
from shared.infra.http_protocol import OneSendHttpProtocol, _HeadWithBody
from shared.infra.settings import get_settings


def _batches(app: Litestar, path: str, method: str = "GET") -> list[list[str]]:
    route = next(r for r in app.routes if r.path == path)
    assert isinstance(route, HTTPRoute)
    model = route.route_handler_map[method][1]
    return [sorted(d.key for d in batch) for batch in model.dependency_batches]


def test_the_orchestrator_resolves_no_sync_provider_in_a_task_group() -> None:
    app = create_app(get_settings())
    assert sorted(_batches(app, "/v1/models", "GET")) == [["caller"], ["calls"]]
    # the LLM call routes resolve none: they read their caller and services directly
    assert _batches(app, "/v1/chat/completions", "POST") == []
    assert _batches(app, "/v1/sessions/{session_id:str}/messages", "POST") == []
    shared = 0
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            models = [model for _, model in route.route_handler_map.values()]
        elif isinstance(route, WebSocketRoute):
            models = [route.handler_parameter_model]
        else:
            continue
        for model in models:
            for batch in model.dependency_batches:
                if len(batch) > 1:  # a task group: only for providers that may wait on I/O
                    shared += 1
                    assert not any(d.provide.has_sync_callable for d in batch), route.path
    assert shared  # the dashboard's async providers (viewer, hub) still share a batch


def _app() -> Litestar:
    def one() -> int:
        return 1

    def two() -> int:
        return 2

    async def three() -> int:
        return 3

    async def four() -> int:
        return 4

    def total(one: int, three: int) -> int:  # a second level: after what it needs
        return one + three

    def refuse() -> int:
        raise NotAuthorizedException("no")

    @get("/sum", sync_to_thread=False)
    def summed(one: int, two: int, three: int, four: int, total: int) -> dict[str, int]:
        return {"one": one, "two": two, "three": three, "four": four, "total": total}

    @get("/refused", sync_to_thread=False)
    def refused(one: int, refuse: int) -> int:
        return refuse

    sync = {name: Provide(fn, sync_to_thread=False)
            for name, fn in (("one", one), ("two", two), ("total", total), ("refuse", refuse))}
    return Litestar([summed, refused], dependencies={
        **sync, "three": Provide(three), "four": Provide(four)})


def test_the_split_keeps_levels_values_and_errors() -> None:
    plain, inlined = _app(), inline_sync_dependencies(_app())
    assert _batches(plain, "/sum") == [["four", "one", "three", "two"], ["total"]]
    assert _batches(inlined, "/sum")[2:] == [["four", "three"], ["total"]]
    assert sorted(_batches(inlined, "/sum")[:2]) == [["one"], ["two"]]
    for app in (plain, inlined):
        with TestClient(app) as client:
            assert client.get("/sum").json() == {"one": 1, "two": 2, "three": 3, "four": 4,
                                                 "total": 4}
            refused = client.get("/refused")
            assert (refused.status_code, refused.json()["detail"]) == (401, "no")


# -- a response's head leaves with its body (shared/infra/http_protocol.py) ----------------


class _Recording(asyncio.Transport):
    """A transport that records what is sent on it, one entry per send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True


async def test_a_held_head_leaves_with_the_write_after_it() -> None:
    inner = _Recording()
    joined = _HeadWithBody(inner, asyncio.get_running_loop())
    joined.hold_next()
    joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert inner.sent == []
    joined.write(b"{}")
    assert inner.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    joined.write(b"next")  # not held: nothing asked for it
    assert inner.sent[1:] == [b"next"]
    await asyncio.sleep(0)  # the turn's end finds nothing held
    assert len(inner.sent) == 2


async def test_a_head_with_no_write_after_it_leaves_at_the_end_of_the_turn() -> None:
    inner = _Recording()
    joined = _HeadWithBody(inner, asyncio.get_running_loop())
    joined.hold_next()
    joined.write(b"head")
    await asyncio.sleep(0)
    assert inner.sent == [b"head"]
    joined.hold_next()
    joined.write(b"second head")
    joined.close()  # what is held leaves before the connection closes
    assert (inner.sent[1:], inner.closed) == ([b"second head"], True)


async def _serve(app: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=OneSendHttpProtocol,
                            log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, port


async def test_whole_and_streamed_responses_over_the_protocol() -> None:
    """Whole responses on one kept-alive connection, and a stream whose head reaches the
    client before its first event (the head is not held for the body)."""
    first_event = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await first_event.wait()
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    server, task, port = await _serve(app)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for n in range(3):
                answer = await client.post("/echo", content=b"x" * n * 1000)
                assert (answer.status_code, answer.content) == (200, b"x" * n * 1000)
            async with client.stream("GET", "/stream") as streamed:
                assert streamed.status_code == 200  # the head came before any event (else: a
                # read timeout, the event being sent only after this line)
                first_event.set()
                assert [line async for line in streamed.aiter_lines() if line] == ["data: 1"]
    finally:
        server.should_exit = True
        await task
