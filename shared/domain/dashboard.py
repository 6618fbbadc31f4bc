"""The dashboard's live figures as a pure fold of the event log (issue 15).

`Usage` folds `LLMCallCompleted` events into, per tenant: calls, tokens and spend of the
current UTC day, and the completion times of the last minute (calls per second). The
orchestrator's UI hub feeds it from the event store's follow; nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from shared.contracts.events import LLMCallCompleted, RecordedEvent

RATE_WINDOW_S = 10.0  # calls per second: completions of the last 10 s / 10
_KEEP_S = 60.0


@dataclass
class TenantUsage:
    day: str = ""
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0
    recent: deque[float] = field(default_factory=deque)  # completion times (epoch s)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def day_of(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).date().isoformat()


def start_of_day(now: datetime) -> datetime:
    now = now.astimezone(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass
class Usage:
    tenants: dict[str, TenantUsage] = field(default_factory=dict)

    def apply(self, rec: RecordedEvent) -> bool:
        """Fold one recorded event; True when it changed a figure."""
        event = rec.event
        if not isinstance(event, LLMCallCompleted):
            return False
        tenant = rec.metadata.tenant or "default"
        usage = self.tenants.setdefault(tenant, TenantUsage())
        day = day_of(rec.recorded_at)
        if usage.day != day:
            if day < usage.day:
                return False  # an older day's call (a late commit): not today's
            usage.day, usage.calls, usage.input_tokens = day, 0, 0
            usage.output_tokens, usage.cost_micro_usd = 0, 0
        usage.calls += 1
        usage.input_tokens += event.input_tokens
        usage.output_tokens += event.output_tokens
        usage.cost_micro_usd += event.cost_micro_usd
        at = rec.recorded_at.timestamp()
        usage.recent.append(at)
        while usage.recent and usage.recent[0] < at - _KEEP_S:
            usage.recent.popleft()
        return True

    def today(self, tenant: str | None, now: datetime) -> TenantUsage:
        """Today's figures of `tenant` (of every tenant when None)."""
        day = day_of(now)
        out = TenantUsage(day=day)
        for name, usage in self.tenants.items():
            if (tenant is None or name == tenant) and usage.day == day:
                out.calls += usage.calls
                out.input_tokens += usage.input_tokens
                out.output_tokens += usage.output_tokens
                out.cost_micro_usd += usage.cost_micro_usd
        return out

    def calls_per_s(self, tenant: str | None, now: float) -> float:
        since = now - RATE_WINDOW_S
        n = sum(sum(1 for t in usage.recent if t >= since)
                for name, usage in self.tenants.items() if tenant is None or name == tenant)
        return n / RATE_WINDOW_S


def sparkline(values: list[float | None], width: int = 120, height: int = 24,
              top: float = 100.0) -> str:
    """An SVG polyline's points for `values` (0..top), oldest left; "" when none."""
    points = [v for v in values if v is not None]
    if len(points) < 2:
        return ""
    step = width / (len(points) - 1)
    return " ".join(f"{i * step:.1f},{height - min(max(v, 0.0), top) / top * height:.1f}"
                    for i, v in enumerate(points))
