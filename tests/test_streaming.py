"""Streams over NATS (shared/infra/streaming.py): credit flow control against a slow consumer,
a vanished one and one that cancels. Real NATS; sender and receiver on connections of
their own, as the provider and the orchestrator are."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
import pytest

from shared.contracts.frames import Delta, Done, Failed, Usage
from shared.contracts.messages import Ping
from shared.infra import EmbeddedNats
from shared.infra.messaging import Bus
from shared.infra.streaming import (
    KEEPALIVE_S,
    ConsumerLost,
    StreamReceiver,
    StreamSender,
    _Mailbox,
)

WINDOW = 8


def done() -> Done:
    return Done(finish_reason="stop", usage=Usage(), model="m", provider="p")


PROBE = b"probe"


async def reachable(consumer: Bus, subject: str) -> None:
    """Wait until the consumer's connection sees the producer's subscription (a probe
    answered), so a test starts from a served subject and not from a race."""
    for _ in range(50):
        try:
            await consumer.nc.request(subject, PROBE, timeout=1)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)
    pytest.fail(f"{subject} never became reachable")


@pytest.fixture
async def buses(infra) -> AsyncIterator[tuple[Bus, Bus]]:
    producer = await Bus.connect(infra.nats_url, "test-producer")
    consumer = await Bus.connect(infra.nats_url, "test-consumer")
    yield producer, consumer
    await consumer.close()
    await producer.close()


async def serve(bus: Bus, produce: Callable[[StreamSender], Awaitable[None]], *,
                idle_timeout_s: float = 15.0, batches: bool = False) -> tuple[str, asyncio.Future]:
    """A producer on a fresh subject: each request gets a StreamSender (window 8) run
    by `produce`; the future holds what it ended with (None or the exception)."""
    subject = f"test.stream.{uuid.uuid4().hex[:8]}"
    ended: asyncio.Future = asyncio.get_running_loop().create_future()

    async def run(reply: str) -> None:
        try:
            async with StreamSender(bus, reply, window=WINDOW, idle_timeout_s=idle_timeout_s,
                                    batches=batches) as s:
                await produce(s)
            ended.set_result(None)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            ended.set_result(exc)

    async def on_request(msg) -> None:
        if msg.data == PROBE:
            await msg.respond(b"ok")
            return
        asyncio.ensure_future(run(msg.reply))

    await bus.nc.subscribe(subject, cb=on_request)
    await bus.nc.flush()
    return subject, ended


async def test_a_slow_consumer_holds_the_producer_to_the_window(buses) -> None:
    producer, consumer = buses
    senders: list[StreamSender] = []

    async def produce(sender: StreamSender) -> None:
        senders.append(sender)
        for i in range(200):
            await sender.delta(content=str(i))
            await asyncio.sleep(0)  # a token per loop turn: each its own frame (coalescing)
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    ahead: list[int] = []
    received: list[str] = []
    async with StreamReceiver(consumer, subject, Ping(sender="slow"), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        async for frame in stream.frames():
            if isinstance(frame, Delta):
                # never more than a window beyond what this consumer has acknowledged
                ahead.append(senders[0].seq - frame.seq)
                received.append(frame.content)
                await asyncio.sleep(0.002)  # a slow client
    assert received == [str(i) for i in range(200)]  # every delta, in order
    assert max(ahead) <= WINDOW
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_vanished_consumer_stops_the_producer_at_the_window(buses) -> None:
    """The receiver takes the first frames and disappears without a word (no credit,
    no cancel): the producer sends one window, waits for credit, then gives up."""
    producer, consumer = buses
    produced: list[int] = []

    async def produce(sender: StreamSender) -> None:
        for i in range(200):
            await sender.delta(content=str(i))
            produced.append(i)
            await asyncio.sleep(0)  # a token per loop turn: each its own frame

    subject, ended = await serve(producer, produce, idle_timeout_s=0.5)
    await reachable(consumer, subject)
    inbox = consumer.nc.new_inbox()
    sub = await consumer.nc.subscribe(inbox)
    await consumer.nc.publish(subject, b'{"sender": "gone"}', reply=inbox)
    await sub.next_msg(timeout=10)  # Started: the producer is running
    await sub.unsubscribe()  # ... and the consumer is gone

    outcome = await asyncio.wait_for(ended, 20)
    assert isinstance(outcome, ConsumerLost) and "no credit" in str(outcome)
    assert produced == list(range(WINDOW))  # one window, not a delta more


async def test_a_cancelling_consumer_stops_the_producer(buses) -> None:
    producer, consumer = buses
    produced: list[int] = []

    async def produce(sender: StreamSender) -> None:
        for i in range(10_000):
            await sender.delta(content=str(i))
            produced.append(i)
            await asyncio.sleep(0)  # a token per loop turn: each its own frame

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    async with StreamReceiver(consumer, subject, Ping(sender="leaves"), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        async for frame in stream.frames():
            if isinstance(frame, Delta) and frame.seq == 3:
                break  # leaving the block sends Cancel
    outcome = await asyncio.wait_for(ended, 20)
    assert isinstance(outcome, ConsumerLost) and "cancelled" in str(outcome)
    assert len(produced) < 10_000


async def test_streams_sharing_a_connection_are_cancelled_one_by_one(buses) -> None:
    """The senders of one connection share its control subscription: a cancel reaches
    its own stream only, and each stream gets every credit meant for it."""
    producer, consumer = buses
    outcomes: dict[str, object] = {}

    async def on_request(msg) -> None:
        if msg.data == PROBE:
            await msg.respond(b"ok")
            return

        async def run() -> None:
            name = json.loads(msg.data)["sender"]
            try:
                async with StreamSender(producer, msg.reply, window=WINDOW) as sender:
                    for i in range(100 if name.startswith("keeps") else 10_000):
                        await sender.delta(content=str(i))
                        await asyncio.sleep(0)  # a token per loop turn: each its own frame
                    await sender.done(done())
                outcomes[name] = None
            except ConsumerLost as exc:
                outcomes[name] = exc

        asyncio.ensure_future(run())

    subject = f"test.stream.{uuid.uuid4().hex[:8]}"
    await producer.nc.subscribe(subject, cb=on_request)
    await producer.nc.flush()
    await reachable(consumer, subject)

    async def keeps(name: str) -> list[str]:
        async with StreamReceiver(consumer, subject, Ping(sender=name), first_frame_timeout_s=10,
                                  window=WINDOW) as stream:
            return [f.content async for f in stream.frames() if isinstance(f, Delta)]

    async def leaves() -> None:
        async with StreamReceiver(consumer, subject, Ping(sender="leaves"),
                                  first_frame_timeout_s=10, window=WINDOW) as stream:
            async for frame in stream.frames():
                if isinstance(frame, Delta) and frame.seq == 3:
                    break  # leaving the block sends Cancel

    kept = await asyncio.gather(keeps("keeps-1"), leaves(), keeps("keeps-2"))
    assert kept[0] == kept[2] == [str(i) for i in range(100)]  # a window at a time, all of it
    for _ in range(100):
        if len(outcomes) == 3:
            break
        await asyncio.sleep(0.1)
    assert outcomes["keeps-1"] is None and outcomes["keeps-2"] is None
    assert isinstance(outcomes["leaves"], ConsumerLost)


async def test_a_connections_streams_share_one_subscription_each_way(tmp_path) -> None:
    """A stream costs no SUB or UNSUB: the receivers of a connection share one reply
    subscription and the senders one control subscription, however many streams run,
    one after another or at once (the server's own counts, from its monitoring API)."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    producer = await Bus.connect(server.url, "test-producer")
    consumer = await Bus.connect(server.url, "test-consumer")
    try:
        async def produce(sender: StreamSender) -> None:
            await sender.delta(content="x")
            await sender.done(done())

        subject, _ = await serve(producer, produce)
        await reachable(consumer, subject)

        async def one() -> list[object]:
            async with StreamReceiver(consumer, subject, Ping(sender="s"),
                                      first_frame_timeout_s=10, window=WINDOW) as stream:
                return [frame async for frame in stream.frames()]

        def subscriptions() -> tuple[int, int, int]:  # now, ever added, ever removed
            with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/subsz",
                                        timeout=5) as reply:
                subsz = json.load(reply)
            return subsz["num_subscriptions"], subsz["num_inserts"], subsz["num_removes"]

        assert [type(f) for f in await one()] == [Delta, Done]
        before = subscriptions()
        for _ in range(10):
            await one()
        answers = await asyncio.gather(*[one() for _ in range(20)])
        assert all([type(f) for f in frames] == [Delta, Done] for frames in answers)
        await consumer.nc.flush()
        await producer.nc.flush()
        assert subscriptions() == before
    finally:
        await consumer.close()
        await producer.close()
        server.stop()


async def test_a_silent_sender_keeps_its_receiver_waiting(buses) -> None:
    """A sender with nothing to say (a slow first token) sends keepalives, so a receiver
    whose idle timeout is shorter than the silence keeps waiting, then gets the answer.
    (The ticker looks every `KEEPALIVE_S / 2`, so keepalives come less than 1.5 x
    `KEEPALIVE_S` apart: an idle timeout of exactly that raced the ticker's wake-up.)"""
    producer, consumer = buses

    async def produce(sender: StreamSender) -> None:
        await asyncio.sleep(2.5 * KEEPALIVE_S)
        await sender.delta(content="late")
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    async with StreamReceiver(consumer, subject, Ping(sender="patient"), first_frame_timeout_s=10,
                              idle_timeout_s=2 * KEEPALIVE_S, window=WINDOW) as stream:
        frames = [frame async for frame in stream.frames()]
    assert [type(f) for f in frames] == [Delta, Done] and frames[0].content == "late"
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_stream_without_frames_yet_can_be_cancelled(buses) -> None:
    """`Started` waits for the first frame only briefly: a sender with nothing to send
    yet (a call queued, a slow first token) still tells the receiver its control
    subject, so a client that leaves before the first token stops the producer."""
    producer, consumer = buses

    async def produce(sender: StreamSender) -> None:
        await asyncio.wait_for(sender.cancelled.wait(), 20)  # no frame: only a cancel ends it

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    async with StreamReceiver(consumer, subject, Ping(sender="leaves-early"),
                              first_frame_timeout_s=30, window=WINDOW) as stream:
        reading = asyncio.create_task(anext(stream.frames()))
        for _ in range(50):  # Started arrives alone: soon, not with a first keepalive
            if stream.control is not None:
                break
            await asyncio.sleep(0.01)
        assert KEEPALIVE_S >= 1  # (the first keepalive would carry Started too: later)
        assert stream.control is not None and not reading.done()
        reading.cancel()
    assert await asyncio.wait_for(ended, 10) is None  # the cancel reached the producer


async def test_started_leaves_in_the_same_write_as_a_first_frame_that_follows_at_once(
        buses) -> None:
    """A call answered at once: `Started` and its first frame go out in one socket write
    (one wake-up for each side, not two; issue 16, round 8)."""
    producer, consumer = buses
    writes: list[bytes] = []
    transport = producer.nc._transport
    write = transport.writelines

    def counted(payload) -> None:
        writes.append(b"".join(payload))
        write(payload)

    transport.writelines = counted

    async def produce(sender: StreamSender) -> None:
        await asyncio.sleep(0.0005)  # the upstream answers
        await sender.delta(content="first-token")
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    for _ in range(5):
        writes.clear()
        frames = await receive(consumer, subject, "quick")
        assert [type(f) for f in frames] == [Delta, Done]
        [started] = [w for w in writes if b'"type":"started"' in w]
        assert b"first-token" in started
    assert await asyncio.wait_for(ended, 10) is None


# -- coalescing: tokens given in one loop turn leave as one frame (issue 16) -----------------

async def receive(consumer: Bus, subject: str, name: str) -> list:
    async with StreamReceiver(consumer, subject, Ping(sender=name), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        return [frame async for frame in stream.frames()]


async def test_a_burst_of_deltas_given_in_one_turn_leaves_as_fewer_frames(buses) -> None:
    producer, consumer = buses
    pieces = [f"t{i} " for i in range(50)]

    async def produce(sender: StreamSender) -> None:
        for piece in pieces:  # no await that turns the loop: one upstream read's tokens
            await sender.delta(content=piece)
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    frames = await receive(consumer, subject, "burst")
    deltas, last = frames[:-1], frames[-1]
    assert isinstance(last, Done) and all(isinstance(f, Delta) for f in deltas)
    assert 1 <= len(deltas) < len(pieces)
    assert "".join(d.content for d in deltas) == "".join(pieces)  # all of it, in order
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))  # seq counts frames
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_delta_that_arrives_alone_is_sent_without_waiting_for_the_next(buses) -> None:
    """The producer gives the second delta only once the receiver holds the first: were
    the first held back for a following delta, this would never end."""
    producer, consumer = buses
    first_received = asyncio.Event()

    async def produce(sender: StreamSender) -> None:
        await sender.delta(content="alone")
        await asyncio.wait_for(first_received.wait(), 10)  # a guard, not a timing
        await sender.delta(content="next")
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    frames = []
    async with StreamReceiver(consumer, subject, Ping(sender="alone"), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        async for frame in stream.frames():
            frames.append(frame)
            first_received.set()
    assert [(type(f), getattr(f, "content", None)) for f in frames] == [
        (Delta, "alone"), (Delta, "next"), (Done, None)]
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_held_whole_answer_leaves_with_its_end_frame_and_no_flush_task(buses) -> None:
    """A whole answer's text given `held` is not published on its own, whatever the loop
    does meanwhile: it leaves with the end frame, as one `Delta` ahead of it, and no task
    is made to publish it. What was given to `after_end` runs once the end is on its way."""
    producer, consumer = buses
    loop = asyncio.get_running_loop()
    made: list[str] = []
    marks: dict[str, float] = {}

    async def produce(sender: StreamSender) -> None:
        factory = loop.get_task_factory()

        def counting(loop, coro, **kwargs):
            made.append(getattr(coro, "__qualname__", ""))
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counting)
        try:
            await sender.delta(content="the whole ", held=True)
            await sender.delta(content="answer", held=True)
            sender.after_end(lambda: marks.setdefault("after_end", loop.time()))
            await asyncio.sleep(0.2)  # many loop turns: nothing of it leaves meanwhile
            marks["done"] = loop.time()
            await sender.done(done())
            assert "after_end" not in marks  # not in the caller's turn
        finally:
            loop.set_task_factory(factory)

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    arrived: list[tuple[object, float]] = []
    async with StreamReceiver(consumer, subject, Ping(sender="held"), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        async for frame in stream.frames():
            arrived.append((frame, loop.time()))
    assert [type(f) for f, _ in arrived] == [Delta, Done]
    assert arrived[0][0].content == "the whole answer" and arrived[0][0].seq == 1
    assert all(at >= marks["done"] for _, at in arrived)
    assert marks["after_end"] >= marks["done"]
    assert not [name for name in made if "_flush_soon" in name]
    assert await asyncio.wait_for(ended, 10) is None


@pytest.mark.parametrize("batches, messages", [(True, 1), (False, 3)])
async def test_a_whole_answer_is_one_message_to_a_receiver_that_takes_frames(
        buses, batches: bool, messages: int) -> None:
    """To a receiver that asked for `Frames` (`CompletionRequest.batch_frames`), a held
    answer's `Started`, `Delta` and `Done` leave as one NATS message; to one that did not,
    as three. The receiver reads the same frames either way."""
    producer, consumer = buses
    published: list[int] = []

    async def produce(sender: StreamSender) -> None:
        before = producer.nc.stats["out_msgs"]
        await sender.delta(content="the whole ", held=True)
        await sender.delta(content="answer", held=True)
        await sender.done(done())
        published.append(producer.nc.stats["out_msgs"] - before)

    subject, ended = await serve(producer, produce, batches=batches)
    await reachable(consumer, subject)
    frames = await receive(consumer, subject, "batched")
    assert [(type(f), getattr(f, "content", None), getattr(f, "seq", None)) for f in frames] \
        == [(Delta, "the whole answer", 1), (Done, None, None)]
    assert published == [messages]
    assert await asyncio.wait_for(ended, 10) is None


@pytest.mark.parametrize("held", [True, False])
async def test_a_long_answer_leaves_in_frames_of_a_bounded_size(buses, monkeypatch,
                                                                held: bool) -> None:
    """No frame carries more than `FRAME_MAX_CHARS` (so no message outgrows what NATS
    carries): pending content that would exceed it leaves first, and a longer piece (a
    whole answer) is split; the receiver still gets all of it, in order."""
    from shared.infra import streaming

    monkeypatch.setattr(streaming, "FRAME_MAX_CHARS", 10)
    producer, consumer = buses
    pieces = ("abcdef", "ghijkl", "mno", "x" * 25)

    async def produce(sender: StreamSender) -> None:
        for piece in pieces:
            await sender.delta(content=piece, held=held)
        await sender.done(done())

    subject, ended = await serve(producer, produce, batches=True)
    await reachable(consumer, subject)
    frames = await receive(consumer, subject, "long")
    deltas = [f.content for f in frames if isinstance(f, Delta)]
    assert deltas == ["abcdef", "ghijklmno", "x" * 10, "x" * 10, "x" * 5]
    assert isinstance(frames[-1], Done) and "".join(deltas) == "".join(pieces)
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_tool_call_delta_is_never_merged_and_keeps_its_place(buses) -> None:
    producer, consumer = buses
    call = [{"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": "{}"}}]

    async def produce(sender: StreamSender) -> None:
        for i in range(5):
            await sender.delta(content=f"a{i}")
        await sender.delta(content="")  # adds nothing
        await sender.delta(tool_calls=call)
        for i in range(5):
            await sender.delta(content=f"b{i}")
        await sender.done(done())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    frames = await receive(consumer, subject, "tools")
    assert isinstance(frames[-1], Done)
    deltas = frames[:-1]
    tools = [i for i, d in enumerate(deltas) if d.tool_calls is not None]
    assert len(tools) == 1, deltas
    tool = deltas[tools[0]]
    assert tool.tool_calls == call and tool.content == ""  # its own frame
    assert "".join(d.content for d in deltas[:tools[0]]) == "a0a1a2a3a4"
    assert "".join(d.content for d in deltas[tools[0] + 1:]) == "b0b1b2b3b4"
    assert all(d.content for d in deltas if d.tool_calls is None)  # no empty frame
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
    assert await asyncio.wait_for(ended, 10) is None


async def test_a_failed_deferred_publish_is_raised_by_the_next_call(buses, monkeypatch) -> None:
    """A frame over the server's max_payload fails in the deferred publish: the producer's
    next call raises it, the stream still ends with its Failed, and no task is left.
    (A frame is bounded far below max_payload; here the bound is lifted to make one.)"""
    from shared.infra import streaming

    producer, consumer = buses
    monkeypatch.setattr(streaming, "FRAME_MAX_CHARS", 2 * producer.nc.max_payload)
    raised: list[BaseException] = []

    async def produce(sender: StreamSender) -> None:
        await sender.delta(content="x" * (producer.nc.max_payload + 1))
        await asyncio.sleep(0)  # one loop turn: the deferred publish runs and fails
        try:
            await sender.delta(content="after")
        except Exception as exc:  # noqa: BLE001 - asserted below
            raised.append(exc)
        await sender.fail(Failed(error="TooLarge", detail="a frame over max_payload"))

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    frames = await receive(consumer, subject, "fails")
    assert len(raised) == 1 and isinstance(raised[0], nats.errors.MaxPayloadError), raised
    assert [type(f) for f in frames] == [Failed]  # neither the big frame nor "after" went
    assert await asyncio.wait_for(ended, 10) is None
    assert not [t for t in asyncio.all_tasks() if "_flush_soon" in repr(t.get_coro())]


async def test_cancellable_work_is_cut_by_the_receivers_cancel_after_its_cleanup(buses) -> None:
    """`StreamSender.cancellable`: the receiver's Cancel cancels the work at once (it is
    not waiting for a frame to send), its cleanup runs, and the producer gets
    ConsumerLost; what the work returns or raises otherwise passes through."""
    producer, consumer = buses
    steps: list[str] = []

    async def upstream() -> None:  # an upstream request that would hang for a minute
        try:
            steps.append("waiting")
            await asyncio.sleep(60)
        finally:
            steps.append("cleaned up")

    async def produce(sender: StreamSender) -> None:
        assert await sender.cancellable(asyncio.sleep(0, "passes")) == "passes"
        with pytest.raises(KeyError):
            await sender.cancellable(_raises(KeyError("x")))
        await sender.delta(content="first")
        await sender.cancellable(upstream())

    subject, ended = await serve(producer, produce)
    await reachable(consumer, subject)
    async with StreamReceiver(consumer, subject, Ping(sender="cuts"), first_frame_timeout_s=10,
                              window=WINDOW) as stream:
        async for frame in stream.frames():
            if isinstance(frame, Delta):
                break  # leaving the block sends Cancel
    outcome = await asyncio.wait_for(ended, 10)  # not the upstream's minute
    assert isinstance(outcome, ConsumerLost) and "cancelled" in str(outcome)
    assert steps == ["waiting", "cleaned up"]


async def _raises(exc: BaseException) -> None:
    raise exc


async def test_cancelling_the_caller_of_cancellable_work_cancels_the_work(buses) -> None:
    """A producer cancelled from its own side (its service stopping) is not a receiver's
    cancel: the work is cancelled with it and CancelledError, not ConsumerLost, goes on."""
    producer, _ = buses
    steps: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            steps.append("work cancelled")

    async with StreamSender(producer, f"test.nobody.{uuid.uuid4().hex[:8]}") as sender:
        caller = asyncio.create_task(sender.cancellable(work()))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert steps == ["work cancelled"] and not sender.cancelled.is_set()


# -- a stream's mailbox: the frames in order, one timer per wait (issue 16) ----------------

async def test_a_mailbox_hands_frames_over_in_order_and_bounds_each_wait() -> None:
    box = _Mailbox()
    box.put_nowait("first")
    box.put_nowait("second")
    assert [box.get_nowait(), await box.get(1.0)] == ["first", "second"]
    assert box.empty()

    waiting = asyncio.create_task(box.get(10.0))
    await asyncio.sleep(0)
    box.put_nowait("late")  # wakes the waiting reader
    assert await asyncio.wait_for(waiting, 1) == "late"

    with pytest.raises(TimeoutError):
        await box.get(0.01)
    box.put_nowait("after the timeout")  # kept for the next reader, not lost
    assert await box.get(1.0) == "after the timeout"

    cancelled = asyncio.create_task(box.get(10.0))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    box.put_nowait("after a cancel")
    assert box.get_nowait() == "after a cancel" and box.empty()
