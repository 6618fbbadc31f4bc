"""`nexus node`: front a runtime, register, heartbeat, relay inference; on SIGTERM drain, leave."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shared.contracts import subjects
from shared.contracts.messages import CompletionRequest, RuntimeInfo, ToolExecRequest
from shared.infra.nats_auth import node_inbox_prefix
from shared.domain.nodes import load_or_create_node_id
from shared.infra.service import ServiceRuntime
from shared.infra.settings import Settings, get_settings
from services.node.daemon import NodeDaemon
from services.node.runtime import ManagedLlama, Relay, probe
from services.node.tools import tool_runner

log = logging.getLogger("nexus.node")


async def run(runtime: ServiceRuntime, settings: Settings) -> None:
    runtime.install_signal_handlers()
    node_id = load_or_create_node_id(settings.node_dir)
    # Replies to this node come to inboxes only it may read (nats_auth private inboxes).
    await runtime.start(manage_streams=False, inbox_prefix=node_inbox_prefix(node_id))
    bus = runtime.bus
    assert bus is not None
    agent = NodeDaemon(node_id, labels=settings.node_labels,
                      heartbeat_interval_s=settings.heartbeat_interval_s)
    tasks: list[asyncio.Task[None]] = []
    managed: ManagedLlama | None = None

    def runtime_changed(info: RuntimeInfo) -> None:
        log.log(logging.WARNING if info.state in ("crashed", "failed") else logging.INFO,
                "runtime %s%s", info.state, f" ({info.reason})" if info.reason else "",
                extra={"runtime": info.kind, "models": list(info.models),
                       "restarts": info.restarts})
        agent.set_runtime(info)  # reported to the orchestrator once registered

    if settings.runtime_url:
        agent.runtime = await probe(settings.runtime_url)
        if settings.runtime_model and agent.runtime.ready:
            agent.runtime = RuntimeInfo(kind=agent.runtime.kind, base_url=settings.runtime_url,
                                        models=(settings.runtime_model,), ready=True, state="ready")
    elif settings.runtime == "llama":
        managed = ManagedLlama(settings.node_dir / "logs", runtime_changed,
                               binary=settings.llama_server_bin,
                               max_restarts=settings.runtime_max_restarts,
                               backoff_s=settings.runtime_restart_backoff_s)
        agent.runtime = managed.info
        tasks.append(asyncio.create_task(managed.run(), name="llama-server"))
    relay = Relay(agent, bus, lambda: agent.runtime, max_concurrency=settings.node_max_concurrency,
                  max_queue=settings.node_max_queue)
    await bus.subscribe(subjects.node_infer(agent.node_id), CompletionRequest, relay.on_infer,
                        concurrent=True)
    tools = tool_runner(agent.node_id, bus, settings)
    await bus.subscribe(subjects.node_tool(agent.node_id), ToolExecRequest, tools.on_tool,
                        concurrent=True)
    try:
        registering = asyncio.create_task(agent.register(bus, settings.request_timeout_s))
        stop = asyncio.create_task(runtime.wait_for_stop())
        await asyncio.wait({registering, stop}, return_when=asyncio.FIRST_COMPLETED)
        if registering.done():
            tasks.append(asyncio.create_task(
                agent.report_runtime(bus, settings.request_timeout_s), name="report-runtime"))
            tasks.append(asyncio.create_task(agent.heartbeat_loop(bus)))
            await stop
            await agent.drain_and_leave(bus, settings.node_drain_timeout_s)
        else:
            registering.cancel()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if managed is not None:
            managed.stop()
        agent.gpus.close()
        await runtime.stop()
        await tools.close()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime("node", settings)
    runtime.setup_process()
    asyncio.run(run(runtime, settings))


if __name__ == "__main__":
    main()
