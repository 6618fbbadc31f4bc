"""Dependency providers resolved inline (issue 16, the HTTP edge).

Litestar resolves a handler's dependencies in batches (those that need nothing else
first, then what depends on them) and runs each batch of two or more in an anyio task
group: a task per dependency, a cancel scope and a join, on every request. Our
providers are plain synchronous functions that read `app.state` or `request.user`
(`app.py`): they run to completion without yielding, so the tasks buy no concurrency,
and they cost about 10% of the orchestrator's CPU per chat call at 64 clients (py-spy:
`TaskGroup.start_soon` under `KwargsModel.resolve_dependencies`; `POST
/v1/chat/completions` has `caller`, `calls` and `idempotency`).

`inline_sync_dependencies` splits every batch into one batch per synchronous provider,
which Litestar resolves with a plain await, in the same order of levels; providers that
are coroutines (they may wait on I/O) keep their shared batch and its task group. What a
handler receives, the errors a provider raises and the OpenAPI document are unchanged.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.routes import HTTPRoute, WebSocketRoute


def _split(batches: list[set[Any]]) -> list[set[Any]]:
    out: list[set[Any]] = []
    for batch in batches:
        inline = [d for d in batch if d.provide.has_sync_callable]
        waiting = batch.difference(inline)
        out.extend({d} for d in inline)
        if waiting:
            out.append(waiting)
    return out


def inline_sync_dependencies(app: Litestar) -> Litestar:
    """Resolve synchronous providers without a task group, on every route (once, at build).
    This reaches into Litestar's resolved routes (2.x): a version laid out otherwise is
    left as it is (correct, only slower), never half changed."""
    models = []
    try:
        for route in app.routes:
            if isinstance(route, HTTPRoute):
                models += [model for _, model in route.route_handler_map.values()]
            elif isinstance(route, WebSocketRoute) and route.handler_parameter_model is not None:
                models.append(route.handler_parameter_model)
        split = [_split(model.dependency_batches) for model in models]
    except (AttributeError, TypeError, ValueError):
        return app
    for model, batches in zip(models, split):
        model.dependency_batches = batches
    return app
