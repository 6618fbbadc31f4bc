"""NATS messaging: typed msgspec messages, trace context in headers, clear errors.

- `Bus.publish` / `Bus.request` encode a msgspec Struct, inject the W3C trace context
  (`traceparent`, `tracestate`) into the headers and open a PRODUCER/CLIENT span
  named `"{subject} publish"` with `messaging.system = "nats"`.
- `Bus.subscribe` decodes into the declared type, opens a CONSUMER/SERVER span named
  `"{subject} process"` as a child of the sender's span, and replies with what the
  handler returns. A message that does not decode is logged with its subject and
  republished to `nexus.deadletter.<subject>`; the subscriber keeps going. A handler
  that raises answers a request with an error reply (`Nexus-Error` header), so the
  caller gets a `RemoteError` instead of a timeout.
- Requests time out with `RequestTimeout` naming the subject; no responders raise
  `NoResponders` at once.
- The connection reconnects forever; nats-py re-subscribes after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy, DiscardPolicy, StreamConfig
from nats.js.errors import BadRequestError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.contracts import subjects
from shared.infra.tasks import stop_tasks
from shared.infra.tracing import extract_context, inject_headers, tracer

log = logging.getLogger("nexus.messaging")

T = TypeVar("T", bound=msgspec.Struct)
Handler = Callable[[Any, Msg], Awaitable[msgspec.Struct | None]]

ERROR_HEADER = "Nexus-Error"

_encoder = msgspec.json.Encoder()


class MessagingError(RuntimeError):
    pass


class RequestTimeout(MessagingError):
    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on {subject!r} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class NoResponders(MessagingError):
    def __init__(self, subject: str) -> None:
        super().__init__(f"no service is listening on {subject!r}")
        self.subject = subject


class RemoteError(MessagingError):
    """The responder handled the request and reported an error."""

    def __init__(self, subject: str, error: str, detail: str) -> None:
        super().__init__(f"{subject!r} answered {error}: {detail}")
        self.subject = subject
        self.error = error
        self.detail = detail


class ErrorReply(msgspec.Struct, frozen=True):
    error: str
    detail: str


class HandlerError(Exception):
    """Raise from a handler to answer with a specific error class and detail."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


def _attrs(subject: str, operation: str, size: int) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
        "messaging.message.body.size": size,
    }


async def stop_listening(tasks: list[asyncio.Task], subscriptions: list[Any]) -> None:
    """Cancel a component's background tasks (waiting for them, bounded: `stop_tasks`)
    and drop its subscriptions."""
    await stop_tasks(list(tasks))
    for sub in subscriptions:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


_UNREACHABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.NoServersError, nats.errors.OutboundBufferLimitError,
                nats.errors.StaleConnectionError, nats.errors.FlushTimeoutError)


def messaging_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means NATS, or whoever should answer on it, cannot be reached right
    now (a restart, a reconnect, a JetStream API request unanswered): something to
    retry later, not a bug: no reply in time, no responder, or nats-py's transport
    errors (a responder's own error reply, `RemoteError`, is not one)."""
    return any(isinstance(err, (RequestTimeout, NoResponders, *_UNREACHABLE))
               for err in (exc, exc.__cause__, exc.__context__))


async def subscriptions_held(nc: Any) -> None:
    """Return once the server holds every subscription `nc` has made. nats-py's `flush()`
    writes its PING straight to the socket, ahead of a SUB still queued for the client's
    flusher task, so the PONG of one flush right after `subscribe()` does not prove the
    server has the SUB (another connection's message could still meet no subscriber: a
    "no responders" seen once in CI). The flusher writes the SUB while that flush waits,
    so a second flush's PING follows it, and its PONG does."""
    await nc.flush()
    await nc.flush()


class Bus:
    """One NATS connection of a service, with typed, traced publish/request/subscribe."""

    def __init__(self, nc: NatsClient, service: str) -> None:
        self.nc = nc
        self.service = service
        self.js = nc.jetstream()
        self._tracer = tracer("nexus.messaging")
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    @classmethod
    async def connect(cls, url: str, service: str, *, user: str | None = None,
                      password: str | None = None, connect_timeout: float = 5.0,
                      inbox_prefix: str | None = None) -> Bus:
        holder: dict[str, Bus] = {}

        async def on_disconnect() -> None:
            log.warning("nats disconnected", extra={"nats_url": url})

        async def on_reconnect() -> None:
            if "bus" in holder:
                holder["bus"].reconnects += 1
            log.info("nats reconnected", extra={"nats_url": url})

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", exc, extra={"nats_url": url})

        extra = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
        nc = await nats.connect(
            servers=[url],
            name=service,
            **extra,
            user=user,
            password=password,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        bus = cls(nc, service)
        holder["bus"] = bus
        return bus

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Drain subscriptions (in-flight handlers finish), then close. Without a server
        to drain to (NATS is down), or past the timeout, just close: a stopping process
        must not wait for a server that is not there."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=drain_timeout_s)
        if self.nc.is_connected:
            try:
                await asyncio.wait_for(self.nc.drain(), drain_timeout_s)
            except (TimeoutError, nats.errors.ConnectionClosedError,
                    nats.errors.FlushTimeoutError, nats.errors.ConnectionDrainingError):
                pass
        closing = None
        if not self.nc.is_closed:
            closing = asyncio.ensure_future(self.nc.close())
            await asyncio.wait({closing}, timeout=drain_timeout_s)
        # nats-py's reconnect loop can outlive close(): a cancel that lands while its
        # connect attempt's `wait_for` completes is lost (Python 3.11, CPython gh-86296);
        # the loop then sets RECONNECTING over CLOSED and retries forever, and the
        # process never exits (`asyncio.run` waits for every task). Stop it ourselves.
        await stop_tasks([closing, getattr(self.nc, "_reconnection_task", None)],
                         timeout_s=drain_timeout_s)

    # -- streams ------------------------------------------------------------------

    async def ensure_streams(self, specs: tuple[subjects.StreamSpec, ...] = subjects.STREAMS) -> None:
        """Create each stream, or update it to the declared config; safe to repeat."""
        for spec in specs:
            config = StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                description=spec.description or None,
                max_age=spec.max_age_s,
                max_msgs=spec.max_msgs,
                max_bytes=spec.max_bytes,
                max_msgs_per_subject=spec.max_msgs_per_subject,
            )
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)
        if specs is subjects.STREAMS:
            await self.ensure_object_stores()

    async def ensure_object_stores(
            self, specs: tuple[subjects.ObjectStoreSpec, ...] = subjects.OBJECT_STORES) -> None:
        """Create each Object Store bucket, or update it to the declared limits; safe to
        repeat. The stream is configured as nats-py's `create_object_store` does (rollup
        headers, direct get, DiscardNew), with our size and age limits."""
        for spec in specs:
            config = StreamConfig(
                name=spec.stream,
                description=spec.description or None,
                subjects=[f"$O.{spec.bucket}.C.>", f"$O.{spec.bucket}.M.>"],
                max_age=spec.ttl_s,
                max_bytes=spec.max_bytes,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                allow_direct=True,
            )
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)

    # -- publish / request --------------------------------------------------------

    async def publish(self, subject: str, message: msgspec.Struct, *, traced: bool = True) -> None:
        """Publish; `traced=False` for high-rate telemetry (heartbeats): no span."""
        payload = _encoder.encode(message)
        if not traced:
            await self.nc.publish(subject, payload)
            return
        with self._tracer.start_as_current_span(
            f"{subject} publish", kind=SpanKind.PRODUCER,
            attributes=_attrs(subject, "send", len(payload)),
        ):
            await self.nc.publish(subject, payload, headers=inject_headers())

    async def request(self, subject: str, message: msgspec.Struct, reply_type: type[T],
                      timeout: float = 5.0) -> T:
        payload = _encoder.encode(message)
        with self._tracer.start_as_current_span(
            f"{subject} publish", kind=SpanKind.CLIENT,
            attributes=_attrs(subject, "send", len(payload)),
        ) as span:
            try:
                reply = await self.nc.request(subject, payload, timeout=timeout,
                                              headers=inject_headers())
            except nats.errors.NoRespondersError as exc:
                span.set_status(Status(StatusCode.ERROR, "no responders"))
                raise NoResponders(subject) from exc
            except nats.errors.TimeoutError as exc:
                span.set_status(Status(StatusCode.ERROR, "timeout"))
                raise RequestTimeout(subject, timeout) from exc
            if reply.headers and ERROR_HEADER in reply.headers:
                err = msgspec.json.decode(reply.data, type=ErrorReply)
                span.set_status(Status(StatusCode.ERROR, err.error))
                raise RemoteError(subject, err.error, err.detail)
            try:
                return msgspec.json.decode(reply.data, type=reply_type)
            except msgspec.DecodeError as exc:
                raise MessagingError(
                    f"reply on {subject!r} is not a valid {reply_type.__name__}: {exc}"
                ) from exc

    # -- subscribe ----------------------------------------------------------------

    async def subscribe(self, subject: str, message_type: type[T],
                        handler: Callable[[T, Msg], Awaitable[msgspec.Struct | None]],
                        *, queue: str = "", concurrent: bool = False) -> Subscription:
        """Run `handler` for each message on `subject` (in `queue` if given).

        With `concurrent=True` each message runs in its own task (for handlers that
        wait on I/O); otherwise messages of this subscription are handled in order.
        """
        decoder = msgspec.json.Decoder(message_type)

        async def on_message(msg: Msg) -> None:
            if concurrent:
                task = asyncio.create_task(self._handle(msg, decoder, handler))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self._handle(msg, decoder, handler)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_message)
        await subscriptions_held(self.nc)  # the server has the subscription when this returns
        return sub

    async def subscribe_stream(self, subject: str, message_type: type[T],
                               handler: Callable[[T, Msg], Awaitable[None]], *,
                               deliver_policy: DeliverPolicy = DeliverPolicy.LAST_PER_SUBJECT,
                               traced: bool = False) -> Any:
        """Follow a JetStream stream with an ordered (ephemeral, self-healing) consumer.

        The default delivers the last message of every subject first, then new ones:
        what a process needs to rebuild an in-memory view at start and keep it live.
        Decoding, dead-lettering and error handling are those of `subscribe`.
        """
        decoder = msgspec.json.Decoder(message_type)

        async def on_message(msg: Msg) -> None:
            await self._handle(msg, decoder, handler, traced=traced)

        return await self.js.subscribe(subject, cb=on_message, ordered_consumer=True,
                                       deliver_policy=deliver_policy)

    async def _handle(self, msg: Msg, decoder: msgspec.json.Decoder, handler: Handler, *,
                      traced: bool = True) -> None:
        ctx = extract_context(msg.headers)
        kind = SpanKind.SERVER if msg.reply else SpanKind.CONSUMER
        span_cm = self._tracer.start_as_current_span(
            f"{msg.subject} process", context=ctx, kind=kind,
            attributes=_attrs(msg.subject, "process", len(msg.data)),
        ) if traced else contextlib.nullcontext(trace.INVALID_SPAN)
        with span_cm as span:
            try:
                message = decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                span.set_status(Status(StatusCode.ERROR, "undecodable message"))
                await self._dead_letter(msg, f"undecodable: {exc}")
                await self._reply_error(msg, "InvalidMessage", str(exc))
                return
            try:
                result = await handler(message, msg)
            except HandlerError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.error))
                await self._reply_error(msg, exc.error, exc.detail)
                return
            except Exception as exc:  # a handler bug must not kill the subscriber
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.exception("handler failed", extra={"subject": msg.subject})
                await self._reply_error(msg, type(exc).__name__, "internal error in handler")
                return
            if msg.reply and result is not None:
                await self.nc.publish(msg.reply, _encoder.encode(result), headers=inject_headers())

    async def _reply_error(self, msg: Msg, error: str, detail: str) -> None:
        if msg.reply:
            await self.nc.publish(
                msg.reply, _encoder.encode(ErrorReply(error, detail)), headers={ERROR_HEADER: error}
            )

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        log.warning("dropping undecodable message to dead letter",
                    extra={"subject": msg.subject, "reason": reason[:500]})
        headers = {"Nexus-Reason": reason[:500].replace("\n", " "), "Nexus-Subject": msg.subject}
        try:
            await self.nc.publish(subjects.deadletter(msg.subject), msg.data, headers=headers)
        except Exception:  # dead-lettering is best effort; the log line is the record
            log.exception("dead letter publish failed", extra={"subject": msg.subject})
