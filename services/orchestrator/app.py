"""The orchestrator's HTTP API (Litestar). Handlers are a few lines each: the work is
in `SessionService` and the shared core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from shared import __version__
from shared.contracts import subjects
from shared.infra.eventstore import ProjectionRunner
from shared.contracts.messages import Ping, Pong
from shared.infra.messaging import MessagingError
from shared.infra.service import ServiceRuntime, freeze_startup_heap
from shared.infra.settings import Settings
from shared.domain.nodes import NodeView
from shared.infra.metrics import exposition, observe_gauges
from shared.domain.routing import SelectorFleet
from shared.domain.selection import NodeSelector
from services.orchestrator.fleet import NodeService
from services.orchestrator.nodes_api import NodesController
from services.orchestrator.problems import EXCEPTION_HANDLERS
from services.orchestrator.contract import reject_unstorable_text, with_contract
from services.orchestrator.dependencies import inline_sync_dependencies
from services.orchestrator.read_models import PROJECTIONS
from services.orchestrator.auth import PUBLIC_PATHS, BearerKeyMiddleware
from services.orchestrator.keys import KeyService, Caller
from services.orchestrator.keys_api import KeysController
from services.orchestrator.budget_manager import BudgetManager
from services.orchestrator.liveness import InstanceLiveness, liveness_id
from services.orchestrator.calls import CallLifecycle
from services.orchestrator.chat_api import ChatController
from services.orchestrator.idempotency import IdempotencyStore
from services.orchestrator.policies import PolicyService
from services.orchestrator.ratelimits import RateCounter
from services.orchestrator.schemas import Health, ServicePing, SystemPing
from services.orchestrator.sessions import SessionService
from services.orchestrator.sessions_api import EventsController, SessionsController
from services.orchestrator.secrets import SecretStore
from services.orchestrator.mcp_api import McpServersController
from services.orchestrator.models import ModelService
from services.orchestrator.models_api import ModelsController, NodeModelsController, TasksController
from services.orchestrator.mcp_gateway import McpGateway
from services.orchestrator.workspaces import WorkspaceJanitor
from services.orchestrator.mcp_servers import McpServerService, tool_node as _tool_node
from services.orchestrator.tools import ToolService
from services.orchestrator.agents import AgentService
from services.orchestrator.agents_api import AgentsController
from services.orchestrator.runs import RunService
from services.orchestrator.runs_api import RunsController, SessionRunsController
from services.orchestrator.ws_api import session_socket
from services.orchestrator.tools_api import SecretsController, ToolCallsController, ToolsController
from services.orchestrator.explain import CallExplainer
from services.orchestrator.replay import ReplayService
from services.orchestrator.skills import AgentSelector, SkillRouter, SkillService
from services.orchestrator.skills_api import CallsController, ReplaysController, SkillsController
from services.orchestrator import ui

log = logging.getLogger("nexus.orchestrator")

@get("/health")
async def health(state: State) -> Health:
    runtime: ServiceRuntime = state.runtime
    db_ok = False
    with contextlib.suppress(Exception):
        db_ok = await asyncio.wait_for(runtime.store.ping(), 2)
    nats_ok = runtime.bus is not None and runtime.bus.connected
    return Health(status="ok" if db_ok and nats_ok else "degraded", nats=nats_ok,
                  postgres=db_ok, instance_id=runtime.settings.instance_id, version=__version__)


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def prometheus_metrics(request: Request) -> Response[bytes]:
    """The Prometheus exposition of this process's instruments (public, like /health)."""
    body, content_type = exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@get("/v1/system/ping")
async def system_ping(state: State) -> SystemPing:
    """Ping one instance of each service over NATS (a cheap end-to-end check)."""
    runtime: ServiceRuntime = state.runtime

    async def ping(subject: str) -> ServicePing:
        try:
            pong = await runtime.bus.request(subject, Ping(sender=runtime.settings.instance_id),
                                             Pong, timeout=runtime.settings.request_timeout_s)
        except MessagingError as exc:
            return ServicePing(ok=False, error=str(exc))
        return ServicePing(ok=True, instance_id=pong.instance_id, uptime_s=pong.uptime_s)

    orchestrator, provider, node = await asyncio.gather(
        ping(subjects.PING_ORCHESTRATOR), ping(subjects.PING_PROVIDER), ping(subjects.PING_NODE)
    )
    return SystemPing(orchestrator=orchestrator, provider=provider, node=node)


async def _sweep(budgets: BudgetManager, settings: Settings) -> None:
    """Release reservations whose owner died, found from the events (survives restarts)."""
    while True:
        await asyncio.sleep(settings.budget_sweep_s)
        try:
            released = await budgets.sweep_expired()
            if released:
                log.info("expired reservations released", extra={"count": released})
        except Exception:
            log.exception("budget sweep failed")


async def _purge(records: IdempotencyStore) -> None:
    """Forget Idempotency-Key records past their retention (hourly)."""
    while True:
        try:
            await records.purge()
        except Exception:
            log.exception("idempotency purge failed")
        await asyncio.sleep(3600)


def _register_gauges(nodes: NodeService, runner: ProjectionRunner) -> None:
    """Observable gauges, read from memory at export time (no I/O)."""
    import time as _time

    def per_node(attr: str):
        def read():
            now = _time.monotonic()
            for node in nodes.view.nodes.values():
                value = getattr(node, attr)
                if value is not None and node.fresh(now, nodes.offline_after_s):
                    yield float(value), {"node": node.node_id}
        return read

    for name, attr, unit in (("nexus.node.cpu.utilization", "cpu_pct", "%"),
                             ("nexus.node.memory.utilization", "memory_pct", "%"),
                             ("nexus.node.gpu.utilization", "gpu_util_pct", "%"),
                             ("nexus.node.gpu.memory.used", "gpu_memory_used_bytes", "By"),
                             ("nexus.node.gpu.memory.total", "gpu_memory_total_bytes", "By"),
                             ("nexus.node.active_requests", "active_requests", "{request}")):
        observe_gauges(name, unit, f"per node: {attr}", per_node(attr))

    def by_status():
        counts: dict[str, int] = {}
        for record in nodes.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        return [(float(n), {"status": status}) for status, n in counts.items()]

    observe_gauges("nexus.nodes", "{node}", "nodes by status", by_status)
    observe_gauges("nexus.projection.lag", "s", "append-to-applied lag of the last event",
                   lambda: [(lag, {"projection": name}) for name, lag in runner.lag_s.items()])


def create_app(settings: Settings) -> Litestar:
    runtime = ServiceRuntime("orchestrator", settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start(database=True)
        assert runtime.store is not None
        runner = ProjectionRunner(runtime.store, PROJECTIONS, poll_s=settings.projection_poll_s,
                                  batch_size=settings.projection_batch_size,
                                  coalesce_s=settings.projection_coalesce_s)
        app.state.runtime = runtime
        app.state.runner = runner
        app.state.policies = PolicyService(runtime.store, runner)
        app.state.sessions = SessionService(runtime.store, runner, app.state.policies)
        instance = liveness_id(settings.instance_id)
        app.state.budgets = BudgetManager(runtime.store,
                                          reservation_ttl_s=settings.reservation_ttl_s,
                                          cache_size=settings.budget_cache_size,
                                          instance=instance,
                                          lease_calls=settings.budget_lease_calls)
        liveness = InstanceLiveness(runtime.bus, app.state.budgets, instance,
                                    lost_after_s=settings.orchestrator_lost_after_s)
        await liveness.start()  # before the first reservation names this instance
        app.state.nodes = NodeService(runtime.store, runtime.bus, NodeView(), runner,
                                      offline_after_s=settings.node_offline_after_s,
                                      poll_s=settings.projection_poll_s)
        selector = NodeSelector(app.state.nodes.view, settings.node_selection,
                                stale_after_s=settings.node_offline_after_s)
        app.state.calls = CallLifecycle(runtime.store, runtime.bus, app.state.sessions,
                                        app.state.budgets, app.state.policies,
                                        RateCounter(runtime.pool), SelectorFleet(selector),
                                        request_timeout_s=settings.request_timeout_s)
        # skills and adaptive routing (`auto`, `skill:<name>`), explain, feedback, replay
        app.state.skills = SkillService(runtime.store, runner)
        app.state.calls.router = SkillRouter(runtime.store, app.state.skills,
                                             cluster_threshold=settings.routing_cluster_threshold)
        app.state.explainer = CallExplainer(runtime.store)
        app.state.replays = ReplayService(runtime.store, runner, app.state.skills, app.state.calls)
        app.state.key_service = KeyService(runtime.store, settings.admin_key, runner)
        app.state.idempotency = IdempotencyStore(runtime.pool, lease_s=settings.reservation_ttl_s,
                                                 wait_s=settings.idempotency_wait_s)
        app.state.secrets = SecretStore(runtime.pool, settings.admin_key)
        app.state.tools = ToolService(
            runtime.store, runner, runtime.bus, app.state.sessions, app.state.policies,
            app.state.secrets, RateCounter(runtime.pool), selector, app.state.nodes.view,
            first_frame_timeout_s=settings.request_timeout_s,
            idle_timeout_s=settings.node_offline_after_s)
        app.state.mcp_servers = McpServerService(
            runtime.store, runner, runtime.bus, pick_node=_tool_node(app.state.tools),
            resolve=app.state.secrets.resolve)
        app.state.tools.mcp_source = app.state.mcp_servers  # mcp.<server>.<tool> in the registry
        app.state.agents = AgentService(runtime.store, runner, app.state.tools,
                                        app.state.calls.models)
        app.state.sessions.agents = app.state.agents  # sessions pin their agent's version
        await app.state.agents.load_system()  # agents/*.md, appended only when changed
        app.state.runs = RunService(  # agent runs: the durable loop, leases, takeovers
            runtime.store, runner, runtime.bus, app.state.calls, app.state.tools,
            app.state.sessions, app.state.agents.resolve, instance=instance,
            lease_s=settings.run_lease_s, scan_s=settings.run_scan_s,
            approval_ttl_s=settings.run_approval_ttl_s)
        app.state.runs.agent_selector = AgentSelector(app.state.calls.router, app.state.agents)
        await app.state.nodes.start()
        app.state.models = ModelService(  # model distribution: store, placement, tasks
            runtime.store, runtime.bus, app.state.nodes, runner, context=settings.model_context,
            stall_s=settings.model_stall_s, placement=settings.model_placement,
            poll_s=settings.projection_poll_s)
        await app.state.models.start()
        _register_gauges(app.state.nodes, runner)
        ui.start(app.state, settings)  # the dashboard at /ui: login, live hub
        tasks = [asyncio.create_task(runner.run(), name="projections"),
                 asyncio.create_task(app.state.runs.run_forever(), name="agent-runs"),
                 asyncio.create_task(_sweep(app.state.budgets, settings), name="budget-sweeper"),
                 asyncio.create_task(liveness.run(), name="orchestrator-liveness"),
                 asyncio.create_task(app.state.budgets.run_leases(), name="budget-leases"),
                 asyncio.create_task(_purge(app.state.idempotency), name="idempotency-purge"),
                 asyncio.create_task(WorkspaceJanitor(runtime.store, runtime.bus.js).run(),
                                     name="workspace-janitor")]
        freeze_startup_heap()  # ready: what start-up built is not scanned again
        try:
            yield
        finally:
            await app.state.runs.stop()  # in-flight runs handed on to another process
            await ui.stop(app.state)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):  # what is left of idle slices, at once
                await app.state.budgets.return_leases(idle_s=0)
            await app.state.models.stop()
            await app.state.nodes.stop()
            await runtime.stop()

    def provide_sessions(state: State) -> SessionService:
        return state.sessions

    def provide_nodes(state: State) -> NodeService:
        return state.nodes

    def provide_keys(state: State) -> KeyService:
        return state.key_service

    def provide_principal(request: Request) -> Caller:
        return request.user

    def from_state(name: str) -> Provide:
        def provide(state: State) -> Any:
            return getattr(state, name)

        return Provide(provide, sync_to_thread=False)

    gateway = McpGateway(settings.max_body_bytes)  # /v1/mcp: MCP over Streamable HTTP
    return with_contract(inline_sync_dependencies(Litestar(
        route_handlers=[health, prometheus_metrics, system_ping, SessionsController,
                        KeysController, NodesController,
                        ChatController, EventsController, ToolsController,
                        ToolCallsController, SecretsController, McpServersController, AgentsController,
                        SessionRunsController, RunsController,
                        session_socket,
                        ModelsController, NodeModelsController, TasksController,
                        SkillsController, CallsController, ReplaysController,
                        gateway.route(), ui.router()],
        lifespan=[lifespan, gateway.lifespan],
        dependencies={"sessions": Provide(provide_sessions, sync_to_thread=False),
                      "nodes": Provide(provide_nodes, sync_to_thread=False),
                      "keys": Provide(provide_keys, sync_to_thread=False),
                      "caller": Provide(provide_principal, sync_to_thread=False),
                      "calls": from_state("calls"), "budgets": from_state("budgets"),
                      "policies": from_state("policies"),
                      "idempotency": from_state("idempotency"),
                      "tool_service": from_state("tools"), "secret_store": from_state("secrets"),
                      "mcp_server_service": from_state("mcp_servers"),
                      "skill_service": from_state("skills"),
                      "call_explainer": from_state("explainer"),
                      "replay_service": from_state("replays"),
                      "model_service": from_state("models"),
                      "agent_service": from_state("agents"),
                      "run_service": from_state("runs")},
        middleware=[DefineMiddleware(BearerKeyMiddleware,  # the dashboard logs in by cookie
                                     exclude=[f"^{p}" for p in PUBLIC_PATHS] + [f"^{ui.PREFIX}"])],
        template_config=ui.TEMPLATES,
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=reject_unstorable_text,  # NUL in any text: a 400 naming the field
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Nexus orchestrator", version=__version__, path="/schema"),
        debug=False,
        logging_config=None,  # logs are ours: JSON lines with trace ids (shared.infra.logs)
    )))  # providers are plain functions: no task group per request (dependencies.py)
