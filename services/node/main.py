"""`nexus node`: register, heartbeat, and on SIGTERM drain then leave."""

from __future__ import annotations

import asyncio
import contextlib

from shared.service import ServiceRuntime
from shared.settings import Settings, get_settings
from shared.nodes import load_or_create_node_id
from services.node.agent import NodeAgent


async def run(runtime: ServiceRuntime, settings: Settings) -> None:
    runtime.install_signal_handlers()
    await runtime.start(manage_streams=False)
    assert runtime.bus is not None
    agent = NodeAgent(load_or_create_node_id(settings.node_dir), labels=settings.node_labels,
                      heartbeat_interval_s=settings.heartbeat_interval_s)
    beats: asyncio.Task[None] | None = None
    try:
        registering = asyncio.create_task(agent.register(runtime.bus, settings.request_timeout_s))
        stop = asyncio.create_task(runtime.wait_for_stop())
        await asyncio.wait({registering, stop}, return_when=asyncio.FIRST_COMPLETED)
        if registering.done():
            beats = asyncio.create_task(agent.heartbeat_loop(runtime.bus))
            await stop
            await agent.drain_and_leave(runtime.bus, settings.node_drain_timeout_s)
        else:
            registering.cancel()
    finally:
        if beats is not None:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        agent.gpus.close()
        await runtime.stop()


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime("node", settings)
    runtime.setup_process()
    asyncio.run(run(runtime, settings))


if __name__ == "__main__":
    main()
