"""Tools, the use cases: define, list, invoke (decide -> node -> sandbox), approve.

Entry points (the HTTP routes in `tools_api.py`, the MCP gateway and the agent runner
call these; they raise domain errors, `shared.contracts.errors`, never HTTP ones):

    tools = app.state.tools                                  # a ToolService
    await tools.define(caller, spec, expected_version=None) -> ToolOut
    await tools.list(caller) -> list[ToolOut]                # builtins, tenant tools, MCP tools
    await tools.get(caller, name) -> ToolOut                 # NotFound
    await tools.invoke(caller, session_id, name, arguments, run_id=None) -> ToolCallView
    await tools.answer_approval(caller, session_id, call_id, approve=True, reason="") -> ToolCallView
    await tools.call(caller, session_id, call_id) -> ToolCallView
    tools.mcp_source = <McpToolSource>                       # the MCP servers' tools, per tenant

`invoke` answers the call's view: `status` "finished" (the tool ran to its end; its
`is_error` says whether it reported a failure), "failed" (`error` names why: timeout,
memory, cpu, node_lost, sandbox_error, ...) or "pending_approval" (the caller answers
202; a human approves or rejects with `answer_approval`). It raises `InvalidEntity`
(arguments failing the schema: 422, the denial recorded), `PolicyDenied` (403, 429 for
a rate limit), `NotFound` (session, tool), `SessionClosed`, `NoNodeAvailable` (no node
or every picked node overloaded: 503, recorded as ToolCallFailed no_node/overloaded).

Events, all on `toolcall-<id>`: `ToolCallRequested` + `ToolCallDecided` (+ for an
allowed call `ToolCallStarted` naming the node, or `ToolCallFailed` for a denial or no
node) in one transaction together with the rate-limit slots; then `ToolCallFinished` or
`ToolCallFailed` from the node's answer. The node is reached with `StreamReceiver` on
`nexus.node.<id>.tool`; a node that stops sending (killed) is noticed within the idle
timeout (about the heartbeat timeout) and the call ends `ToolCallFailed(node_lost)`.
Secret values (HTTP tool and MCP headers) are opened only into that one request, and
scrubbed from the output before it is recorded or answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.contracts import subjects
from shared.contracts.errors import (
    Conflict,
    InvalidEntity,
    NoNodeAvailable,
    NotFound,
    PolicyDenied,
    SessionClosed,
)
from shared.contracts.events import (
    Metadata,
    ToolCallApprovalGiven,
    ToolCallDecided,
    ToolCallFailed,
    ToolCallFinished,
    ToolCallRequested,
    ToolCallStarted,
    ToolDefined,
    tool_stream,
    toolcall_stream,
)
from shared.contracts.frames import Failed, ToolDone
from shared.contracts.messages import ToolExecRequest
from shared.domain.nodes import NodeView
from shared.domain.selection import NoEligibleNode, NodeSelector, score
from shared.domain.tools import (
    BUILTINS,
    ToolSpec,
    ToolVerdict,
    builtin_spec,
    decide_tool_call,
    decode_spec,
    exec_network,
)
from shared.infra.eventstore import EventStore, ProjectionRunner, WrongExpectedVersion
from shared.infra.messaging import Bus, MessagingError, NoResponders, RequestTimeout
from shared.infra.metrics import histogram, summed_counter
from shared.infra.streaming import KEEPALIVE_S, RemoteStreamError, StreamReceiver
from shared.infra.tracing import tracer
from services.orchestrator.joint import Rider, append_joint
from services.orchestrator.keys import Caller
from services.orchestrator.policies import PolicyService
from services.orchestrator.ratelimits import RateCounter, RateLimited
from services.orchestrator.read_models.tools import ToolsReadModel
from services.orchestrator.schemas import ToolCallView, ToolOut
from services.orchestrator.secrets import SecretStore
from services.orchestrator.sessions import SessionService

log = logging.getLogger("nexus.orchestrator.tools")

EVENT_OUTPUT_CAP = 64 * 1024  # output kept in ToolCallFinished (the answer has all of it)
# reasons a node may name in `Failed.error`; anything else is recorded as sandbox_error
NODE_REASONS = frozenset({"timeout", "memory", "cpu", "output", "killed", "sandbox_error",
                          "invalid_arguments", "upstream_error", "network_denied",
                          "not_found", "permission", "quota", "workspace_unavailable",
                          "cancelled", "overloaded",
                          "node_lost"})  # the last one the orchestrator's own (node gone)
_RETRY_ELSEWHERE = frozenset({"overloaded"})  # the tool never started: safe to say 503


class ToolCallMetrics:
    """Orchestrator side of tool calls (the node counts its executions itself):
    every call's outcome (`ok`, `error`, `denied`, `rate_limited`, `pending_approval`,
    `rejected`, `no_node`, `node_lost`, `timeout`, ...) and its end-to-end duration.
    `gen_ai.tool.name` is the builtin's name, or the kind (`http`, `mcp`) of a tenant's
    own tool: bounded."""

    def __init__(self) -> None:
        self._calls = summed_counter("nexus.tool.call.outcomes", unit="{call}",
                                     description="Tool calls by tool and outcome (orchestrator)")
        self._duration = histogram("nexus.tool.call.duration", unit="s",
                                   description="Tool calls from dispatch to their end")

    def count(self, tool: str, outcome: str) -> None:
        self._calls.add(1, {"gen_ai.tool.name": tool, "outcome": outcome})

    def took(self, tool: str, outcome: str, seconds: float) -> None:
        self._duration.record(seconds, {"gen_ai.tool.name": tool, "outcome": outcome})


class McpToolSource(Protocol):
    """The tools of a tenant's registered MCP servers (`mcp.<server>.<tool>`), each with
    its server's version; `ToolSpec.kind` "mcp" with its `mcp` target."""

    async def tools(self, tenant: str) -> list[tuple[ToolSpec, int]]: ...


class NoMcpServers:
    async def tools(self, tenant: str) -> list[tuple[ToolSpec, int]]:
        return []


def _tool_out(spec: ToolSpec, version: int, source: str) -> ToolOut:
    return ToolOut(name=spec.name, description=spec.description, parameters=spec.parameters,
                   kind=spec.kind, builtin=spec.builtin, source=source, version=version,
                   permissions=msgspec.to_builtins(spec.permissions),
                   limits=msgspec.to_builtins(spec.limits), needs_approval=spec.needs_approval,
                   effect=spec.effect,
                   http=msgspec.to_builtins(spec.http) if spec.http else None,
                   mcp=msgspec.to_builtins(spec.mcp) if spec.mcp else None,
                   node_labels=dict(spec.node_labels))


def metric_label(spec: ToolSpec) -> str:
    """A bounded label: the builtin a tool runs, or its kind (tenant names are unbounded)."""
    return spec.target if spec.kind == "builtin" else spec.kind


def _scrub(text: str, secrets: dict[str, str]) -> str:
    for name, value in secrets.items():
        if len(value) >= 4 and value in text:
            text = text.replace(value, f"[secret:{name}]")
    return text


class ToolService:
    def __init__(self, store: EventStore, runner: ProjectionRunner, bus: Bus,
                 sessions: SessionService, policies: PolicyService, secrets: SecretStore,
                 rates: RateCounter, selector: NodeSelector, view: NodeView, *,
                 first_frame_timeout_s: float, idle_timeout_s: float) -> None:
        self.store = store
        self.runner = runner
        self.bus = bus
        self.sessions = sessions
        self.policies = policies
        self.secrets = secrets
        self.rates = rates
        self.selector = selector
        self.view = view
        self.first_frame_timeout_s = first_frame_timeout_s
        self.idle_timeout_s = max(idle_timeout_s, 2 * KEEPALIVE_S) + KEEPALIVE_S
        self.read_model = ToolsReadModel(store)
        self.mcp_source: McpToolSource = NoMcpServers()
        self.metrics = ToolCallMetrics()

    # -- the registry ---------------------------------------------------------------------

    async def define(self, caller: Caller, spec: ToolSpec, *,
                     expected_version: int | None = None) -> ToolOut:
        """A new version of a tenant tool (`spec` already validated). `expected_version`:
        the version the caller saw (0: must be new); another is a `Conflict`."""
        stream = tool_stream(caller.tenant, spec.name)
        current = await self.store.stream_version(stream)
        if expected_version is not None and expected_version != current:
            raise Conflict(f"tool {spec.name!r} is at version {current}, not {expected_version}")
        try:
            result = await self.store.append(
                stream, [ToolDefined(tenant=caller.tenant, name=spec.name,
                                     spec=msgspec.to_builtins(spec))],
                expected_version=current, metadata=Metadata(tenant=caller.tenant, actor=caller.actor))
        except WrongExpectedVersion:
            raise Conflict(f"tool {spec.name!r} was redefined meanwhile; read it and retry") from None
        await self.runner.wait_for(result.last_position, names=("tools",))
        return _tool_out(spec, result.next_expected_version, "tenant")

    async def resolve(self, tenant: str, name: str) -> tuple[ToolSpec, int, str]:
        """(spec, version, source) of a tool the tenant can call; `NotFound` otherwise."""
        if name in BUILTINS:
            return builtin_spec(name), 0, "builtin"
        if name.startswith("mcp."):
            for spec, version in await self.mcp_source.tools(tenant):
                if spec.name == name:
                    return spec, version, "mcp"
            raise NotFound("tool", name)
        found = await self.read_model.tool(tenant, name)
        if found is None:
            # read-your-writes: defined a moment ago
            if await self.runner.wait_for_stream(tool_stream(tenant, name), ("tools",)):
                found = await self.read_model.tool(tenant, name)
        if found is None:
            raise NotFound("tool", name)
        return decode_spec(found[0]), found[1], "tenant"

    async def list(self, caller: Caller) -> list[ToolOut]:
        await self.runner.wait_for_head(("tools",))
        out = [_tool_out(builtin_spec(n), 0, "builtin") for n in BUILTINS]
        out += [_tool_out(decode_spec(raw), v, "tenant")
                for raw, v in await self.read_model.tools_of(caller.tenant)]
        out += [_tool_out(s, v, "mcp") for s, v in await self.mcp_source.tools(caller.tenant)]
        return out

    async def get(self, caller: Caller, name: str) -> ToolOut:
        spec, version, source = await self.resolve(caller.tenant, name)
        return _tool_out(spec, version, source)

    # -- calls ----------------------------------------------------------------------------

    async def invoke(self, caller: Caller, session_id: str, name: str,
                     arguments: dict[str, Any], *, run_id: str | None = None,
                     call_id: str | None = None, retry: bool = False,
                     rider: Rider | None = None) -> ToolCallView:
        # `call_id`: the id an agent run derived for this attempt (else a new one);
        # `rider`: an agent run's events for the outcome, recorded with it (joint.py);
        # `retry`: it was derived from the request's Idempotency-Key, so a call already
        # there is an earlier attempt of this same request (never run twice)
        if retry and call_id is not None:
            earlier = await self.store.read_stream(toolcall_stream(call_id))
            if any(isinstance(r.event, ToolCallStarted) for r in earlier):
                return await self._earlier_attempt(caller, session_id, call_id, earlier)
            if earlier:  # refused before it ran (no node, a rate limit): a new call
                call_id = None
        # the session and the tool are independent reads: one round trip's wait, not two
        # (the session's answer comes first: another tenant's is a 404, a closed one 409)
        tool = asyncio.ensure_future(self.resolve(caller.tenant, name))
        try:
            session = await self.sessions.require(caller, session_id)
            if session.status != "open":
                raise SessionClosed(session_id)
            spec, version, _ = await tool
        finally:
            if not tool.done():
                tool.cancel()
            elif not tool.cancelled():
                tool.exception()  # retrieved: no "exception was never retrieved"
        policy, _label = await self.policies.compiled(caller.tenant, session.policy,
                                                      session.policy_version, session.policy_rules)
        verdict = decide_tool_call(spec, policy, arguments)
        call_id = call_id or str(uuid.uuid4())
        meta = Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session_id,
                        causation_id=run_id or call_id)
        requested = ToolCallRequested(session_id=session_id, tool_call_id=call_id, tool=name,
                                      tool_version=version, arguments=arguments, run_id=run_id)
        view = ToolCallView(tool_call_id=call_id, session_id=session_id, tool=name,
                            tool_version=version, run_id=run_id, status="requested",
                            arguments=arguments, verdict=verdict.verdict, rule=verdict.rule,
                            reason=verdict.reason)
        label = metric_label(spec)
        if not verdict.allowed and verdict.verdict == "denied":
            await self._append(call_id, [requested, self._decided(requested, verdict),
                                         self._failed(requested, "invalid_arguments"
                                                      if verdict.rule == "tool.arguments"
                                                      else "denied", verdict.reason)], 0, meta)
            self.metrics.count(label, "denied")
            if verdict.rule == "tool.arguments":
                raise InvalidEntity(verdict.reason, list(verdict.errors), verdict.rule)
            raise PolicyDenied(verdict.rule, verdict.reason, _label)
        take = self._rate_slots(caller, session_id, policy)
        events: list = [requested, self._decided(requested, verdict)]
        node = None
        if verdict.allowed:
            node = self.pick_node(spec)
            events.append(self._started(requested, node) if node else
                          self._failed(requested, "no_node", "no online node can run tools now"))
        try:
            if take is None:  # nothing to commit with it: the group commit's shared flush
                await self._append(call_id, events, 0, meta)
            else:
                await self.store.append_atomic([(toolcall_stream(call_id), events, 0)], meta,
                                               before=take)
        except RateLimited as exc:
            rule = f"rate.calls_per_minute.{exc.scope}"
            denied = ToolVerdict(verdict="denied", rule=rule, reason=str(exc))
            await self._append(call_id, [requested, self._decided(requested, denied),
                                         self._failed(requested, "denied", str(exc))], 0, meta)
            self.metrics.count(label, "rate_limited")
            raise PolicyDenied(rule, str(exc), _label) from None
        if verdict.verdict == "needs_approval":
            self.metrics.count(label, "pending_approval")
            return msgspec.structs.replace(view, status="pending_approval")
        if node is None:
            self.metrics.count(label, "no_node")
            raise NoNodeAvailable("no online node can run tools now; retry shortly")
        return await self._execute(caller, spec, requested, node, 3, meta, view, rider)

    async def _earlier_attempt(self, caller: Caller, session_id: str, call_id: str,
                               records: list) -> ToolCallView:
        """The answer to a retried request whose call an earlier attempt made (the same
        Idempotency-Key, after that attempt's answer was lost: the orchestrator or
        Postgres went away). Ended, or waiting for approval: as it stands. Started and
        never ended: its outcome is unknown (it may have run), so it ends now as
        `outcome_unknown`, for a human to judge, instead of running a second time."""
        first = records[0]
        if (first.metadata.tenant != caller.tenant or not isinstance(first.event, ToolCallRequested)
                or first.event.session_id != session_id):
            raise NotFound("tool call", call_id)
        if self._fold([r.event for r in records])["status"] in ("running", "approved"):
            meta = Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session_id,
                            causation_id=first.event.run_id or call_id)
            try:
                await self._append(call_id, [self._failed(
                    first.event, "outcome_unknown", "an earlier attempt of this request (same "
                    "Idempotency-Key) started the call and was interrupted before its outcome "
                    "was recorded; it is not run again")], records[-1].stream_version, meta)
            except WrongExpectedVersion:
                pass  # it ended meanwhile: that is its answer
        return await self.call(caller, session_id, call_id)

    async def answer_approval(self, caller: Caller, session_id: str, call_id: str, *,
                              approve: bool, reason: str = "",
                              rider: Rider | None = None) -> ToolCallView:
        """A human's answer to a pending call: approved, it runs now (the answer is its
        outcome); rejected, it ends `ToolCallFailed(rejected)`."""
        records = await self._records(caller, session_id, call_id)
        requested = next(r.event for r in records if isinstance(r.event, ToolCallRequested))
        state = self._fold([r.event for r in records])
        if state["status"] != "pending_approval":
            raise Conflict(f"tool call {call_id!r} is {state['status']}, not waiting for approval")
        version = records[-1].stream_version
        meta = Metadata(tenant=caller.tenant, actor=caller.actor, correlation_id=session_id,
                        causation_id=requested.run_id or call_id)
        given = ToolCallApprovalGiven(session_id=session_id, tool_call_id=call_id,
                                      approved=approve, reason=reason, by=caller.actor)
        spec, _, _ = await self.resolve(caller.tenant, requested.tool)
        view = msgspec.structs.replace(await self.call(caller, session_id, call_id),
                                       approved=approve, approved_by=caller.actor)
        node = self.pick_node(spec) if approve else None
        if not approve:
            events = [given, self._failed(requested, "rejected", reason or "rejected by " + caller.actor)]
        elif node is None:
            events = [given, self._failed(requested, "no_node", "no online node can run tools now")]
        else:
            events = [given, self._started(requested, node)]
        try:
            await self._append(call_id, events, version, meta)
        except WrongExpectedVersion:
            raise Conflict(f"tool call {call_id!r} was answered meanwhile") from None
        if not approve:
            self.metrics.count(metric_label(spec), "rejected")
            return msgspec.structs.replace(view, status="failed", error="rejected",
                                           detail=events[1].detail)
        if node is None:
            raise NoNodeAvailable("no online node can run tools now")
        return await self._execute(caller, spec, requested, node, version + 2, meta, view, rider)

    async def call(self, caller: Caller, session_id: str, call_id: str) -> ToolCallView:
        """A tool call of the caller's session (another tenant's is not found)."""
        await self.sessions.require(caller, session_id)
        # read-your-writes: the read model as of the call's last event (the answer to a
        # call just made, or its outcome recorded by another orchestrator)
        await self.runner.wait_for_stream(toolcall_stream(call_id), ("tool_calls",))
        row = await self.read_model.call(caller.tenant, session_id, call_id)
        if row is None:
            raise NotFound("tool call", call_id)
        return msgspec.convert(row, ToolCallView, from_attributes=False)

    # -- node selection -------------------------------------------------------------------

    def pick_node(self, spec: ToolSpec) -> str | None:
        """The least loaded online, non-draining node (with the tool's `node_labels`)."""
        if not spec.node_labels:
            try:
                return self.selector.select().node_id
            except NoEligibleNode:
                return None
        fits = [n for n in self.view.nodes.values() if n.eligible
                and all(n.labels.get(k) == v for k, v in spec.node_labels.items())]
        if not fits:
            return None
        best = min(fits, key=score)
        self.view.note_dispatch(best.node_id)
        return best.node_id

    # -- execution ------------------------------------------------------------------------

    async def _exec_request(self, caller: Caller, spec: ToolSpec, requested: ToolCallRequested,
                            ) -> tuple[ToolExecRequest, dict[str, str]]:
        secrets = await self.secrets.resolve(caller.tenant, spec.secret_names)
        http = mcp = None
        if spec.kind == "http" and spec.http is not None:
            # the node fills the template's `{param}`s from the arguments (URL-encoded)
            # and sends the rest as the query (GET, DELETE) or a JSON body
            http = {"method": spec.http.method, "url": spec.http.url_template,
                    "headers": {h: secrets[s] for h, s in spec.http.headers.items()}}
        if spec.kind == "mcp" and spec.mcp is not None:
            mcp = {**msgspec.to_builtins(spec.mcp),
                   "headers": {h: secrets[s] for h, s in spec.mcp.headers.items()}}
        request = ToolExecRequest(
            tool_call_id=requested.tool_call_id, tenant=caller.tenant,
            session_id=requested.session_id, tool=spec.name, kind=spec.kind, target=spec.target,
            arguments=requested.arguments, limits=spec.limits, network=exec_network(spec),
            filesystem=spec.permissions.filesystem, http=http, mcp=mcp)
        return request, secrets

    async def _execute(self, caller: Caller, spec: ToolSpec, requested: ToolCallRequested,
                       node: str, version: int, meta: Metadata, view: ToolCallView,
                       rider: Rider | None = None) -> ToolCallView:
        """Run the call on `node` (its ToolCallStarted is at `version`) and record the end
        (with `rider`'s events for the answer, in the same transaction: joint.py)."""
        label = metric_label(spec)
        started = time.monotonic()
        with tracer().start_as_current_span(f"execute_tool {spec.name}", kind=SpanKind.CLIENT,
                                            attributes={
                                                "gen_ai.operation.name": "execute_tool",
                                                "gen_ai.tool.name": spec.name,
                                                "gen_ai.tool.call.id": requested.tool_call_id,
                                                "gen_ai.tool.type": "extension" if spec.kind == "mcp"
                                                else "function",
                                                "nexus.tool.kind": spec.kind,
                                                "nexus.node.id": node}) as span:
            secrets: dict[str, str] = {}
            try:
                try:
                    request, secrets = await self._exec_request(caller, spec, requested)
                except (NotFound, Conflict) as exc:  # a secret missing or unopenable
                    outcome: ToolDone | Failed = Failed(error="sandbox_error", detail=exc.detail)
                else:
                    outcome = await self._stream(node, request, spec)
            except asyncio.CancelledError:
                await asyncio.shield(self._append(requested.tool_call_id, [self._failed(
                    requested, "cancelled", "the caller went away", node)], version, meta))
                self.metrics.count(label, "cancelled")
                raise
            elapsed = time.monotonic() - started
            if isinstance(outcome, ToolDone):
                output = _scrub(outcome.output, secrets)
                kept = output[:EVENT_OUTPUT_CAP]
                result = outcome.result
                if result is not None and len(msgspec.json.encode(result)) > EVENT_OUTPUT_CAP:
                    result = None
                event: Any = ToolCallFinished(
                    session_id=requested.session_id, tool_call_id=requested.tool_call_id,
                    tool=requested.tool, node=node, is_error=outcome.is_error,
                    exit_code=outcome.exit_code, duration_ms=outcome.duration_ms,
                    cpu_s=outcome.cpu_s, peak_memory_mb=outcome.peak_memory_mb,
                    output_bytes=outcome.output_bytes,
                    truncated=outcome.truncated or len(kept) < len(output), output=kept,
                    output_ref=outcome.output_ref, result=result)
                answer = msgspec.structs.replace(
                    view, status="finished", node=node, is_error=outcome.is_error,
                    exit_code=outcome.exit_code, output=output, result=outcome.result,
                    output_bytes=outcome.output_bytes, truncated=outcome.truncated,
                    output_ref=outcome.output_ref, duration_ms=outcome.duration_ms,
                    cpu_s=outcome.cpu_s, peak_memory_mb=outcome.peak_memory_mb)
                result_label = "error" if outcome.is_error else "ok"
                span.set_attribute("nexus.tool.is_error", outcome.is_error)
            else:
                reason = outcome.error if outcome.error in NODE_REASONS else "sandbox_error"
                detail = _scrub(outcome.detail if reason == outcome.error
                                else f"{outcome.error}: {outcome.detail}", secrets)[:2000]
                event = self._failed(requested, reason, detail, node)
                answer = msgspec.structs.replace(view, status="failed", node=node, error=reason,
                                                 detail=detail)
                result_label = reason
                span.set_status(Status(StatusCode.ERROR, reason))
                span.set_attribute("error.type", reason)
            if isinstance(outcome, Failed) and outcome.error in _RETRY_ELSEWHERE:
                rider = None  # not the answer: the caller is told NoNodeAvailable
            await asyncio.shield(append_joint(
                self.store, [(toolcall_stream(requested.tool_call_id), [event], version)], meta,
                rider, answer))
        self.metrics.count(label, result_label)
        self.metrics.took(label, result_label, elapsed)
        if isinstance(outcome, Failed) and outcome.error in _RETRY_ELSEWHERE:
            raise NoNodeAvailable(f"node {node} is at its tool concurrency; retry shortly")
        return answer

    async def _stream(self, node: str, request: ToolExecRequest, spec: ToolSpec) -> ToolDone | Failed:
        """The node's answer; a node that vanishes or stalls is `node_lost`."""
        deadline = spec.limits.timeout_s + self.idle_timeout_s + self.first_frame_timeout_s
        try:
            async with asyncio.timeout(deadline):
                async with StreamReceiver(self.bus, subjects.node_tool(node), request,
                                          first_frame_timeout_s=self.first_frame_timeout_s,
                                          idle_timeout_s=self.idle_timeout_s) as stream:
                    async for frame in stream.frames():
                        if isinstance(frame, ToolDone | Failed):
                            return frame
            return Failed(error="node_lost", detail=f"node {node} ended the stream without an answer")
        except NoResponders:
            return Failed(error="node_lost", detail=f"node {node} does not answer tool calls (gone?)")
        except RequestTimeout:
            return Failed(error="node_lost",
                          detail=f"node {node} stopped answering (nothing for {self.idle_timeout_s:g}s)")
        except RemoteStreamError as exc:
            return Failed(error="sandbox_error", detail=f"node {node}: {exc.error}")
        except MessagingError as exc:
            return Failed(error="node_lost", detail=f"node {node}: {exc}")
        except TimeoutError:
            return Failed(error="timeout", detail=f"node {node} did not end the call within {deadline:g}s")

    # -- events ---------------------------------------------------------------------------

    async def _append(self, call_id: str, events: list, expected: int, meta: Metadata) -> None:
        await self.store.append(toolcall_stream(call_id), events, expected_version=expected,
                                metadata=meta)

    def _rate_slots(self, caller: Caller, session_id: str, policy: Any
                    ) -> Callable[[Any], Awaitable[None]] | None:
        """Tool calls take the policy's per-minute call slots, as chat calls do."""
        if policy is None:
            return None
        scopes = {"tenant": caller.tenant, "key": caller.key_id, "session": session_id}
        slots = {}
        for scope in policy.rate_scopes:
            limits = getattr(policy.rules, f"rate_per_{scope}")
            if limits and limits.calls_per_minute is not None:
                slots[scope] = (scopes[scope], limits.calls_per_minute)
        if not slots:
            return None
        return lambda conn: self.rates.take(conn, slots)

    @staticmethod
    def _decided(r: ToolCallRequested, verdict: ToolVerdict) -> ToolCallDecided:
        return ToolCallDecided(session_id=r.session_id, tool_call_id=r.tool_call_id, tool=r.tool,
                               verdict=verdict.verdict, rule=verdict.rule, reason=verdict.reason)

    @staticmethod
    def _started(r: ToolCallRequested, node: str) -> ToolCallStarted:
        return ToolCallStarted(session_id=r.session_id, tool_call_id=r.tool_call_id, tool=r.tool,
                               node=node)

    @staticmethod
    def _failed(r: ToolCallRequested, reason: str, detail: str,
                node: str | None = None) -> ToolCallFailed:
        return ToolCallFailed(session_id=r.session_id, tool_call_id=r.tool_call_id, tool=r.tool,
                              reason=reason, detail=detail, node=node)

    async def _records(self, caller: Caller, session_id: str, call_id: str) -> list:
        """The call's events, if it is a call of the caller's session; else `NotFound`."""
        await self.sessions.require(caller, session_id)
        records = await self.store.read_stream(toolcall_stream(call_id))
        if (not records or records[0].metadata.tenant != caller.tenant
                or not isinstance(records[0].event, ToolCallRequested)
                or records[0].event.session_id != session_id):
            raise NotFound("tool call", call_id)
        return records

    @staticmethod
    def _fold(events: list) -> dict[str, Any]:
        status = "requested"
        for e in events:
            if isinstance(e, ToolCallDecided):
                status = {"needs_approval": "pending_approval"}.get(e.verdict, e.verdict)
            elif isinstance(e, ToolCallApprovalGiven):
                status = "approved" if e.approved else status
            elif isinstance(e, ToolCallStarted):
                status = "running"
            elif isinstance(e, ToolCallFinished):
                status = "finished"
            elif isinstance(e, ToolCallFailed):
                status = "failed"
        return {"status": status}
