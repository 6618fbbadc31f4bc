"""`nexus node`: front a runtime, register, heartbeat, relay inference; on SIGTERM drain, leave."""

from __future__ import annotations

import asyncio
import logging

import msgspec

from services.node import hardware
from services.node.daemon import NodeDaemon
from services.node.models import Inventory, ModelRuntimes, Puller, compose
from services.node.ollama import Ollama
from services.node.runtime import ManagedLlama, Relay, probe
from services.node.tools import tool_runner
from shared.contracts import subjects
from shared.contracts.messages import (
    CompletionRequest,
    ModelCommand,
    NodeDrainCommand,
    RuntimeInfo,
    ToolExecRequest,
)
from shared.domain.nodes import load_or_create_node_id
from shared.infra.model_store import ModelStore
from shared.infra.nats_auth import node_inbox_prefix
from shared.infra.service import ServiceRuntime, freeze_startup_heap, run_service
from shared.infra.settings import Settings, get_settings
from shared.infra.tasks import stop_tasks

log = logging.getLogger("nexus.node")


async def run(runtime: ServiceRuntime, settings: Settings) -> None:
    runtime.install_signal_handlers()
    node_id = load_or_create_node_id(settings.node_dir)
    # Replies to this node come to inboxes only it may read (nats_auth private inboxes).
    await runtime.start(manage_streams=False, inbox_prefix=node_inbox_prefix(node_id))
    bus = runtime.bus
    assert bus is not None
    agent = NodeDaemon(node_id, labels=settings.node_labels,
                      heartbeat_interval_s=settings.heartbeat_interval_s,
                      gpus=hardware.Gpus(settings.fake_gpu_memory_gib))
    tasks: list[asyncio.Task[None]] = []
    managed: ManagedLlama | None = None
    # Installed models (the model store): each served by its own llama-server when the
    # node runs llama-server (`llama`, or `installed`: only installed models).
    inventory = Inventory(settings.node_dir / "models")
    runtimes: ModelRuntimes | None = None
    primary = [agent.runtime]

    def recompose() -> None:
        composed = compose(primary[0], runtimes)
        if composed != agent.runtime:
            agent.set_runtime(composed)

    def runtime_changed(info: RuntimeInfo) -> None:
        log.log(logging.WARNING if info.state in ("crashed", "failed") else logging.INFO,
                "runtime %s%s", info.state, f" ({info.reason})" if info.reason else "",
                extra={"runtime": info.kind, "models": list(info.models),
                       "restarts": info.restarts})
        primary[0] = info
        agent.set_runtime(compose(info, runtimes))  # reported to the orchestrator once registered

    if not settings.runtime_url and settings.runtime in ("llama", "installed"):
        runtimes = ModelRuntimes(inventory, lambda name, path: ManagedLlama(
            settings.node_dir / "logs", lambda _info: recompose(),
            binary=settings.llama_server_bin, max_restarts=settings.runtime_max_restarts,
            backoff_s=settings.runtime_restart_backoff_s, context=settings.model_context,
            model_file=path, alias=name), recompose)
    # An Ollama runtime holds its own models (pulled through its API): they are the
    # inventory; Ollama loads them on demand (what its GPUs hold is in the heartbeat).
    ollama = Ollama(settings.runtime_url, stall_s=settings.model_stall_s) \
        if settings.runtime_url and settings.runtime_kind == "ollama" else None
    agent.installed_models = (lambda: ollama.models) if ollama is not None else lambda: tuple(
        msgspec.structs.replace(m, loaded=m.name in agent.runtime.models)
        for m in inventory.installed())
    reprobes: set[asyncio.Task[None]] = set()

    def ollama_changed() -> None:
        """A model came or went: what the runtime serves now (the selector follows)."""
        async def again() -> None:
            info = await probe(settings.runtime_url or "", kind="ollama")
            primary[0] = info
            agent.set_runtime(info)
        task = asyncio.create_task(again())
        reprobes.add(task)
        task.add_done_callback(reprobes.discard)

    if settings.runtime_url:
        if ollama is not None:
            await ollama.refresh()
        agent.runtime = await probe(settings.runtime_url, kind=settings.runtime_kind)
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
    primary[0] = agent.runtime
    relay = Relay(agent, bus, lambda: agent.runtime, max_concurrency=settings.node_max_concurrency,
                  max_queue=settings.node_max_queue,
                  route=runtimes.route if runtimes is not None else None)
    puller = Puller(agent.node_id, bus, ModelStore(bus.js), inventory,
                    max_downloads=settings.model_max_downloads,
                    rate_bps=settings.model_pull_rate_bps,
                    progress_interval_s=settings.model_progress_interval_s,
                    stall_s=settings.model_stall_s,
                    on_change=runtimes.sync if runtimes is not None else
                    ollama_changed if ollama is not None else (lambda: None), ollama=ollama)
    if runtimes is not None:
        runtimes.sync()
    await bus.subscribe(subjects.node_models(agent.node_id), ModelCommand, puller.on_command,
                        concurrent=True)
    await bus.subscribe(subjects.node_infer(agent.node_id), CompletionRequest, relay.on_infer,
                        concurrent=True)
    await bus.subscribe(subjects.node_drain(agent.node_id), NodeDrainCommand, agent.on_drain)
    tools = tool_runner(agent.node_id, bus, settings)
    await bus.subscribe(subjects.node_tool(agent.node_id), ToolExecRequest, tools.on_tool,
                        concurrent=True)
    freeze_startup_heap()
    try:
        registering = asyncio.create_task(agent.register(bus, settings.request_timeout_s),
                                          name="register")
        stop = asyncio.create_task(runtime.wait_for_stop())
        await asyncio.wait({registering, stop}, return_when=asyncio.FIRST_COMPLETED)
        if registering.done():
            agent.start_reporting(bus, settings.request_timeout_s)
            await stop
            await agent.drain_and_leave(bus, settings.node_drain_timeout_s)
        else:
            await stop_tasks([registering])
    finally:
        # Bounded: a task that will not stop must not keep the process from exiting.
        await agent.stop_reporting()
        await stop_tasks([*tasks, *reprobes])
        if managed is not None:
            managed.stop()
        await puller.close()
        if runtimes is not None:
            runtimes.stop()
        agent.gpus.close()
        await runtime.stop()
        await tools.close()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime("node", settings)
    runtime.setup_process()
    run_service(run(runtime, settings))


if __name__ == "__main__":
    main()
