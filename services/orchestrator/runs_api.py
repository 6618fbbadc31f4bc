"""Agent runs over HTTP: start one in a session, read, list, cancel, answer an approval,
follow its stream (SSE). Thin handlers over `RunService`; another tenant's run or
session is a 404."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter
from litestar.response import Stream

from services.orchestrator import idempotency as idem
from services.orchestrator.auth import require_admin
from services.orchestrator.keys import Caller
from services.orchestrator.problems import problem_for
from services.orchestrator.runs import RunItem, RunService
from services.orchestrator.schemas import RunApprovalIn, RunCancelIn, RunIn, RunList, RunOut
from shared.contracts.errors import NexusError

LastEventId = Annotated[int | None, HeaderParameter(
    name="last-event-id", ge=0, le=2**31,
    description="resume after this event (the `id` of the last event received)")]


async def _edge(work: Any) -> Any:
    try:
        return await work
    except NexusError as exc:
        raise problem_for(exc) from None


def sse(item: RunItem) -> bytes:
    """One SSE event: recorded events carry their version as `id` (for Last-Event-ID)."""
    data = json.dumps({"run_id": item.run_id, "type": item.type, **({"version": item.version}
                                                                   if item.version else {}),
                       "data": item.data}, separators=(",", ":"), default=str)
    head = f"id: {item.version}\n" if item.version is not None else ""
    return f"{head}event: {item.type}\ndata: {data}\n\n".encode()


class SessionRunsController(Controller):
    path = "/v1/sessions/{session_id:str}/runs"

    @post("/", status_code=202, responses=idem.RESPONSES)
    async def start_run(self, request: Request, session_id: str, data: RunIn, caller: Caller,
                        run_service: RunService, idempotency: idem.IdempotencyStore,
                        idempotency_key: idem.KeyHeader = None) -> Response[RunOut]:
        """Start a run of an agent on a task; it runs in the background (202)."""
        async def run() -> idem.Recorded:
            out = await run_service.start(caller, session_id, data.agent, data.input, data.model)
            return idem.Recorded.json(out, status=202)

        return await idem.run_once(request, caller.tenant, idempotency,  # type: ignore[return-value]
                                   lambda: _edge(run()))

    @get("/")
    async def list_runs(self, session_id: str, caller: Caller, run_service: RunService) -> RunList:
        return RunList(runs=await run_service.of_session(caller, session_id))


class RunsController(Controller):
    path = "/v1/runs/{run_id:str}"

    @get("/")
    async def get_run(self, run_id: str, caller: Caller, run_service: RunService) -> RunOut:
        """The run's state, steps, tool calls, cost so far and pending approvals."""
        return await run_service.get(caller, run_id)

    @post("/cancel", status_code=200)
    async def cancel_run(self, run_id: str, caller: Caller, run_service: RunService,
                         data: RunCancelIn | None = None) -> RunOut:
        return await run_service.cancel(caller, run_id, (data or RunCancelIn()).reason)

    @post("/approvals", status_code=200)
    async def answer_run_approval(self, run_id: str, data: RunApprovalIn, caller: Caller,
                                  run_service: RunService) -> RunOut:
        """Approve or reject a tool call the run waits on (admin); the run resumes."""
        require_admin(caller)
        return await run_service.answer(caller, run_id, data.tool_call_id,
                                        data.decision == "approve", data.reason)

    @get("/stream", responses={200: ResponseSpec(None, description=(
            "text/event-stream: each event of the run (`id`: its version), text deltas "
            "(`event: delta`) as generated; ends after the run's last event"),
            media_type="text/event-stream")})
    async def stream_run(self, run_id: str, caller: Caller, run_service: RunService,
                         last_event_id: LastEventId = None) -> Stream:
        """The run as it happens (SSE); `Last-Event-ID` resumes after that event."""
        await run_service.get(caller, run_id)  # 404 before the stream starts

        async def chunks() -> AsyncIterator[bytes]:
            async for item in run_service.follow(caller, run_id, after=last_event_id or 0):
                yield sse(item)

        return Stream(chunks(), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache"})
