"""Streaming over NATS, with flow control and cancellation.

A streamed reply (LLM tokens) travels as frames on the requester's reply subject:

    requester                                  sender (provider / node)
    request(reply=_INBOX.a) ------------------>
                         <------------------ Started(control=_INBOX.b)
                         <------------------ Delta(seq=1) ... Delta(seq=n)
    Credit(acked=k) -----------------------> (on _INBOX.b)
    Cancel ------------------------------->  (client went away)
                         <------------------ Done(usage...) | Failed(error...)

- **Flow control**: the sender never has more than `window` Delta frames unacknowledged; the
  receiver acknowledges every `window // 4`. A slow client therefore slows the
  upstream read instead of growing a buffer.
- **Lost consumer**: a sender blocked on credit for `idle_timeout_s` gives up and
  cancels its upstream work, so a vanished receiver stops the generation.
- **Cancellation**: the receiver publishes `Cancel` on the control subject; the sender's
  work under `StreamSender.cancellable` is cancelled at once (one task, no waiter task).
- **Liveness**: the sender publishes a `Keepalive` every `KEEPALIVE_S` while it has
  nothing else to say (retries, backoff, a slow first token), so a receiver whose sender
  died (a killed provider) notices within `idle_timeout_s` instead of waiting forever.
- **Per connection, not per stream**: the senders of one connection share one control
  subscription (`<inbox>.*`, each stream's control subject one token under it) and one
  keepalive ticker (`_Controls`): a stream costs no SUB/UNSUB, no subscription task and
  no keepalive task of its own (issue 16). The receivers of one connection likewise
  share one reply subscription (`_Replies`): each stream's reply subject is one token
  under it, and frames are handed to the stream's queue by subject.
- **Coalescing**: content deltas given to `StreamSender.delta()` within one turn of the
  event loop (the tokens of one upstream socket read) leave as ONE `Delta` frame, their
  content concatenated in order, published on the loop's next turn by a task created
  once per frame. A token that arrives alone goes at once (no timer, no sleep); a burst
  goes as one frame. A delta with `tool_calls` is never merged (what is pending goes
  first, then it alone); content given `held` (a whole answer's text, its end right
  behind it) waits for the end frame and leaves with it, in one socket write (no task
  made, no frame of its own ahead of the end); `done()`, `fail()` and leaving the
  sender publish what is pending first. No frame carries more than `FRAME_MAX_CHARS`
  (what is pending leaves before it would, a longer piece is split), far below NATS's
  max_payload. `seq`
  counts the frames published, so the window and the receiver's `Credit` count frames;
  a failed deferred publish is raised by the next `delta()`/`done()`/`fail()` (issue
  16).
- **`Started` rides the first frame**: it is published just before the stream's first
  frame, in the same loop turn, so both leave in one socket write and the receiver takes
  them in one read; when no frame comes within `STARTED_WAIT_S` (2 ms: a call waiting in
  the provider's queue, a slow first token) it goes alone. The receiver takes a frame
  that is already queued without arming a timer (issue 16, round 8).
- **One message for a whole answer**: to a receiver that asked for it (the request's
  `batch_frames`, `StreamSender(batches=True)`), the end frame and what leaves with it
  (`Started` not yet sent, held content) are one `Frames` message; the receiver reads
  its frames in order, as if each had come alone (issue 16, round 12).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.msg import Msg

from shared.contracts.frames import (
    Cancel,
    Control,
    Credit,
    Delta,
    Done,
    Failed,
    Frame,
    Frames,
    Keepalive,
    Started,
    ToolDone,
)
from shared.infra.messaging import Bus, NoResponders, RequestTimeout
from shared.infra.tracing import inject_headers

T = TypeVar("T")
log = logging.getLogger("nexus.streaming")


KEEPALIVE_S = 2.0


_enc = msgspec.json.Encoder()
_frame_dec = msgspec.json.Decoder(Frame)
_control_dec = msgspec.json.Decoder(Control)


class ConsumerLost(Exception):
    """The receiver stopped acknowledging: stop producing."""


class _SharedInbox:
    """One wildcard subscription (`<inbox>.*`) that a connection's streams share, each
    stream a subject one token under it: a stream costs no SUB, UNSUB or subscriber task
    of its own, and the NATS server's interest graph does not change per call."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self._ids = itertools.count(1)
        self._sub: asyncio.Future[Any] | None = None  # one subscribe, however many wait

    async def _new_subject(self) -> str:
        if self._sub is None or (self._sub.done() and (self._sub.cancelled()
                                                       or self._sub.exception() is not None)):
            self._sub = asyncio.ensure_future(
                self.nc.subscribe(f"{self.prefix}.*", cb=self._on_message))
        if not self._sub.done():
            await asyncio.shield(self._sub)
        self._sub.result()
        return f"{self.prefix}.{next(self._ids)}"

    async def _on_message(self, msg: Msg) -> None:
        raise NotImplementedError


class _Controls(_SharedInbox):
    """The control subscription and keepalive ticker one connection's senders share."""

    def __init__(self, nc: Any) -> None:
        super().__init__(nc)
        self.senders: dict[str, StreamSender] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def open(self, sender: StreamSender) -> str:
        control = await self._new_subject()
        self.senders[control] = sender
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._keep_alive())
        return control

    def close(self, control: str) -> None:
        self.senders.pop(control, None)

    async def _on_message(self, msg: Msg) -> None:
        sender = self.senders.get(msg.subject)
        if sender is not None:  # else: a stream already over
            sender.on_control(msg)

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while self.senders:  # ends when idle; the next stream starts it again
            await asyncio.sleep(KEEPALIVE_S / 2)
            now = loop.time()
            for sender in list(self.senders.values()):
                if now - sender._last_sent >= KEEPALIVE_S:
                    with contextlib.suppress(Exception):
                        await sender._publish(Keepalive())


_controls: weakref.WeakKeyDictionary[Any, _Controls] = weakref.WeakKeyDictionary()


class _Mailbox:
    """A stream's frames as they arrive, for its one reader: what `asyncio.Queue` did
    here (unbounded, first in first out) in a fifth of the Python calls (issue 16,
    round 11: a put and a get cost about 15 calls through the Queue, its counters,
    its `_finished` event and its waiter list, three frames a call)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Msg] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Msg) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Msg:
        return self._items.popleft()  # IndexError when empty

    async def get(self, timeout: float) -> Msg:
        """The next item, waited for at most `timeout` seconds (then `TimeoutError`):
        one timer, not `asyncio.timeout`'s scope and its task bookkeeping."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter  # expired or cancelled: a later put finds it done
            finally:
                timer.cancel()
                self._waiter = None
        return self._items.popleft()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Replies(_SharedInbox):
    """The reply subscription one connection's receivers share: frames go to the
    stream's mailbox by subject (the client writes one PUB per call, not SUB, PUB,
    UNSUB)."""

    def __init__(self, nc: Any) -> None:
        super().__init__(nc)
        self.queues: dict[str, _Mailbox] = {}

    async def open(self, queue: _Mailbox) -> str:
        inbox = await self._new_subject()
        self.queues[inbox] = queue
        return inbox

    def close(self, inbox: str) -> None:
        self.queues.pop(inbox, None)

    async def _on_message(self, msg: Msg) -> None:
        queue = self.queues.get(msg.subject)
        if queue is not None:  # else: a stream already over (a late keepalive, say)
            queue.put_nowait(msg)


_replies: weakref.WeakKeyDictionary[Any, _Replies] = weakref.WeakKeyDictionary()


STARTED_WAIT_S = 0.002  # how long `Started` waits to leave with the stream's first frame
# the most content one frame carries (a longer piece is split): a message stays far below
# NATS's max_payload (8 MB here) even when every character is escaped into six bytes
FRAME_MAX_CHARS = 512 * 1024


class StreamSender:
    """The producing side, inside a request handler."""

    def __init__(self, bus: Bus, reply: str, *, window: int = 64, idle_timeout_s: float = 15.0,
                 batches: bool = False) -> None:
        self.bus = bus
        self.reply = reply
        self.batches = batches  # the receiver takes `Frames` (its request said so)
        self.window = window
        self.idle_timeout_s = idle_timeout_s
        self.seq = 0
        self.acked = 0
        self.cancelled = asyncio.Event()
        self._credit = asyncio.Event()
        self._controls: _Controls | None = None
        self._control = ""
        self._last_sent = 0.0
        self._pending: list[str] = []  # content given this turn, not yet published
        self._pending_chars = 0  # the characters in `_pending`
        self._flusher: asyncio.Task[None] | None = None  # publishes `_pending` next turn
        self._flushing = False  # the flusher has started (it may be inside a publish)
        self._error: BaseException | None = None  # a deferred publish's failure
        self._started = False  # `Started` is published (or being published)
        self._start_timer: asyncio.TimerHandle | None = None  # sends it alone if no frame comes
        self._starter: asyncio.Task[None] | None = None
        self._on_cancel: list[Callable[[], Any]] = []  # what the receiver's Cancel cancels
        self._after_end: list[Callable[[], Any]] = []  # work behind the end frame

    async def cancellable(self, work: Awaitable[T]) -> T:
        """`work` in a task of its own, cancelled at once when the receiver cancels (then
        `ConsumerLost`, once the work has run its cleanup); cancelling the caller cancels
        the work too."""
        if self.cancelled.is_set():
            if asyncio.iscoroutine(work):
                work.close()
            raise ConsumerLost("the receiver cancelled")
        task = asyncio.ensure_future(work)
        self._on_cancel.append(task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and self.cancelled.is_set() and not (
                    current is not None and current.cancelling()):
                raise ConsumerLost("the receiver cancelled") from None
            raise
        finally:
            self._on_cancel.remove(task.cancel)

    def after_end(self, callback: Callable[[], Any]) -> None:
        """Run `callback()` behind the end frame: on a loop turn after `done()`/`fail()`
        handed it to the bus (whose write is scheduled first), or when the sender closes
        without one. For work the receiver does not wait for (a call's metrics): it stays
        off the path between the answer and its requester."""
        self._after_end.append(callback)

    def _schedule_after_end(self) -> None:
        if self._after_end:
            loop = asyncio.get_running_loop()
            for callback in self._after_end:
                loop.call_soon(callback)
            self._after_end.clear()

    async def __aenter__(self) -> StreamSender:
        nc = self.bus.nc
        controls = _controls.get(nc)
        if controls is None:
            controls = _controls[nc] = _Controls(nc)
        self._control = await controls.open(self)
        self._controls = controls
        loop = asyncio.get_running_loop()
        self._last_sent = loop.time()  # the keepalives count from here
        self._start_timer = loop.call_later(STARTED_WAIT_S, self._start_alone)
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                await self._drain()
            else:  # leaving on an error: still send what was given, never mask that error
                with contextlib.suppress(Exception):
                    await self._drain()
        finally:
            self._stop_flusher()
            self._schedule_after_end()
            if self._start_timer is not None:
                self._start_timer.cancel()
            if self._starter is not None and not self._started:  # not run yet: never will
                self._starter.cancel()
            if self._controls is not None:
                self._controls.close(self._control)

    def on_control(self, msg: Msg) -> None:
        try:
            control = _control_dec.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("bad stream control message", extra={"subject": msg.subject})
            return
        if isinstance(control, Cancel):
            self.cancelled.set()
            self._credit.set()
            for cancel in self._on_cancel:
                cancel()
        else:
            self.acked = max(self.acked, control.acked)
            self._credit.set()

    async def _publish(self, frame: msgspec.Struct) -> None:
        if not self._started:
            await self._publish_started()
        self._last_sent = asyncio.get_running_loop().time()
        await self.bus.nc.publish(self.reply, _enc.encode(frame))

    async def _publish_started(self) -> None:
        """`Started` ahead of the first frame: in the same loop turn, so both leave in
        one socket write and reach the receiver in one read. nats-py queues a publish
        before it awaits, so nothing published after this call can overtake it."""
        if self._started:
            return
        started = self._take_started()
        self._last_sent = asyncio.get_running_loop().time()
        await self.bus.nc.publish(self.reply, _enc.encode(started))

    def _take_started(self) -> Started:
        """`Started`, to be sent now (by the caller): it is not sent again."""
        self._started = True
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        return Started(control=self._control)

    def _start_alone(self) -> None:
        """No frame within STARTED_WAIT_S (a queued call, a slow first token): `Started`
        goes on its own, so the receiver learns the control subject and waits on."""
        self._start_timer = None
        if not self._started:
            self._starter = asyncio.get_running_loop().create_task(self._start_now())

    async def _start_now(self) -> None:
        try:
            await self._publish_started()
        except Exception as exc:  # noqa: BLE001 - raised by the producer's next call
            self._error = exc

    async def delta(self, content: str = "", tool_calls: list[dict[str, Any]] | None = None,
                    *, held: bool = False) -> None:
        """Send a delta: content is coalesced with the rest given this loop turn and goes
        out on the next; a tool_calls delta goes alone, after what is pending. Content
        given `held` (a whole answer's text, its end right behind it) waits for the end
        frame (or a tool-call delta) and leaves with it, in one socket write: no task is
        made to publish it, nor a frame of its own sent ahead (what would hold more than
        `FRAME_MAX_CHARS` leaves as a frame first, and a longer piece is split). Waits
        for credit when `window` frames are unacknowledged."""
        self._raise_deferred()
        if self.cancelled.is_set():
            raise ConsumerLost("the receiver cancelled")
        if tool_calls is not None:
            await self._drain()
            await self._wait_credit()
            self.seq += 1
            await self._publish(Delta(seq=self.seq, content=content, tool_calls=tool_calls))
            return
        if not content:
            return
        if len(content) > FRAME_MAX_CHARS:  # a long piece (a whole answer): in frames
            for start in range(0, len(content), FRAME_MAX_CHARS):
                await self.delta(content=content[start:start + FRAME_MAX_CHARS], held=held)
            return
        if self._pending and self._pending_chars + len(content) > FRAME_MAX_CHARS:
            await self._drain()  # what is pending leaves first: no frame beyond the bound
        if not self._pending:
            await self._wait_credit()  # a new frame: it needs credit, as every frame does
            self._raise_deferred()
        self._pending.append(content)  # else a frame already admitted: join it
        self._pending_chars += len(content)
        if not held and self._flusher is None:
            self._flushing = False
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _wait_credit(self) -> None:
        while self.seq - self.acked >= self.window and not self.cancelled.is_set():
            self._credit.clear()
            try:
                await asyncio.wait_for(self._credit.wait(), self.idle_timeout_s)
            except TimeoutError:
                raise ConsumerLost(f"no credit from the receiver for {self.idle_timeout_s:g}s") from None
        if self.cancelled.is_set():
            raise ConsumerLost("the receiver cancelled")

    async def _publish_pending(self) -> None:
        """One frame of what is pending; `_pending` is taken before the first await, and
        nats-py queues a publish before it awaits, so frames leave in seq order."""
        await self._publish(self._take_pending())

    def _take_pending(self) -> Delta:
        """What is pending as the next frame, to be sent now (by the caller)."""
        content = "".join(self._pending)
        self._pending.clear()
        self._pending_chars = 0
        self.seq += 1
        return Delta(seq=self.seq, content=content)

    async def _flush_soon(self) -> None:
        """The deferred publish, on the turn after the deltas were given."""
        self._flushing = True
        try:
            while self._pending and self._error is None:  # more may join while publishing
                await self._publish_pending()
        except Exception as exc:  # noqa: BLE001 - raised by the producer's next call
            self._error = exc
            self._pending.clear()
        finally:
            self._flusher = None

    async def _drain(self) -> None:
        """Publish what is pending now, in order, and surface a deferred failure."""
        flusher = self._flusher
        if flusher is not None and not self._flushing:  # not started: do its work here
            flusher.cancel()
            self._flusher = None
            flusher = None
        if self._pending and self._error is None:
            await self._publish_pending()
        if flusher is not None:  # it was inside a publish; nothing is left for it to take
            await asyncio.shield(flusher)  # it never raises: it keeps its error
        self._raise_deferred()

    def _raise_deferred(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self._pending.clear()
        self._pending_chars = 0

    async def done(self, done: Done | ToolDone) -> None:
        await self._end(done)

    async def fail(self, failed: Failed) -> None:
        await self._end(failed)

    async def _end(self, end: Done | ToolDone | Failed) -> None:
        """The end frame, after what is pending. To a receiver that takes `Frames`, what
        this turn gives (`Started` not yet sent, held content, the end) is one message."""
        if self.batches and self._flusher is None:
            self._raise_deferred()
            frames: list[Started | Delta | Done | ToolDone | Failed] = []
            if not self._started:
                frames.append(self._take_started())
            if self._pending:
                frames.append(self._take_pending())
            frames.append(end)
            self._last_sent = asyncio.get_running_loop().time()
            await self.bus.nc.publish(self.reply, _enc.encode(
                Frames(frames=tuple(frames)) if len(frames) > 1 else end))
        else:
            await self._drain()
            await self._publish(end)
        self._schedule_after_end()


class StreamReceiver:
    """The consuming side: send the request, iterate frames, acknowledge, cancel."""

    def __init__(self, bus: Bus, subject: str, request: msgspec.Struct, *,
                 first_frame_timeout_s: float, idle_timeout_s: float = 5 * KEEPALIVE_S,
                 window: int = 64) -> None:
        self.bus = bus
        self.subject = subject
        self.request = request
        self.first_frame_timeout_s = first_frame_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.window = window
        self.control: str | None = None
        self._queue = _Mailbox()
        self._replies: _Replies | None = None
        self._inbox = ""
        self._finished = False

    async def __aenter__(self) -> StreamReceiver:
        nc = self.bus.nc
        replies = _replies.get(nc)
        if replies is None:
            replies = _replies[nc] = _Replies(nc)
        self._inbox = await replies.open(self._queue)
        self._replies = replies
        try:
            await nc.publish(self.subject, _enc.encode(self.request), reply=self._inbox,
                             headers=inject_headers())
        except BaseException:
            replies.close(self._inbox)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if not self._finished:
                await self.cancel()
        finally:
            if self._replies is not None:
                self._replies.close(self._inbox)

    async def cancel(self, reason: str = "client went away") -> None:
        # No flush here: this runs while a task is being cancelled, and a flush cancelled
        # mid-wait leaves nats-py a cancelled PONG future that later kills its read loop.
        # The client's flusher sends the publish promptly anyway.
        if self.control and not self._finished:
            with contextlib.suppress(Exception):
                await self.bus.nc.publish(self.control, _enc.encode(Cancel(reason=reason)))
        self._finished = True

    async def frames(self) -> AsyncIterator[Delta | Done | Failed]:
        timeout = self.first_frame_timeout_s
        acked = 0
        queue = self._queue
        while True:
            try:
                if queue.empty():  # else the frame is taken without a timer or a task
                    msg = await queue.get(timeout)
                else:
                    msg = queue.get_nowait()
            except TimeoutError:
                if self.control is None:
                    raise RequestTimeout(self.subject, timeout) from None
                raise RequestTimeout(f"{self.subject} (stream stalled)", timeout) from None
            if msg.headers and msg.headers.get("Status") == "503":
                raise NoResponders(self.subject)
            try:
                frame = _frame_dec.decode(msg.data)
            except msgspec.DecodeError:
                # an error reply of Bus.subscribe (undecodable request, handler crash)
                raise RemoteStreamError(msg) from None
            timeout = self.idle_timeout_s
            for frame in frame.frames if isinstance(frame, Frames) else (frame,):
                if isinstance(frame, Keepalive):
                    continue
                if isinstance(frame, Started):
                    self.control = frame.control
                    continue
                if isinstance(frame, Delta):
                    if self.control and frame.seq - acked >= max(1, self.window // 4):
                        acked = frame.seq
                        await self.bus.nc.publish(self.control, _enc.encode(Credit(acked=acked)))
                    yield frame
                    continue
                self._finished = True
                yield frame
                return


class RemoteStreamError(Exception):
    def __init__(self, msg: Msg) -> None:
        error = (msg.headers or {}).get("Nexus-Error", "InvalidReply")
        super().__init__(f"stream on {msg.subject!r} answered {error}: {msg.data[:200]!r}")
        self.error = error
