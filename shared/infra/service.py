"""What every Nexus service process does: logs, tracing, metrics (OTLP and `/metrics`),
NATS, optional Postgres, a ping responder, and a clean stop on SIGTERM/SIGINT.

Services are thin: they build a `ServiceRuntime`, subscribe their handlers on
`runtime.bus` and wait for the stop signal.
"""

from __future__ import annotations

import asyncio
import gc
import ctypes
import logging
import os
import signal
import time

import asyncpg
from nats.aio.msg import Msg

from shared import __version__
from shared.contracts import subjects
from shared.infra.eventstore.store import EventStore, create_pool
from shared.infra.logs import setup_logging
from shared.contracts.messages import Ping, Pong
from shared.infra.messaging import Bus
from shared.infra.metrics import nats_reconnects, serve_metrics
from shared.infra.settings import Settings
from shared.infra.tasks import stop_tasks
from shared.infra.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger("nexus.service")

PING_SUBJECTS = {
    "orchestrator": (subjects.PING_ORCHESTRATOR, subjects.QUEUE_ORCHESTRATOR),
    "provider": (subjects.PING_PROVIDER, subjects.QUEUE_PROVIDER),
    "node": (subjects.PING_NODE, subjects.QUEUE_NODE),
}


# glibc's malloc raises its mmap threshold each time a large mmapped block is freed;
# after that, large buffers come from the heap, fragment it and are never given back:
# under 500 streaming sessions the orchestrator's RSS grew +6.6 MiB/min with its live
# heap flat (mallinfo: all of it freed-but-kept). Fixed thresholds keep it flat
# (+0.1 MiB/min in the same soak). Set here, once, for every service process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MALLOC_THRESHOLD_BYTES = 128 * 1024


def bound_malloc() -> bool:
    """Fix glibc's trim and mmap thresholds (no-op elsewhere); whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, MALLOC_THRESHOLD_BYTES) == 1
                   for option in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


LEFTOVER_TASKS_STOP_S = 5.0  # how long tasks still running after main returns get to stop


def run_service(main) -> None:
    """Run a service's main coroutine on uvloop (libuv: cheaper sockets and timers than
    asyncio's selector loop, measured in docs/performance.md), or asyncio's loop where
    uvloop is not installed.

    When main is done, the tasks it left behind are stopped within a bound. `asyncio.run`
    would cancel them once and wait for ever; a task that loses its cancel (CPython
    gh-86296) would keep a stopped service's process alive. One that still does not stop
    is logged and the process exits anyway (status 1)."""
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_then_stop_leftovers(main))


async def _then_stop_leftovers(main) -> None:
    try:
        await main
    finally:
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        if leftovers and (stuck := await stop_tasks(leftovers, LEFTOVER_TASKS_STOP_S)):
            log.error("tasks still running after the service stopped; exiting",
                      extra={"tasks": sorted(t.get_name() for t in stuck)})
            logging.shutdown()
            os._exit(1)


def setup_process(service: str, settings: Settings) -> None:
    """Logging, tracing and metrics (`/metrics` on `NEXUS_METRICS_PORT`) for a service
    process, and bounded malloc; call once, at start."""
    bound_malloc()
    setup_logging(f"nexus-{service}", settings.log_level)
    setup_tracing(f"nexus-{service}", settings.instance_id)
    serve_metrics(settings.http_host, settings.metrics_port)


YOUNG_COLLECTION_EVERY = 10_000  # net allocations of tracked objects (CPython: 700)


def freeze_startup_heap() -> None:
    """Move what start-up built (modules, the app and its schemas, clients, caches) out of
    the cyclic garbage collector's generations; call once, when the service is ready.

    A full collection scans every tracked object; the orchestrator's start-up heap alone
    made each one 150 to 430 ms, during which no request of any tenant moved (measured
    with `gc.callbacks` under `bench/sessions.py`). Frozen objects are still freed by
    reference counting; only a cycle among them would stay, and start-up state lives as
    long as the process.

    Then a young collection runs every 10,000 net allocations of tracked objects instead
    of every 700: what a collection scans is what is alive of the young, about the same
    however often it runs, so it runs 14 times less often for about the same work each
    (the orchestrator's CPU per call at 64 clients -5%: docs/performance.md, round 10)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])


class ServiceRuntime:
    def __init__(self, service: str, settings: Settings) -> None:
        if service not in PING_SUBJECTS:
            raise ValueError(f"unknown service {service!r}")
        self.service = service
        self.settings = settings
        self.started = time.monotonic()
        self.bus: Bus | None = None
        self.pool: asyncpg.Pool | None = None
        self.store: EventStore | None = None
        self._stop = asyncio.Event()

    def setup_process(self) -> None:
        setup_process(self.service, self.settings)

    async def start(self, *, database: bool = False, manage_streams: bool = True,
                    inbox_prefix: str | None = None) -> None:
        """Connect (and with `manage_streams`, create/update the JetStream streams;
        nodes leave that to the services, their credentials allow no JetStream API)."""
        nats_url = self.settings.nats_url
        if not nats_url:
            raise RuntimeError("NATS_URL is not set: start services with `nexus up`")
        # NATS may not be up yet (the connection retries); a stop signal meanwhile wins.
        connecting = asyncio.create_task(Bus.connect(nats_url, f"nexus-{self.service}",
                                                     user=self.settings.nats_user,
                                                     password=self.settings.nats_password,
                                                     inbox_prefix=inbox_prefix))
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            raise SystemExit(0)
        self.bus = connecting.result()
        if manage_streams:
            await self.bus.ensure_streams()
        if database:
            if not self.settings.database_url:
                raise RuntimeError("DATABASE_URL is not set: start services with `nexus up`")
            self.pool = await create_pool(self.settings.database_url,
                                          max_size=self.settings.db_pool_size)
            self.store = EventStore(self.pool)
        subject, queue = PING_SUBJECTS[self.service]
        await self.bus.subscribe(subject, Ping, self._on_ping, queue=queue)
        nats_reconnects(lambda: self.bus.reconnects if self.bus else 0)
        log.info("service started", extra={"instance_id": self.settings.instance_id})

    async def _on_ping(self, ping: Ping, msg: Msg) -> Pong:
        return Pong(service=self.service, instance_id=self.settings.instance_id,
                    version=__version__, uptime_s=round(time.monotonic() - self.started, 3))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        log.info("service stopping")
        if self.bus is not None:
            await self.bus.close()
        if self.store is not None:
            await self.store.close()
        if self.pool is not None:
            await self.pool.close()
        shutdown_tracing()
