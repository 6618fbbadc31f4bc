"""`Idempotency-Key`: a retry with the same key and body has no second effect.

Two mechanisms, one rule (the replay returns the first answer; the same key with
another request is a 422):

* Requests that only append events (`POST /v1/sessions`, `POST /v1/keys`) need nothing
  extra: the key (and the request's hash) determine the ids of the events they append,
  so the event store recognises a retry as an exact duplicate and another body under
  the same key as a version conflict, all in the same transaction.
* Requests that spend or whose answer cannot be derived from events again (chat
  completions and session messages, streamed or not; policies; the tenant budget) go
  through `IdempotencyStore`: a record in the `idempotency_keys` table, per tenant,
  route and key, holding the request's hash and a state. Exactly one request claims a
  record (an atomic insert); it stores its response (status, the headers that matter,
  the body; for a stream the recorded SSE bytes) when it completes. A retry replays
  that response; a retry while the first still runs waits for it (bounded by
  `NEXUS_IDEMPOTENCY_WAIT_S`) and otherwise gets a 409 with `Retry-After`. A first
  attempt that ended without a final answer (server error, overload, rate limit, budget
  denial, a stream cut off) releases its record, so a retry runs again; a claim whose
  process died is taken over once its lease (`NEXUS_RESERVATION_TTL_S`) has passed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter
from litestar.response import Stream

from services.orchestrator.problems import PROBLEM_JSON, Problem, http_exception_handler

log = logging.getLogger("nexus.orchestrator.idempotency")

HEADER = "idempotency-key"
RETENTION_S = 24 * 3600  # a key may be reused for a new request after a day
REPLAYED_HEADER = "Idempotent-Replayed"
_NAMESPACE = uuid.UUID("5f0d1c7e-7d44-4a53-9f0e-2b8a3c1e6d10")
# headers of the first answer a replay repeats
_KEPT_HEADERS = ("x-nexus-session", "x-nexus-call-id", "cache-control")
# final answers are kept; these statuses mean "try again" and release the record
_RETRYABLE = frozenset({402, 408, 409, 425, 429})

# the header as OpenAPI declares it, on every route that honours it
KeyHeader = Annotated[str | None, HeaderParameter(
    name="Idempotency-Key", required=False,
    description="Makes a retry safe: the same key and request return the first answer "
                "(for a stream, the recorded answer) instead of running again; the same key "
                "with another request is a 422; a retry while the first still runs waits "
                "for it or gets a 409 with Retry-After. Kept for a day, per tenant and route.")]
RESPONSES: dict[int, ResponseSpec] = {
    409: ResponseSpec(None, description="A request with this Idempotency-Key is still running; "
                      "retry after Retry-After seconds", media_type=PROBLEM_JSON),
    422: ResponseSpec(None, description="Idempotency-Key was used before with another request",
                      media_type=PROBLEM_JSON),
}


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


def reused() -> Problem:
    return Problem(422, "idempotency-key-reused",
                   "Idempotency-Key was used before with a different request body",
                   errors=[{"field": "Idempotency-Key", "message": "used before with another request"}])


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    media_type: str
    body: bytes


@dataclass(frozen=True)
class Claim:
    """This request owns the record: it must `complete` or `release` it."""

    records: IdempotencyStore
    tenant: str
    route: str
    key_hash: str
    owner: uuid.UUID

    async def complete(self, stored: StoredResponse) -> None:
        await self.records.pool.execute(
            "UPDATE idempotency_keys SET state = 'completed', status = $5, headers = $6::jsonb,"
            " media_type = $7, body = $8, completed_at = now()"
            " WHERE tenant = $1 AND route = $2 AND key_hash = $3 AND owner = $4",
            self.tenant, self.route, self.key_hash, self.owner, stored.status,
            json.dumps(stored.headers), stored.media_type, stored.body)

    async def release(self) -> None:
        await self.records.pool.execute(
            "DELETE FROM idempotency_keys WHERE tenant = $1 AND route = $2 AND key_hash = $3"
            " AND owner = $4 AND state = 'running'", self.tenant, self.route, self.key_hash,
            self.owner)


class IdempotencyStore:
    """The `idempotency_keys` table: its only reader and writer."""

    def __init__(self, pool: asyncpg.Pool, *, lease_s: float, wait_s: float,
                 poll_s: float = 0.05) -> None:
        self.pool = pool
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.poll_s = poll_s

    async def begin(self, tenant: str, route: str, key: str,
                    request_hash: str) -> Claim | StoredResponse:
        """Claim the key for this request, or the first request's response to replay.

        Raises a 422 if the key was used with another request, a 409 with Retry-After
        if the first request is still running after `wait_s`.
        """
        key_hash = hashlib.sha256(key.encode()).hexdigest()
        owner = uuid.uuid4()
        deadline = time.monotonic() + self.wait_s
        while True:
            # exactly one concurrent request inserts (or takes over an abandoned or
            # expired record); the others see the row the winner holds
            claimed = await self.pool.fetchval(
                "INSERT INTO idempotency_keys AS r (tenant, route, key_hash, request_hash, state,"
                " owner, locked_until) VALUES ($1, $2, $3, $4, 'running', $5,"
                " now() + make_interval(secs => $6))"
                " ON CONFLICT (tenant, route, key_hash) DO UPDATE SET"
                " request_hash = EXCLUDED.request_hash, state = 'running', owner = EXCLUDED.owner,"
                " locked_until = EXCLUDED.locked_until, status = NULL, headers = NULL,"
                " media_type = NULL, body = NULL, created_at = now(), completed_at = NULL"
                " WHERE (r.state = 'running' AND r.locked_until < now())"
                " OR r.created_at < now() - make_interval(secs => $7)"
                " RETURNING owner", tenant, route, key_hash, request_hash, owner,
                float(self.lease_s), float(RETENTION_S))
            if claimed == owner:
                return Claim(self, tenant, route, key_hash, owner)
            row = await self.pool.fetchrow(
                "SELECT request_hash, state, status, headers::text AS headers, media_type, body,"
                " extract(epoch FROM locked_until - now()) AS left_s FROM idempotency_keys"
                " WHERE tenant = $1 AND route = $2 AND key_hash = $3", tenant, route, key_hash)
            if row is None:  # released by its owner a moment ago: claim it now
                continue
            if row["request_hash"] != request_hash:
                raise reused()
            if row["state"] == "completed":
                return StoredResponse(row["status"], json.loads(row["headers"] or "{}"),
                                      row["media_type"], bytes(row["body"]))
            if time.monotonic() >= deadline:
                raise Problem(409, "idempotency-key-in-use",
                              "a request with this Idempotency-Key is still running; retry later",
                              headers={"Retry-After": "1"})
            await asyncio.sleep(self.poll_s)

    async def purge(self) -> int:
        """Delete records older than the retention period."""
        done = await self.pool.execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
            float(RETENTION_S))
        return int(done.split()[-1])


def _replay(stored: StoredResponse) -> Response | Stream:
    headers = {**stored.headers, REPLAYED_HEADER: "true"}
    if stored.media_type.startswith("text/event-stream"):
        async def chunks() -> AsyncIterator[bytes]:
            yield stored.body
        return Stream(chunks(), status_code=stored.status, media_type=stored.media_type,
                      headers=headers)
    return Response(stored.body, status_code=stored.status, media_type=stored.media_type,
                    headers=headers)


def _kept(headers: Any) -> dict[str, str]:
    return {k: v for k, v in dict(headers).items() if k.lower() in _KEPT_HEADERS}


class Recorded:
    """What a handler returns under an Idempotency-Key: the body as bytes (the same bytes
    are sent first and replayed later), or a stream whose chunks are recorded; for a
    stream, `final()` says whether it ended with a final answer (worth keeping).

    `ready()`: what must hold before a body is sent or kept (a call's answer recorded);
    what it raises (a problem) is the answer instead, nothing of this one having left."""

    def __init__(self, status: int, headers: dict[str, str], media_type: str, *,
                 body: bytes | None = None, chunks: AsyncIterator[bytes] | None = None,
                 final: Callable[[], bool] = lambda: True,
                 ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.status, self.headers, self.media_type = status, headers, media_type
        self.body, self.chunks, self.final, self.ready = body, chunks, final, ready

    @classmethod
    def json(cls, obj: object, *, status: int = 200, headers: dict[str, str] | None = None,
             ready: Callable[[], Awaitable[None]] | None = None) -> Recorded:
        return cls(status, headers or {}, "application/json", body=msgspec.json.encode(obj),
                   ready=ready)


class _WhenReady(Response):
    """A response whose ASGI call first awaits `ready()`: Litestar makes it (headers,
    length) while that runs, and a problem `ready()` raises is answered in its place
    (by the exception handlers, as if the handler had raised it)."""

    __slots__ = ("ready",)

    def __init__(self, *args: Any, ready: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = ready

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().to_asgi_response(*args, **kwargs)
        ready = self.ready

        async def send_when_ready(scope: Any, receive: Any, send: Any) -> None:
            await ready()
            await response(scope, receive, send)

        return send_when_ready


async def _recording(claim: Claim, out: Recorded) -> AsyncIterator[bytes]:
    assert out.chunks is not None
    parts: list[bytes] = []
    kept = False
    try:
        async for chunk in out.chunks:
            parts.append(chunk)
            yield chunk
        kept = out.final()
    finally:
        try:
            await out.chunks.aclose()  # type: ignore[attr-defined]  # a client gone: cancel now
        finally:
            if kept:
                await asyncio.shield(claim.complete(StoredResponse(
                    out.status, _kept(out.headers), out.media_type, b"".join(parts))))
            else:  # cut off or failed without an answer: a retry runs again
                await asyncio.shield(claim.release())


def _send(out: Recorded, chunks: AsyncIterator[bytes] | None = None) -> Response | Stream:
    if out.chunks is not None:
        return Stream(chunks or out.chunks, status_code=out.status, media_type=out.media_type,
                      headers=out.headers)
    if out.ready is not None:
        return _WhenReady(out.body, status_code=out.status, media_type=out.media_type,
                          headers=out.headers, ready=out.ready)
    return Response(out.body, status_code=out.status, media_type=out.media_type,
                    headers=out.headers)


async def run_once(request: Request, tenant: str, records: IdempotencyStore,
                   handler: Callable[[], Awaitable[Recorded]], *,
                   also: tuple[str | None, ...] = ()) -> Response | Stream:
    """Run `handler` at most once per (tenant, route, Idempotency-Key).

    The request's hash covers its body and `also` (request headers that change what it
    means, e.g. `X-Nexus-Session`). Without the header the handler simply runs.
    """
    key = validate_key(request.headers.get(HEADER))
    if key is None:
        return _send(await handler())
    hashed = body_hash(await request.body() + b"".join(b"\x00" + (v or "").encode() for v in also))
    got = await records.begin(tenant, f"{request.method} {request.url.path}", key, hashed)
    if isinstance(got, StoredResponse):
        return _replay(got)
    claim = got
    try:
        out = await handler()
        if out.ready is not None:  # kept only once it holds
            await out.ready()
            out.ready = None
    except HTTPException as exc:
        if exc.status_code >= 500 or exc.status_code in _RETRYABLE:
            await asyncio.shield(claim.release())
        else:  # a final refusal (validation, policy, not found): the retry gets it too
            problem = http_exception_handler(request, exc)
            await asyncio.shield(claim.complete(StoredResponse(
                problem.status_code, {}, PROBLEM_JSON, msgspec.json.encode(problem.content))))
        raise
    except BaseException:
        await asyncio.shield(claim.release())
        raise
    if out.chunks is not None:
        return _send(out, _recording(claim, out))
    await asyncio.shield(claim.complete(StoredResponse(
        out.status, _kept(out.headers), out.media_type, out.body or b"")))
    return _send(out)
