"""The Nodes page's drain / resume buttons (the platform admin's): the same use case as
`POST /v1/nodes/{id}/drain` and `/undrain` (`NodeService.drain`)."""

from __future__ import annotations

from litestar import Controller, post
from litestar.datastructures import State
from litestar.response import Redirect

from shared.contracts import errors
from services.orchestrator.ui.pages import PageError, Viewer, back


class DrainPages(Controller):
    path = "/ui"

    @post("/nodes/{node_id:str}/drain")
    async def drain(self, node_id: str, state: State, viewer: Viewer) -> Redirect:
        return await _drain(state, viewer, node_id, True)

    @post("/nodes/{node_id:str}/undrain")
    async def undrain(self, node_id: str, state: State, viewer: Viewer) -> Redirect:
        return await _drain(state, viewer, node_id, False)


async def _drain(state: State, viewer: Viewer, node_id: str, drain: bool) -> Redirect:
    viewer.require_platform()
    try:
        await state.nodes.drain(node_id, drain, actor=viewer.caller.actor)
    except errors.NotFound as exc:
        raise PageError(404, str(exc)) from None
    except errors.Conflict as exc:
        return back("/ui/nodes", error=str(exc))
    return back("/ui/nodes", notice=f"node {node_id} {'draining' if drain else 'resumed'}")
