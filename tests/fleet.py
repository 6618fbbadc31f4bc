"""Simulated nodes: lightweight NATS publishers speaking the real subjects and messages."""

from __future__ import annotations

import asyncio
import random
import time

from shared.contracts import subjects
from shared.contracts.messages import GpuInfo, GpuLoad, Heartbeat, NodeRegistration, RegistrationAck, RuntimeInfo
from shared.infra.messaging import Bus

GIB = 1024**3


def registration(node_id: str, *, models: tuple[str, ...] = ("gemma3-270m",), gpus: int = 1,
                 labels: dict[str, str] | None = None, interval: float = 1.0) -> NodeRegistration:
    return NodeRegistration(
        node_id=node_id, hostname=f"sim-{node_id}", addresses=("10.0.0.1",),
        labels=labels or {"fleet": "sim"}, cpu_count=8, memory_total_bytes=32 * GIB,
        gpus=tuple(GpuInfo(index=i, name="Sim GPU", uuid=f"GPU-{node_id}-{i}",
                           memory_total_bytes=24 * GIB) for i in range(gpus)),
        runtime=RuntimeInfo(kind="sim", version="1", base_url=None, models=models, ready=True),
        agent_version="sim", heartbeat_interval_s=interval,
    )


class SimFleet:
    def __init__(self, bus: Bus, node_ids: list[str], *, interval: float = 1.0) -> None:
        self.bus = bus
        self.node_ids = node_ids
        self.interval = interval
        self.stopped: set[str] = set()
        self.seq = 0
        self._task: asyncio.Task[None] | None = None
        self.rng = random.Random(1)

    async def register_all(self, concurrency: int = 50) -> list[RegistrationAck]:
        sem = asyncio.Semaphore(concurrency)

        async def one(node_id: str) -> RegistrationAck:
            async with sem:
                return await self.bus.request(subjects.node_register(node_id),
                                              registration(node_id, interval=self.interval),
                                              RegistrationAck, timeout=30)

        return await asyncio.gather(*(one(n) for n in self.node_ids))

    def heartbeat(self, node_id: str) -> Heartbeat:
        return Heartbeat(node_id=node_id, seq=self.seq, sent_at=time.time(),
                         cpu_pct=self.rng.uniform(5, 60), memory_pct=self.rng.uniform(10, 70),
                         gpus=(GpuLoad(index=0, utilization_pct=self.rng.uniform(0, 100),
                                       memory_used_bytes=4 * GIB),),
                         active_requests=self.rng.randint(0, 3), avg_response_ms=120.0)

    async def beat_once(self) -> None:
        self.seq += 1
        for node_id in self.node_ids:
            if node_id not in self.stopped:
                await self.bus.publish(subjects.node_heartbeat(node_id), self.heartbeat(node_id),
                                       traced=False)
        await self.bus.nc.flush()

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.beat_once()
            except Exception:  # NATS restarting: keep going, as a real node does
                pass
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
