"""Every NATS subject and JetStream stream Nexus uses, declared once.

Services import names from here and never spell a subject inline. Subjects are
`nexus.<area>.<...>`; per-entity subjects are built by the functions below.
docs/ARCHITECTURE.md has the subject map.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "nexus"

# Service liveness: request/reply, answered by one instance of the queue group.
PING_ORCHESTRATOR = f"{PREFIX}.orchestrator.ping"
PING_PROVIDER = f"{PREFIX}.provider.ping"
PING_NODE = f"{PREFIX}.node.ping"

# Queue groups (one per service kind: instances of a service share the work).
QUEUE_ORCHESTRATOR = "orchestrator"
QUEUE_PROVIDER = "provider"
QUEUE_NODE = "node"

# Messages that could not be decoded are republished here with the reason.
DEADLETTER_PREFIX = f"{PREFIX}.deadletter"


def deadletter(subject: str) -> str:
    return f"{DEADLETTER_PREFIX}.{subject}"


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream; created or updated idempotently at service start."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    max_msgs: int = -1
    max_bytes: int = -1
    description: str = ""


DEADLETTER_STREAM = StreamSpec(
    name="NEXUS_DEADLETTER",
    subjects=(f"{DEADLETTER_PREFIX}.>",),
    max_age_s=7 * 24 * 3600,
    max_msgs=100_000,
    max_bytes=256 * 1024 * 1024,
    description="Undecodable NATS messages, kept a week for inspection",
)

STREAMS: tuple[StreamSpec, ...] = (DEADLETTER_STREAM,)
