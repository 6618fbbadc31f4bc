"""The dashboard's routes: pages, their live SSE feeds and the actions (forms).

Every handler is a few lines: `viewer` (the logged-in caller, from the cookie) and the
use cases come in as dependencies, `views.py` gathers what a page shows, a template
renders it. Actions check the CSRF token first and call the same use cases as the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie, State
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import File, Redirect, Stream, Template

from shared.contracts import errors
from services.orchestrator.keys import Caller
from services.orchestrator.ui import assets, views
from services.orchestrator.ui.auth import COOKIE, CSRF_FIELD, CSRF_HEADER, UiAuth, UiSession, is_https
from services.orchestrator.ui.live import LiveHub

STATIC = Path(__file__).parent / "static"
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
KEEPALIVE_S = 15.0


class LoginRequired(Exception):
    """No valid session: pages redirect to the login form, feeds and actions answer 401."""


class PageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Viewer:
    caller: Caller
    session: UiSession
    csrf: str

    @property
    def platform(self) -> bool:
        return self.caller.role == "platform"

    def require_platform(self) -> None:
        if not self.platform:
            raise PageError(403, "This page needs the platform admin key.")


async def provide_viewer(request: Request, state: State) -> Viewer:
    auth: UiAuth = state.ui_auth
    found = await auth.viewer(request.cookies.get(COOKIE))
    if found is None:
        raise LoginRequired()
    caller, session = found
    viewer = Viewer(caller, session, auth.csrf(session))
    if request.method not in ("GET", "HEAD"):
        token = request.headers.get(CSRF_HEADER) or (await request.form()).get(CSRF_FIELD)
        if not auth.csrf_ok(session, token):
            raise PageError(403, "The form's CSRF token is missing or wrong: reload the page.")
    return viewer


async def provide_hub(state: State) -> LiveHub:
    hub: LiveHub = state.ui_hub
    await hub.ensure_started()
    return hub


def page(name: str, viewer: Viewer, request: Request, **context: Any) -> Template:
    return Template(f"{name}.html", context=dict(
        viewer=viewer.caller, csrf=viewer.csrf, page=name, platform=viewer.platform,
        assets_ok=not assets.missing(request.app.state.settings_cache_dir),
        flash_notice=request.query_params.get("notice", ""),
        flash_error=request.query_params.get("error", ""),
        **context))


def render(request: Request, template: str, **context: Any) -> str:
    return request.app.template_engine.get_template(template).render(**context)


def sse(event: str, html: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in html.splitlines() or [""])
    return f"event: {event}\n{lines}\n".encode()


def live(hub: LiveHub, event: str, fragment: Callable[[], Awaitable[str]], every_s: float) -> Stream:
    """An SSE feed that sends `fragment()` whenever it changes: re-rendered when the hub
    moves (an event appended, a heartbeat) or every `every_s` (rates, progress)."""
    async def feed() -> AsyncIterator[bytes]:
        last, seen, quiet = None, -1, 0.0
        while True:
            html = await fragment()
            if html != last:
                yield sse(event, html)
                last, quiet = html, 0.0
            elif quiet >= KEEPALIVE_S:
                yield b": keepalive\n\n"
                quiet = 0.0
            before = asyncio.get_running_loop().time()
            seen = await hub.changed(seen, every_s)
            await asyncio.sleep(0.1)  # coalesce bursts (a busy log) into one render
            quiet += asyncio.get_running_loop().time() - before
    return Stream(feed(), media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def back(path: str, *, notice: str = "", error: str = "") -> Redirect:
    from urllib.parse import urlencode
    query = urlencode({k: v for k, v in (("notice", notice), ("error", error)) if v})
    return Redirect(f"{path}?{query}" if query else path, status_code=303)


class LoginController(Controller):
    path = "/ui"

    @get("/login")
    async def login_form(self, request: Request) -> Template:
        return Template("login.html", context=dict(error="", page="login", viewer=None))

    @post("/login")
    async def login(self, request: Request, state: State, data: Form) -> Response:
        cookie = await state.ui_auth.login(data.get("key", ""))
        if cookie is None:
            return Template("login.html", status_code=401, context=dict(
                page="login", viewer=None, error="That key is not valid (wrong, or revoked)."))
        return Redirect("/ui/", status_code=303, cookies=[Cookie(
            key=COOKIE, value=cookie, path="/ui", httponly=True, samesite="strict",
            secure=is_https(request), max_age=int(state.ui_auth.ttl_s))])

    @get("/assets/{name:str}")
    async def asset(self, name: str, state: State) -> File:
        asset = assets.BY_NAME.get(name)
        if asset is None or not assets.asset_path(state.settings_cache_dir, asset).is_file():
            raise PageError(404, f"no asset {name!r} (run `nexus ui assets`)")
        return File(assets.asset_path(state.settings_cache_dir, asset),
                    media_type="text/javascript", content_disposition_type="inline",
                    headers={"Cache-Control": "public, max-age=86400"})

    @get("/static/nexus.css")
    async def css(self) -> File:
        return File(STATIC / "nexus.css", media_type="text/css", content_disposition_type="inline")


class PagesController(Controller):
    path = "/ui"

    @get("/")
    async def overview(self, request: Request, state: State, viewer: Viewer, hub: LiveHub) -> Template:
        return page("overview", viewer, request, o=await views.overview(state, hub, viewer.caller))

    @get("/live/overview", media_type="text/event-stream")
    async def overview_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub) -> Stream:
        async def fragment() -> str:
            return render(request, "_overview.html", o=await views.overview(state, hub, viewer.caller))
        return live(hub, "overview", fragment, 1.0)

    @post("/logout")
    async def logout(self, viewer: Viewer) -> Response:
        return Redirect("/ui/login", status_code=303, cookies=[Cookie(
            key=COOKIE, value="", path="/ui", httponly=True, samesite="strict", max_age=0)])

    @get("/nodes")
    async def nodes(self, request: Request, state: State, viewer: Viewer, hub: LiveHub) -> Template:
        return page("nodes", viewer, request, nodes=await views.nodes(state, hub))

    @get("/live/nodes", media_type="text/event-stream")
    async def nodes_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub) -> Stream:
        async def fragment() -> str:
            return render(request, "_nodes.html", nodes=await views.nodes(state, hub),
                          platform=viewer.platform, csrf=viewer.csrf)
        return live(hub, "nodes", fragment, 1.0)

    @post("/nodes/{node_id:str}/deregister")
    async def deregister(self, node_id: str, state: State, viewer: Viewer) -> Redirect:
        viewer.require_platform()
        if not await state.nodes.deregister(node_id, actor=viewer.caller.actor):
            raise PageError(404, f"node {node_id!r} not found")
        return back("/ui/nodes", notice=f"node {node_id} deregistered")

    @get("/models")
    async def models(self, request: Request, state: State, viewer: Viewer) -> Template:
        viewer.require_platform()
        return page("models", viewer, request, m=await views.models(state))

    @get("/live/models", media_type="text/event-stream")
    async def models_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub) -> Stream:
        viewer.require_platform()

        async def fragment() -> str:
            return render(request, "_models.html", m=await views.models(state), csrf=viewer.csrf)
        return live(hub, "models", fragment, 0.5)

    @post("/models/distribute")
    async def distribute(self, state: State, viewer: Viewer, data: Form) -> Redirect:
        viewer.require_platform()
        node = data.get("node_id", "")
        try:
            tasks = await state.models.distribute(
                data.get("model", ""), "specific" if node else "all", (node,) if node else (),
                actor=viewer.caller.actor)
        except (errors.NotFound, errors.PlacementRefused, errors.InvalidRequest) as exc:
            return back("/ui/models", error=str(exc))
        views.forget_catalogue()
        return back("/ui/models", notice=f"{len(tasks)} download task(s) started")

    @post("/tasks/{task_id:str}/cancel")
    async def cancel(self, task_id: str, state: State, viewer: Viewer) -> Redirect:
        viewer.require_platform()
        await state.models.cancel(task_id, viewer.caller.actor)
        return back("/ui/models", notice=f"task {task_id} cancelled")

    @get("/events")
    async def events(self, request: Request, state: State, viewer: Viewer, hub: LiveHub,
                     stream: str = "", event_type: Annotated[str, Parameter(query="type")] = "",
                     trace_id: str = "") -> Template:
        rows = [views.event_row(rec, state.runtime.settings) for rec in reversed(hub.tail)
                if views.visible(rec, viewer.caller) and views.matches(rec, stream, event_type, trace_id)]
        return page("events", viewer, request, rows=rows[:100], stream=stream, type=event_type,
                    trace_id=trace_id, grafana=bool(state.runtime.settings.grafana_url))

    @get("/live/events", media_type="text/event-stream")
    async def events_live(self, request: Request, state: State, viewer: Viewer, hub: LiveHub,
                          stream: str = "", event_type: Annotated[str, Parameter(query="type")] = "",
                          trace_id: str = "") -> Stream:
        settings = state.runtime.settings

        async def feed() -> AsyncIterator[bytes]:
            sub = hub.subscribe()
            try:
                while True:
                    try:
                        rec = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield b": keepalive\n\n"
                        continue
                    if sub.lagged:
                        sub.lagged = False
                        yield sse("notice", "Some events were skipped (this page fell behind).")
                    if views.visible(rec, viewer.caller) and views.matches(rec, stream, event_type, trace_id):
                        yield sse("event", render(request, "_event.html", e=views.event_row(rec, settings)))
            finally:
                hub.unsubscribe(sub)
        return Stream(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # one session's page: pages_sessions.py (SessionPages)


def login_required(request: Request, _: LoginRequired) -> Response:
    if request.method == "GET" and not request.url.path.startswith("/ui/live/"):
        return Redirect("/ui/login", status_code=303)
    return Response("login required", status_code=401, media_type="text/plain")


def page_error(request: Request, exc: PageError) -> Response:
    return Template("error.html", status_code=exc.status, context=dict(
        page="error", viewer=None, status=exc.status, message=str(exc)))


def not_found(request: Request, exc: errors.NotFound) -> Response:
    return page_error(request, PageError(404, str(exc)))
