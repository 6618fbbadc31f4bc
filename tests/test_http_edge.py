"""The HTTP edge (issue 16): synchronous dependency providers resolve without a task group,
and what handlers receive is unchanged (services/orchestrator/dependencies.py)."""

from __future__ import annotations

from litestar import Litestar, get
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException
from litestar.routes import HTTPRoute, WebSocketRoute
from litestar.testing import TestClient

from services.orchestrator.app import create_app
from services.orchestrator.dependencies import inline_sync_dependencies
from shared.infra.settings import get_settings


def _batches(app: Litestar, path: str, method: str = "GET") -> list[list[str]]:
    route = next(r for r in app.routes if r.path == path)
    assert isinstance(route, HTTPRoute)
    model = route.route_handler_map[method][1]
    return [sorted(d.key for d in batch) for batch in model.dependency_batches]


def test_the_orchestrator_resolves_no_sync_provider_in_a_task_group() -> None:
    app = create_app(get_settings())
    assert sorted(_batches(app, "/v1/chat/completions", "POST")) == [["caller"], ["calls"],
                                                                      ["idempotency"]]
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
