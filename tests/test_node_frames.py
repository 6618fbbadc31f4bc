"""A node's answer travels as frames from the node to the orchestrator, shaped once.

The node turns its runtime's stream into frames and ends it with a `Done` carrying the
usage (estimated and flagged when the runtime reports none), latency and time to first
token it measured; the provider passes the node's frames on as they are and adds only
cost, attempts and fallbacks. Real NATS, a real HTTP runtime (the fake upstream).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from services.node.daemon import NodeDaemon
from services.node.runtime import Relay
from services.provider.config import parse
from services.provider.router import Router
from shared.contracts import subjects
from shared.contracts.frames import Delta, Done, Failed, Usage
from shared.contracts.messages import ChatMessage, CompletionRequest, RuntimeInfo, messages_text
from shared.infra.messaging import Bus
from shared.infra.streaming import StreamReceiver, StreamSender
from shared.infra.upstreams import estimate_tokens
from tests.fake_upstream import FakeUpstream, estimate_prompt_tokens, reply_text

MESSAGES = (ChatMessage(role="system", content="You are terse."),
            ChatMessage(role="user", content="Say hello to the world"))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream(reply_tokens=8).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(infra) -> AsyncIterator[Bus]:
    bus = await Bus.connect(infra.nats_url, "test-node-frames")
    yield bus
    await bus.close()


def request(model: str, **fields) -> CompletionRequest:
    return CompletionRequest(call_id=uuid.uuid4().hex, session_id=uuid.uuid4().hex, tenant="t",
                             model=model, messages=MESSAGES, **fields)


async def frames(bus: Bus, subject: str, req: CompletionRequest) -> list[Delta | Done | Failed]:
    async with StreamReceiver(bus, subject, req, first_frame_timeout_s=10) as stream:
        return [frame async for frame in stream.frames()]


async def serve_relay(bus: Bus, fake: FakeUpstream) -> str:
    node_id = f"node-{uuid.uuid4().hex[:8]}"
    daemon = NodeDaemon(node_id, labels={}, heartbeat_interval_s=1.0)
    info = RuntimeInfo(kind="openai", base_url=fake.openai_base_url, models=("fake-small",),
                       ready=True, state="ready")
    relay = Relay(daemon, bus, lambda: info)
    await bus.subscribe(subjects.node_infer(node_id), CompletionRequest, relay.on_infer,
                        concurrent=True)
    return node_id


async def test_a_node_reports_the_usage_and_timings_it_measured(bus: Bus, fake) -> None:
    node_id = await serve_relay(bus, fake)
    got = await frames(bus, subjects.node_infer(node_id), request("fake-small"))
    deltas, done = got[:-1], got[-1]
    assert isinstance(done, Done), done
    assert "".join(d.content for d in deltas) == reply_text(8)
    assert done.usage == Usage(input_tokens=estimate_prompt_tokens(
        [msgspec.to_builtins(m) for m in MESSAGES]), output_tokens=8, estimated=False)
    assert (done.provider, done.node, done.model, done.finish_reason) == (
        "node", node_id, "fake-small", "stop")
    assert done.ttft_ms is not None and 0 <= done.ttft_ms <= done.latency_ms


async def test_a_node_asks_its_runtime_for_a_whole_answer_when_the_requester_wants_one(
        bus: Bus, fake) -> None:
    """`CompletionRequest.stream=False`: the runtime is asked for one document, the same
    text arrives as frames at its end, and no time to first token is claimed."""
    node_id = await serve_relay(bus, fake)
    got = await frames(bus, subjects.node_infer(node_id), request("fake-small", stream=False))
    deltas, done = got[:-1], got[-1]
    assert fake.stats.outcomes[-1]["stream"] is False
    assert isinstance(done, Done), done
    assert "".join(d.content for d in deltas) == reply_text(8)
    assert done.usage.output_tokens == 8 and not done.usage.estimated
    assert done.ttft_ms is None and done.latency_ms > 0


async def test_a_node_estimates_the_usage_its_runtime_did_not_report(bus: Bus, fake) -> None:
    node_id = await serve_relay(bus, fake)
    fake.script({"no_usage": True})
    done = (await frames(bus, subjects.node_infer(node_id), request("fake-small")))[-1]
    assert isinstance(done, Done), done
    assert done.usage == Usage(input_tokens=estimate_tokens(messages_text(MESSAGES)),
                               output_tokens=estimate_tokens(reply_text(8)), estimated=True)


async def test_the_provider_passes_a_node_answer_on_as_it_is(bus: Bus) -> None:
    """Deltas arrive as the node sent them; the `Done` keeps the node's usage, latency and
    time to first token (numbers no provider could measure), priced by the provider."""
    node_id = f"node-{uuid.uuid4().hex[:8]}"
    tool_calls = [{"index": 0, "function": {"arguments": "{}"}}]
    node_done = Done(finish_reason="stop", usage=Usage(input_tokens=7, output_tokens=11,
                                                       estimated=True),
                     model="runtime-model", provider="node", node=node_id,
                     latency_ms=123.456, ttft_ms=7.5)

    async def node(req: CompletionRequest, msg) -> None:
        async with StreamSender(bus, msg.reply) as sender:
            await sender.delta(content="hello")
            await sender.delta(tool_calls=tool_calls)
            await sender.done(node_done)

    await bus.subscribe(subjects.node_infer(node_id), CompletionRequest, node, concurrent=True)
    config = parse("""
[[providers]]
name = "gpu"
kind = "node"
hosted = false
[[providers.models]]
name = "tiny"
input_usd_per_mtok = 2.0
output_usd_per_mtok = 4.0
""")
    router = Router(config, store=None, bus=bus)
    provider_subject = f"test.provider.{uuid.uuid4().hex}"

    async def provider(req: CompletionRequest, msg) -> None:
        async with StreamSender(bus, msg.reply) as sender:
            outcome = await router.run(req, sender)
            await (sender.fail(outcome) if isinstance(outcome, Failed) else sender.done(outcome))

    await bus.subscribe(provider_subject, CompletionRequest, provider, concurrent=True)
    got = await frames(bus, provider_subject, request("gpu/tiny", nodes={"tiny": (node_id,)}))
    assert [(f.seq, f.content, f.tool_calls) for f in got[:-1]] == [
        (1, "hello", None), (2, "", tool_calls)]
    assert got[-1] == msgspec.structs.replace(
        node_done, provider="gpu", cost_micro_usd=7 * 2 + 11 * 4, attempts=1, fallbacks=())
    await router.close()
