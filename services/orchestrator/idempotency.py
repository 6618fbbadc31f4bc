"""`Idempotency-Key`: a retry with the same key and body has no second effect.

Nothing extra is stored: the key determines the ids of the events a request appends
(uuid5 of tenant, key and a purpose), so the event store recognises a retry as an
exact duplicate; the request's body hash travels in the events' metadata, so the same
key with another body is detected and refused with a 422.
"""

from __future__ import annotations

import hashlib
import uuid

from shared.eventstore import EventStore
from services.orchestrator.problems import Problem

HEADER = "idempotency-key"
_NAMESPACE = uuid.UUID("5f0d1c7e-7d44-4a53-9f0e-2b8a3c1e6d10")


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def derived_id(tenant: str, key: str, purpose: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{tenant}\x00{key}\x00{purpose}")


def validate_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise Problem(400, "validation", "Idempotency-Key: must be 1 to 200 characters",
                      errors=[{"field": "Idempotency-Key", "message": "must be 1 to 200 characters"}])
    return key


async def ensure_same_request(store: EventStore, stream_id: str, request_hash: str,
                              key: str) -> None:
    """After a duplicate append: refuse if the first request had another body."""
    events = await store.read_stream(stream_id)
    stored = next((e.metadata.request_hash for e in events
                   if e.metadata.idempotency_key == key), None)
    if stored is not None and stored != request_hash:
        raise Problem(422, "idempotency-key-reused",
                      "Idempotency-Key was used before with a different request body")
