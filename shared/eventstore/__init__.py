"""The event store (Postgres) and the projection runner."""

from shared.eventstore.projections import Projection, ProjectionRunner
from shared.eventstore.store import (
    AppendResult,
    EventIdConflict,
    EventStore,
    WrongExpectedVersion,
)

__all__ = [
    "AppendResult",
    "EventIdConflict",
    "EventStore",
    "Projection",
    "ProjectionRunner",
    "WrongExpectedVersion",
]
