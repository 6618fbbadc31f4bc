"""The event store (Postgres) and the projection runner."""

from shared.infra.eventstore.projections import Projection, ProjectionRunner
from shared.infra.eventstore.store import (
    AppendResult,
    EventIdConflict,
    EventStore,
    StoredEvent,
    WrongExpectedVersion,
)

__all__ = [
    "AppendResult",
    "EventIdConflict",
    "EventStore",
    "Projection",
    "ProjectionRunner",
    "StoredEvent",
    "WrongExpectedVersion",
]
