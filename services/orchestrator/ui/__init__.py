"""The dashboard, served by the orchestrator at `/ui` (issue 15).

README: how the package is laid out and how to add a page
---------------------------------------------------------
* `pages.py`     the routes (Litestar controllers): pages, their `/ui/live/<page>` SSE
                 feeds, and the actions (HTML forms, POST only). Handlers stay a few
                 lines; they take `viewer: Viewer` (the logged-in `Caller`, its session
                 and CSRF token; a missing or revoked login redirects to `/ui/login`) and
                 `hub: LiveHub` as dependencies, and read the use cases from `state`
                 (`state.sessions`, `state.nodes`, `state.models`, `state.runs`, ...).
* `views.py`     what a page shows: one function per page gathering a dict from the use
                 cases and read models (no SQL here; a missing query goes into the read
                 model that owns the table).
* `templates/`   Jinja templates: `base.html` (layout, nav, htmx), `<page>.html` and its
                 live fragment `_<page>.html` (the same fragment is rendered in the page
                 and pushed by the SSE feed, so both always agree).
* `live.py`      `LiveHub`: one event-store follower per process plus node heartbeats;
                 `hub.changed(seen, timeout)` wakes feeds, `hub.subscribe()` gives events.
* `auth.py`      login cookie (signed, HttpOnly, SameSite=Strict; the key never in it;
                 revocation ends it) and CSRF tokens.
* `assets.py`    htmx + its SSE extension, pinned by npm `integrity`, fetched by
                 `nexus ui assets` into `<NEXUS_CACHE_DIR>/ui/` (not in the repository).

To add a page `foo`:
1. `views.foo(state, viewer.caller, ...) -> dict` using the existing use cases; scope
   every query by `viewer.caller.tenant` unless `viewer.platform` (another tenant's ids
   must be a 404 page: raise `PageError(404, ...)` or let `errors.NotFound` through).
2. In `PagesController`: `@get("/foo")` returning `page("foo", viewer, request, **ctx)`,
   and for live figures `@get("/live/foo")` returning
   `live(hub, "foo", fragment, every_s)` where `fragment()` renders `_foo.html`.
3. `templates/foo.html` extends `base.html`; its live part is
   `<div hx-ext="sse" sse-connect="/ui/live/foo" sse-swap="foo">{% include "_foo.html" %}</div>`.
4. Actions: `@post("/foo/{id}/bar")` with a `<form method="post">` carrying
   `<input type="hidden" name="csrf" value="{{ csrf }}">` (checked by `provide_viewer`);
   call the use case, then `back("/ui/foo", notice=...)` (a 303). Admin-only:
   `viewer.require_platform()` first.
5. Add the page to the nav in `base.html`, a check to tests/test_dashboard.py, a line to
   README's dashboard table.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.datastructures import State
from litestar.di import Provide
from litestar.template.config import TemplateConfig

from shared.contracts import errors
from services.orchestrator.ui.auth import UiAuth
from services.orchestrator.ui.live import LiveHub
from services.orchestrator.ui.pages_catalog import CatalogPages
from services.orchestrator.ui.pages_drain import DrainPages
from services.orchestrator.ui.pages_runs import RunPages
from services.orchestrator.ui.pages_sessions import SessionPages
from services.orchestrator.ui.pages import (
    LoginController,
    LoginRequired,
    PageError,
    PagesController,
    login_required,
    not_found,
    page_error,
    provide_hub,
    provide_viewer,
)

PREFIX = "/ui"
TEMPLATES = TemplateConfig(directory=Path(__file__).parent / "templates", engine=JinjaTemplateEngine)


def start(state: State, settings) -> None:
    """Wire the dashboard's state (in the orchestrator's lifespan, after the use cases)."""
    state.ui_auth = UiAuth(state.key_service, settings.admin_key, settings.ui_session_ttl_s)
    state.ui_hub = LiveHub(state.runtime.store, poll_s=settings.projection_poll_s)
    state.settings_cache_dir = settings.cache_dir
    state.nodes.heartbeat_listeners.append(state.ui_hub.on_heartbeat)


async def stop(state: State) -> None:
    if getattr(state, "ui_hub", None) is not None:
        await state.ui_hub.stop()


def router() -> Router:
    """Every dashboard route: outside the OpenAPI document, its own login (not the
    bearer middleware), its own error pages."""
    return Router(
        path="/", route_handlers=[LoginController, PagesController, SessionPages, RunPages,
                                  CatalogPages, DrainPages], include_in_schema=False,
        dependencies={"viewer": Provide(provide_viewer), "hub": Provide(provide_hub)},
        exception_handlers={LoginRequired: login_required, PageError: page_error,
                            errors.NotFound: not_found})
