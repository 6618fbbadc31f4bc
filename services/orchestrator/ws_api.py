"""`/v1/ws/sessions/{session_id}`: chat in a session over a WebSocket, and the session's
run events as they happen.

**Authentication**: the same API keys; `Authorization: Bearer <key>` on the upgrade
request, or, from a browser (which cannot set headers on a WebSocket), the subprotocol
`bearer.<key>` next to `nexus.v1`: `new WebSocket(url, ["nexus.v1", "bearer." + key])`.
The server accepts with `nexus.v1` (never echoing the key). No `?token=`: URLs reach
access logs and trace attributes. A missing or bad key refuses the upgrade (403); a
session that is not the caller's tenant's (or does not exist) is accepted and closed at
once with code 4404 (and a reason), the WebSocket's 404. The key is checked again
every `KEY_RECHECK_S` while the socket lives: revoked (or no longer valid) after the
upgrade, the socket is closed with code 1008 (policy violation) and a reason, within
that time plus the key cache's (`keys.CACHE_TTL_S`; at once on the orchestrator that
revoked it).

**Frames** (JSON text, one object each):

- client `{"type": "message", "content": "...", "model": "default", "max_tokens": N,
  "temperature": T}` (only `content` required): the same call as
  `POST /v1/sessions/{id}/messages` (policy, budget, history, the conversation
  recorded); the server answers `{"type": "delta", "content": "..."}` per token piece,
  then `{"type": "done", "call_id", "model", "provider", "finish_reason", "usage",
  "cost_usd"}`, or `{"type": "error", ...}`. One message at a time per socket: another
  while one is answered is an error frame (409), the first goes on.
- client `{"type": "cancel"}`: stops the message being answered (the upstream is
  cancelled, the budget settled); `{"type": "ping"}` -> `{"type": "pong"}`.
- `error` frames are problem-style: `status`, `type`, `title`, `detail`, and where it
  applies `errors: [{field, message}]` (a bad frame names the field: `content`,
  `type`, ...), `rule` (policy), `budget`. A bad frame never closes the socket.
- run events: every run of the session, live from the moment the socket opened
  (`RunService.follow_session`): `{"type": "run", "run_id", "kind": "event"|"delta",
  "event": <the event's type, or "delta">, "data": {...}, "version": <its place in the
  run's stream, null for a delta>}`. To resume one run without gaps after a reconnect,
  read `GET /v1/runs/{id}/stream` with `Last-Event-ID` (the last `version` seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from http import HTTPStatus
from typing import Annotated, Any, Literal

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import HTTPException, WebSocketDisconnect

from services.orchestrator.auth import TENANT_HEADER, bearer_key
from services.orchestrator.calls import CallInput, CallLifecycle
from services.orchestrator.problems import TYPE_BASE, Problem, problem_for
from services.orchestrator.schemas import MaxTokens
from services.orchestrator.sessions import SessionService
from shared.contracts.errors import NexusError
from shared.contracts.frames import Delta, Done
from shared.contracts.messages import ChatMessage
from shared.domain.budget import micro_to_usd

log = logging.getLogger("nexus.orchestrator.ws")

SUBPROTOCOL = "nexus.v1"
CLOSE_NOT_FOUND = 4404
CLOSE_POLICY_VIOLATION = 1008  # the key was revoked after the upgrade
KEY_RECHECK_S = 1.0
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"field `([^`]+)`")


class WsMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: Literal["message"]
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=1_000_000)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "default"
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None


class WsControl(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: Literal["cancel", "ping"]


def _error(status: int, slug: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "status": status, "problem": TYPE_BASE + slug,
            "title": HTTPStatus(status).phrase, "detail": detail, **extra}


def _field_error(detail: str, field: str) -> dict[str, Any]:
    return _error(400, "validation", f"{field}: {detail}",
                  errors=[{"field": field, "message": detail}])


def _problem_frame(exc: Exception) -> dict[str, Any]:
    problem = problem_for(exc) if isinstance(exc, NexusError) else exc
    if isinstance(problem, Problem):
        extra = {k: v for k, v in problem.extra_fields.items() if k != "type"}
        return _error(problem.status_code, problem.slug, problem.detail, **extra)
    assert isinstance(problem, HTTPException)
    return _error(problem.status_code, "http-error", problem.detail)


def decode_frame(raw: str | bytes) -> WsMessage | WsControl | dict[str, Any]:
    """A client frame, or the error frame naming what is wrong with it."""
    try:
        head = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _field_error("not a JSON object", "body")
    if not isinstance(head, dict):
        return _field_error("not a JSON object", "body")
    kind = head.get("type")
    if kind not in ("message", "cancel", "ping"):
        return _field_error("expected 'message', 'cancel' or 'ping'", "type")
    try:
        return msgspec.convert(head, WsMessage if kind == "message" else WsControl)
    except msgspec.ValidationError as exc:
        message = str(exc)
        named, path = _FIELD.search(message), _PATH.search(message)  # missing/unknown, or where
        field = named.group(1) if named else path.group(1) if path and path.group(1) else "body"
        return _field_error(message.split(" - at ")[0], field)


class SessionSocket:
    """One socket: the receive loop, at most one message answered at a time, the run
    events forwarded meanwhile; every send goes through one lock."""

    def __init__(self, socket: WebSocket, caller: Any, session_id: str,
                 calls: CallLifecycle) -> None:
        self.socket = socket
        self.caller = caller
        self.session_id = session_id
        self.calls = calls
        self._send_lock = asyncio.Lock()
        self.answering: asyncio.Task[None] | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.socket.send_data(msgspec.json.encode(frame).decode(), mode="text")

    async def answer(self, message: WsMessage) -> None:
        call_input = CallInput(session_id=self.session_id, model=message.model,
                               with_history=True,
                               messages=(ChatMessage(role="user", content=message.content),),
                               max_tokens=message.max_tokens, temperature=message.temperature)
        try:
            call = await self.calls.open(self.caller, call_input)
        except (NexusError, HTTPException) as exc:
            await self.send(_problem_frame(exc))
            return
        try:
            async for frame in call.frames():
                if isinstance(frame, Delta):
                    if frame.content:
                        await self.send({"type": "delta", "content": frame.content})
                elif isinstance(frame, Done):
                    await self.send({
                        "type": "done", "call_id": call.call_id, "model": frame.model,
                        "provider": frame.provider, "finish_reason": frame.finish_reason,
                        "usage": {"prompt_tokens": frame.usage.input_tokens,
                                  "completion_tokens": frame.usage.output_tokens,
                                  "total_tokens": frame.usage.input_tokens + frame.usage.output_tokens},
                        "cost_usd": micro_to_usd(frame.cost_micro_usd)})
                else:
                    await self.send(_error(502, "upstream-failed", f"{frame.error}: {frame.detail}",
                                           call_id=call.call_id, error=frame.error))
        except (NexusError, HTTPException) as exc:
            await self.send(_problem_frame(exc))
        finally:
            await call.aclose()  # cancelled or done: the upstream stops, the budget settles

    async def forward_runs(self, runs: Any) -> None:
        try:
            async for item in runs.follow_session(self.caller, self.session_id):
                await self.send({"type": "run", "run_id": item.run_id, "kind": item.kind,
                                 "event": item.type, "data": msgspec.to_builtins(item.data),
                                 "version": item.version})
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:  # the chat goes on; the client can still follow a run over SSE
            log.exception("forwarding run events failed", extra={"session_id": self.session_id})
            with contextlib.suppress(Exception):
                await self.send(_error(503, "run-events-unavailable",
                                       "run events stopped; follow a run at GET /v1/runs/{id}/stream"))

    async def receive_loop(self) -> None:
        while True:
            raw = await self.socket.receive_data(mode="text")
            frame = decode_frame(raw)
            if isinstance(frame, dict):
                await self.send(frame)
            elif isinstance(frame, WsControl) and frame.type == "ping":
                await self.send({"type": "pong"})
            elif isinstance(frame, WsControl):  # cancel
                if self.answering is not None and not self.answering.done():
                    self.answering.cancel()
            elif self.answering is not None and not self.answering.done():
                await self.send(_error(409, "busy", "a message is being answered; wait for its "
                                       "done or error frame, or send {\"type\": \"cancel\"}"))
            else:
                self.answering = asyncio.create_task(self._answer_logged(frame))

    async def _answer_logged(self, message: WsMessage) -> None:
        try:
            await self.answer(message)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("websocket message failed", extra={"session_id": self.session_id})
            with contextlib.suppress(Exception):
                await self.send(_error(500, "internal", "internal error; see logs by trace_id"))


async def key_revoked(socket: WebSocket) -> str:
    """Returns (a reason) once the key the socket was opened with stops authenticating."""
    keys = socket.app.state.key_service
    key, tenant = bearer_key(socket), socket.headers.get(TENANT_HEADER)
    while True:
        await asyncio.sleep(KEY_RECHECK_S)
        try:
            caller = await keys.authenticate(key, tenant)
        except Exception:  # the database is away: judge again at the next check
            log.warning("could not check a websocket's key", exc_info=True)
            continue
        if caller is None:
            return "the API key was revoked"


@websocket("/v1/ws/sessions/{session_id:str}")
async def session_socket(socket: WebSocket, session_id: str) -> None:
    """Chat in a session over a WebSocket (see the module's docstring)."""
    state = socket.app.state
    sessions: SessionService = state.sessions
    offered = [p.strip() for p in socket.headers.get("sec-websocket-protocol", "").split(",")]
    await socket.accept(subprotocols=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    caller = socket.user
    try:
        await sessions.require(caller, session_id)
    except HTTPException:  # another tenant's session, or none: the same answer
        await socket.close(code=CLOSE_NOT_FOUND, reason=f"session {session_id!r} not found")
        return
    conn = SessionSocket(socket, caller, session_id, state.calls)
    tasks = []
    runs = getattr(state, "runs", None)
    if runs is not None:  # the session's runs, live, beside the chat
        tasks.append(asyncio.create_task(conn.forward_runs(runs)))
    receiving = asyncio.create_task(conn.receive_loop())
    revoked = asyncio.create_task(key_revoked(socket))
    tasks.append(revoked)
    try:
        await asyncio.wait((receiving, revoked), return_when=asyncio.FIRST_COMPLETED)
        if revoked.done() and not revoked.cancelled() and revoked.exception() is None:
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
            with contextlib.suppress(Exception):
                await socket.close(code=CLOSE_POLICY_VIOLATION, reason=revoked.result())
        else:
            with contextlib.suppress(WebSocketDisconnect):
                await receiving
    finally:
        if not receiving.done():
            tasks.append(receiving)
        if conn.answering is not None:
            tasks.append(conn.answering)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
