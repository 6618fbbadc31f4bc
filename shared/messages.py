"""NATS message bodies (requests, replies, notifications), declared once.

Each subject in `shared.subjects` carries exactly one of these types. Like events
they are msgspec Structs; unlike events they are not stored, so they may change
between versions as long as old senders stay decodable (add fields with defaults).
"""

from __future__ import annotations

import msgspec


class Ping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sender: str


class Pong(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    instance_id: str
    version: str
    uptime_s: float
