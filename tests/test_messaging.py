"""NATS messaging: typed request/reply, clear errors, dead letters, reconnects."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import msgspec
import nats
import pytest

from shared.contracts import subjects
from shared.infra import EmbeddedNats
from shared.infra.nats_server import nats_threads
from shared.contracts.messages import Ping, Pong
from shared.infra.messaging import Bus, HandlerError, NoResponders, RemoteError, RequestTimeout


def subject(name: str) -> str:
    return f"test.{name}.{uuid.uuid4().hex[:8]}"


async def pong(ping: Ping, msg) -> Pong:
    return Pong(service="test", instance_id=ping.sender, version="0", uptime_s=0.0)


@pytest.fixture
async def bus(infra):
    bus = await Bus.connect(infra.nats_url, "test")
    await bus.ensure_streams()  # as every service does at start
    yield bus
    await bus.close()


async def test_request_reply_is_typed(bus: Bus) -> None:
    s = subject("ping")
    await bus.subscribe(s, Ping, pong)
    reply = await bus.request(s, Ping(sender="me"), Pong, timeout=10)
    assert reply == Pong(service="test", instance_id="me", version="0", uptime_s=0.0)


async def test_no_responders_fails_at_once_naming_the_subject(bus: Bus) -> None:
    s = subject("nobody")
    with pytest.raises(NoResponders, match=s):
        await bus.request(s, Ping(sender="me"), Pong, timeout=5)


async def test_slow_responder_times_out_with_a_clear_error(bus: Bus) -> None:
    s = subject("slow")

    async def slow(ping: Ping, msg) -> Pong:
        await asyncio.sleep(2)
        return await pong(ping, msg)

    await bus.subscribe(s, Ping, slow, concurrent=True)
    with pytest.raises(RequestTimeout, match=rf"no reply on '{s}' within 0.2s"):
        await bus.request(s, Ping(sender="me"), Pong, timeout=0.2)


async def test_handler_errors_reach_the_caller(bus: Bus) -> None:
    s = subject("fails")

    async def fails(ping: Ping, msg) -> Pong:
        if ping.sender == "bug":
            raise KeyError("oops")
        raise HandlerError("NotAllowed", f"{ping.sender} may not ping")

    await bus.subscribe(s, Ping, fails)
    with pytest.raises(RemoteError) as info:
        await bus.request(s, Ping(sender="eve"), Pong, timeout=10)
    assert (info.value.error, info.value.detail) == ("NotAllowed", "eve may not ping")
    with pytest.raises(RemoteError) as info:
        await bus.request(s, Ping(sender="bug"), Pong, timeout=10)
    assert info.value.error == "KeyError" and "oops" not in info.value.detail  # no internals


async def test_malformed_message_is_dead_lettered_and_subscriber_survives(bus: Bus, infra) -> None:
    s = subject("strict")
    await bus.subscribe(s, Ping, pong)
    raw = await nats.connect(infra.nats_url)
    try:
        dead = await raw.subscribe(subjects.deadletter(s))
        for bad in (b"not json", b'{"sender": 5}', b'{"sender": "x", "extra": 1}'):
            reply = await raw.request(s, bad, timeout=10)
            assert reply.headers and reply.headers.get("Nexus-Error") == "InvalidMessage"
        for _ in range(3):
            letter = await dead.next_msg(timeout=10)
            assert letter.headers["Nexus-Subject"] == s
            assert letter.headers["Nexus-Reason"].startswith("undecodable")
        # still serving
        assert (await bus.request(s, Ping(sender="ok"), Pong, timeout=10)).instance_id == "ok"
        # and the dead letters are kept on the bounded JetStream stream
        info = await raw.jetstream().stream_info(subjects.DEADLETTER_STREAM.name)
        assert info.state.messages >= 3
    finally:
        await raw.close()


async def test_streams_are_created_idempotently(bus: Bus) -> None:
    await bus.ensure_streams()
    await bus.ensure_streams()
    info = await bus.js.stream_info(subjects.DEADLETTER_STREAM.name)
    assert info.config.subjects == list(subjects.DEADLETTER_STREAM.subjects)


async def test_trace_context_travels_in_headers(bus: Bus) -> None:
    from shared.infra.tracing import setup_tracing, tracer

    setup_tracing("nexus-test")
    s = subject("traced")
    seen: dict[str, str] = {}

    async def record(ping: Ping, msg) -> Pong:
        seen.update(msg.headers or {})
        return await pong(ping, msg)

    await bus.subscribe(s, Ping, record)
    with tracer("test").start_as_current_span("caller") as span:
        await bus.request(s, Ping(sender="me"), Pong, timeout=10)
        trace_id = format(span.get_span_context().trace_id, "032x")
    assert seen["traceparent"].split("-")[1] == trace_id


def test_the_embedded_server_runs_on_one_thread_per_eight_cpus(tmp_path, monkeypatch) -> None:
    """What the server itself reports (`/varz`): `nats_threads()` OS threads for Go code
    unless the operator set `GOMAXPROCS`, which is then left as it is."""
    assert [nats_threads(n) for n in (1, 2, 8, 9, 16, 64)] == [1, 1, 1, 2, 2, 8]

    def gomaxprocs(name: str) -> int:
        server = EmbeddedNats(tmp_path / name)
        server.start()
        try:
            with urllib.request.urlopen(
                    f"http://{server.host}:{server.monitor_port}/varz", timeout=5) as resp:
                return json.load(resp)["gomaxprocs"]
        finally:
            server.stop()

    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert gomaxprocs("default") == nats_threads()
    monkeypatch.setenv("GOMAXPROCS", "3")
    assert gomaxprocs("operator") == 3


async def test_restarted_nats_does_not_leave_a_subscriber_deaf(tmp_path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        responder = await Bus.connect(server.url, "responder")
        caller = await Bus.connect(server.url, "caller")
        s = subject("survivor")
        await responder.subscribe(s, Ping, pong)
        assert await caller.request(s, Ping(sender="before"), Pong, timeout=10)
        server.kill()
        server.start()

        async def works() -> Pong:
            while True:
                try:
                    return await caller.request(s, Ping(sender="after"), Pong, timeout=0.5)
                except (NoResponders, RequestTimeout, nats.errors.ConnectionClosedError,
                        nats.errors.OutboundBufferLimitError):
                    await asyncio.sleep(0.1)

        reply = await asyncio.wait_for(works(), 15)
        assert reply.instance_id == "after"
        assert responder.reconnects >= 1
        await responder.close()
        await caller.close()
    finally:
        server.stop()


async def test_closing_a_bus_stops_a_reconnect_loop_that_lost_its_cancel(tmp_path) -> None:
    """A node killed with NATS stayed alive for ever: nats-py's reconnect loop lost the
    cancel of `close()` (CPython gh-86296) and went on retrying. Here the loss is made
    certain: the error callback the loop awaits after each refused connection swallows
    the first cancel. `Bus.close` still leaves no task of the client running."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    bus = await Bus.connect(server.url, "lost-cancel")
    failing, swallowed = asyncio.Event(), []

    async def error_callback_that_loses_one_cancel(exc: Exception) -> None:
        failing.set()
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(exc)

    bus.nc._error_cb = error_callback_that_loses_one_cancel
    server.kill()
    await asyncio.wait_for(failing.wait(), 15)  # reconnecting, each attempt refused
    await asyncio.wait_for(bus.close(drain_timeout_s=5), 15)
    assert swallowed, "the first cancel should have landed in the error callback"
    assert bus.nc._reconnection_task.done()
    assert bus.nc.is_closed or not bus.nc.is_reconnecting


def test_messages_reject_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError, match="extra"):
        msgspec.json.decode(b'{"sender": "x", "extra": 1}', type=Ping)


def test_an_unreachable_nats_is_a_retry_later_not_a_bug() -> None:
    """What the HTTP edge answers 503 `messaging-unavailable` for (a node's history read
    from JetStream while NATS restarted was a 500 in the chaos test): no reply in time,
    no responder, a closed or reconnecting connection, also as the cause of another
    error. A responder's own error reply, or any other error, is not."""
    from shared.infra.messaging import messaging_unavailable

    assert messaging_unavailable(nats.errors.TimeoutError())
    assert messaging_unavailable(nats.errors.ConnectionClosedError())
    assert messaging_unavailable(RequestTimeout("s", 1.0))
    assert messaging_unavailable(NoResponders("s"))
    wrapped = RuntimeError("history")
    wrapped.__cause__ = nats.errors.TimeoutError()
    assert messaging_unavailable(wrapped)
    assert not messaging_unavailable(RemoteError("s", "Crash", "boom"))
    assert not messaging_unavailable(ValueError("a bug"))
