"""Orchestrator liveness over NATS: release the budget reservations of a lost process.

Each orchestrator process has a liveness id, `<NEXUS_INSTANCE_ID>.<boot nonce>` (the
nonce makes a restarted process with the same instance id a new one), recorded on every
reservation it makes (`BudgetReserved.instance`). For as long as its NATS connection
lives it is subscribed to its own `subjects.orchestrator_instance(id)`.

Every orchestrator probes the holders of open reservations (the `budgets` read model)
with a request on their subject:

- an answer, or a timeout: alive. The subscription is the server's, not the event
  loop's: a process whose loop stalls keeps it, its probes time out, and it is never
  taken for dead;
- "no responders" (the server knows no subscriber: the process was killed and its
  connection closed, or it is cut off from NATS): suspect. Suspect without a break for
  `NEXUS_ORCHESTRATOR_LOST_AFTER_S` (long enough to ride out a NATS reconnect or
  restart), it is lost, and its reservations are released with reason
  "orchestrator-lost" (`BudgetManager.release_orphans`: fenced at each budget's
  version, idempotent across survivors).

A process cut off from NATS that long cannot finish its calls either: their answers
travel over NATS. Reservations without an instance (appended before this) wait for
their TTL, as do those of an instance no survivor sees lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.msg import Msg

from services.orchestrator.budget_manager import BudgetManager
from shared import __version__
from shared.contracts import subjects
from shared.contracts.messages import Ping, Pong
from shared.infra.messaging import Bus, MessagingError, NoResponders

log = logging.getLogger("nexus.orchestrator.liveness")


def liveness_id(instance_id: str) -> str:
    """This process's liveness id: its instance id and a nonce of this boot."""
    return f"{instance_id}.{uuid.uuid4().hex[:8]}"


class InstanceLiveness:
    """Answers for this process and releases the reservations of lost ones."""

    def __init__(self, bus: Bus, budgets: BudgetManager, instance: str, *,
                 lost_after_s: float, probe_timeout_s: float = 1.0) -> None:
        self.bus = bus
        self.budgets = budgets
        self.instance = instance
        self.lost_after_s = lost_after_s
        self.probe_timeout_s = probe_timeout_s
        self.interval_s = max(0.2, min(1.0, lost_after_s / 5))
        self.started = time.monotonic()
        self.suspects: dict[str, float] = {}  # instance -> first "no responders" (monotonic)

    async def start(self) -> None:
        await self.bus.subscribe(subjects.orchestrator_instance(self.instance), Ping, self._answer)

    async def _answer(self, ping: Ping, msg: Msg) -> Pong:
        return Pong(service="orchestrator", instance_id=self.instance, version=__version__,
                    uptime_s=round(time.monotonic() - self.started, 3))

    async def probe(self, instance: str) -> bool | None:
        """False: no process holds `instance`; True: one answered or is busy; None: we
        cannot tell (our own connection is down)."""
        if not self.bus.connected:
            return None
        try:
            await self.bus.request(subjects.orchestrator_instance(instance),
                                   Ping(sender=self.instance), Pong, timeout=self.probe_timeout_s)
        except NoResponders:
            return False
        except MessagingError:
            return True  # subscribed but slow (a timeout) or answering with an error
        except Exception:  # noqa: BLE001 - a reconnecting connection, a closed one
            return None
        return True

    async def check(self, now: float | None = None) -> int:
        """One round: probe the holders of open reservations, release the lost ones'.
        Returns how many reservations were released."""
        holders = set(await self.budgets.read_model.reservation_holders()) - {self.instance}
        for gone in set(self.suspects) - holders:
            del self.suspects[gone]
        holders_list = sorted(holders)
        verdicts = await asyncio.gather(*(self.probe(i) for i in holders_list))
        now = time.monotonic() if now is None else now
        released = 0
        for instance, alive in zip(holders_list, verdicts):
            if alive is not False:
                self.suspects.pop(instance, None)
                continue
            since = self.suspects.setdefault(instance, now)
            if now - since < self.lost_after_s:
                continue
            count = await self.budgets.release_orphans(instance)
            del self.suspects[instance]
            released += count
            log.warning("orchestrator lost: its reservations released",
                        extra={"lost_instance": instance, "released": count,
                               "silent_s": round(now - since, 3)})
        return released

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - Postgres or NATS away: next round retries
                log.warning("liveness check failed: %s", exc)
            await asyncio.sleep(self.interval_s)
