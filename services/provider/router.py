"""Run one completion: execute the orchestrator's plan; retries, limits, usage and cost.

The plan (`CompletionRequest.targets`, made by `shared.domain.routing.plan_call`) names
the targets to try, in order, each with its redaction and nodes; the router decides no
route for a request that carries one (only a request without a plan, from an older
sender, gets the configured route's whole chain). For each target in the chain: up to `retry.max_attempts` attempts, retrying
connection errors, timeouts, 429 and 5xx with exponential backoff and jitter
(`Retry-After` honoured); then fall back to the next target. Fallback works for
streams too, as long as no token has reached the client; after the first token a
failure ends the stream with a `Failed(after_first_token=True)` frame.

**Installed models.** A model installed on nodes (the model store, or an Ollama node's
pull) is callable by its own name without being configured: the orchestrator plans it as
the target `<node provider>/<model>` (the first provider of kind `node`, else an implicit
one named `node`, announced in `ModelsReply.node_provider`), and the router serves such a
target through the node adapter like a configured one (local: no price; the context is
`NEXUS_MODEL_CONTEXT`, the one nodes run installed models with).

**The call's events** (`llmcall-{id}`): `LLMCallStarted` is held back for up to
`STARTED_GRACE_S` and appended with the call's next event (a failed attempt, the
completion) in one append: one transaction for a call that answers within it, instead
of two (issue 16). A call still going after the grace has it appended alone then, so a
long call is on record while it runs. Every event of a call is durable before its
`Done` or `Failed` frame goes out, as before; no reader needs `LLMCallStarted` while the
call runs (a call that gets no answer is recorded by the orchestrator's `CallPlanned`).
A requester that records the answer itself (`CompletionRequest.caller_records`, the
orchestrator) gets a completed call's events on the `Done` frame (`Done.record`) instead
and appends them in the transaction that settles the call: no append here for a call
answered within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass, field

import msgspec

from shared.contracts.events import (
    LLMCallCompleted,
    LLMCallFailed,
    LLMCallStarted,
    Metadata,
    llmcall_stream,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.infra.eventstore import EventStore
from shared.infra.metrics import LLMMetrics
from shared.infra.tracing import tracer
from shared.contracts.messages import ChatMessage, CompletionRequest, ModelInfo, TargetInfo, messages_text
from shared.contracts.frames import Delta, Done, Failed
from shared.infra.streaming import ConsumerLost, StreamSender
from shared.infra.upstreams import Adapter, End, Text, ToolCalls, UpstreamError, adapter_for, usage_of
from services.provider.nodes import NodeAdapter
from services.provider.config import ModelPrice, ProvidersConfig

log = logging.getLogger("nexus.provider")

STARTED_GRACE_S = 0.5  # how long LLMCallStarted may wait to share its call's next append


def trace_use(span):
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False)


class Overloaded(UpstreamError):
    def __init__(self, provider: str) -> None:
        super().__init__("Overloaded", f"{provider}: concurrency limit and queue are full",
                         status=429, retryable=False)


class Limiter:
    """At most `limit` calls in flight; at most `queue` waiting; beyond that: Overloaded."""

    def __init__(self, name: str, limit: int, queue: int) -> None:
        self.name = name
        self._sem = asyncio.Semaphore(limit)
        self._queue = queue
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.waiting >= self._queue and self._sem.locked():
            raise Overloaded(self.name)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._sem.release()


def cost_micro_usd(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    # USD per million tokens == micro-USD per token.
    return round(input_tokens * price.input_usd_per_mtok + output_tokens * price.output_usd_per_mtok)


@dataclass
class Target:
    name: str  # provider/model
    provider: str
    model: str
    price: ModelPrice
    adapter: Adapter | NodeAdapter
    limiter: Limiter
    hosted: bool
    on_node: bool = False


@dataclass
class AttemptResult:
    first_token_at: float | None = None
    end: End | Done | None = None  # Done: a node's, with what it measured
    sent_any: bool = False
    output: list[str] = field(default_factory=list)


class CallRecord:
    """The events of one call, appended in order; `LLMCallStarted` waits (module doc)."""

    def __init__(self, store: EventStore | None, request: CompletionRequest,
                 started: LLMCallStarted) -> None:
        self.store = store
        self.metadata = Metadata(tenant=request.tenant, correlation_id=request.session_id,
                                 causation_id=request.call_id, actor="provider")
        self.stream = llmcall_stream(request.call_id)
        self._held: list = [started]
        self._writing: asyncio.Future | None = None  # the held events' own append
        self._timer = (asyncio.get_running_loop().call_later(STARTED_GRACE_S, self._flush_held)
                       if store is not None else None)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        if held:
            self._writing = asyncio.ensure_future(self._append(held))

    async def _append(self, events: list) -> None:
        assert self.store is not None
        await self.store.append(self.stream, events, expected_version=None,
                                metadata=self.metadata)

    async def append(self, event) -> None:
        """`event` after those before it (the held ones in the same append)."""
        if self.store is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._writing is not None:
            await self._writing
        events, self._held = [*self._held, event], []
        await self._append(events)

    async def take(self, event) -> tuple:
        """`event` with the events still held, for the requester to append in order
        (`CompletionRequest.caller_records`): none of them is appended here."""
        if self._timer is not None:
            self._timer.cancel()
        if self._writing is not None:  # the held ones went out already: after them
            await self._writing
        events, self._held = (*self._held, event), []
        return events

    async def close(self) -> None:
        """Whatever is still held or being written is durable when this returns."""
        if self._timer is not None:
            self._timer.cancel()
        if self.store is None:
            return
        if self._held:
            self._flush_held()
        if self._writing is not None:
            await self._writing


class Router:
    def __init__(self, config: ProvidersConfig, store: EventStore | None,
                 redactor=None, bus=None, installed_context: int = 4096) -> None:
        self.config = config
        self.store = store
        self.redactor = redactor  # callable(text, kinds) -> text, for hosted targets
        self.targets: dict[str, Target] = {}
        for p in config.providers:
            adapter = (NodeAdapter(p.name, bus, first_frame_timeout_s=p.connect_timeout_s)
                       if p.kind == "node" else adapter_for(p.upstream()))
            limiter = Limiter(p.name, p.max_concurrency, p.max_queue)
            for m in p.models:
                name = f"{p.name}/{m.name}"
                self.targets[name] = Target(name, p.name, m.name, m, adapter, limiter, p.hosted,
                                            p.kind == "node")
        self.routes = {r.model: r.targets for r in config.routes}
        # installed models (see the module doc): served through a node provider
        self.installed_context = installed_context
        self.installed: dict[str, Target] = {}
        self.node_provider = next((p.name for p in config.providers if p.kind == "node"), "")
        if not self.node_provider and all(p.name != "node" for p in config.providers):
            self.node_provider = "node"
        if self.node_provider:
            nodes = next((t for t in self.targets.values() if t.provider == self.node_provider), None)
            self._node_adapter = nodes.adapter if nodes else NodeAdapter(
                "node", bus, first_frame_timeout_s=5.0)
            self._node_limiter = nodes.limiter if nodes else Limiter("node", 8, 64)
        self.metrics = LLMMetrics()
        for provider in {t.provider for t in self.targets.values()}:  # series exist from the start
            self.metrics.failures.add(0, {"gen_ai.provider.name": provider})
            self.metrics.fallbacks.add(0, {"gen_ai.provider.name": provider})
        self._tracer = tracer("nexus.provider")

    async def close(self) -> None:
        for adapter in {id(t.adapter): t.adapter for t in self.targets.values()}.values():
            await adapter.close()

    def target(self, name: str) -> Target | None:
        """A configured target, or a node provider's installed model (`node/<model>`)."""
        found = self.targets.get(name)
        if found is not None or not self.node_provider:
            return found
        provider, _, model = name.partition("/")
        if provider != self.node_provider or not model:
            return None
        if name not in self.installed:
            if len(self.installed) > 10_000:  # bounded: names come from the fleet's models
                self.installed.clear()
            self.installed[name] = Target(
                name, provider, model, ModelPrice(name=model, context=self.installed_context),
                self._node_adapter, self._node_limiter, hosted=False, on_node=True)
        return self.installed[name]

    def chain(self, model: str) -> tuple[str, ...] | None:
        if model in self.routes:
            return self.routes[model]
        return (model,) if model in self.targets else None

    def models(self) -> tuple[ModelInfo, ...]:
        names = list(self.routes) + [t for t in self.targets if t not in self.routes]
        out = []
        for name in names:
            chain = self.chain(name) or ()
            prices = [self.targets[t].price for t in chain]
            out.append(ModelInfo(
                name=name, targets=chain,
                target_info=tuple(TargetInfo(name=t, provider=self.targets[t].provider,
                                             model=self.targets[t].model,
                                             hosted=self.targets[t].hosted,
                                             on_node=self.targets[t].on_node) for t in chain),
                input_usd_per_mtok=max(p.input_usd_per_mtok for p in prices),
                output_usd_per_mtok=max(p.output_usd_per_mtok for p in prices),
                context=min(p.context for p in prices),
                node_models=tuple(self.targets[t].model for t in chain if self.targets[t].on_node)))
        return tuple(out)

    def scrub(self, text: str) -> str:
        """Error text from upstreams may echo credentials: never let them travel on."""
        for provider in self.config.providers:
            key = provider.api_key()
            if key:
                text = text.replace(key, "[REDACTED:api_key]")
        if self.redactor is not None:
            text = self.redactor(text, ("api_key",))
        return text

    @staticmethod
    def _redaction_for(target: Target, request: CompletionRequest) -> tuple[str, ...]:
        """What to redact before text leaves for `target`: the policy's plan for it when
        the request has one, else `request.redact` for a hosted target."""
        if request.targets:
            return next((t.redact for t in request.targets if t.name == target.name), ())
        return request.redact if target.hosted else ()

    def _messages_for(self, target: Target, request: CompletionRequest) -> tuple[ChatMessage, ...]:
        kinds = self._redaction_for(target, request)
        if not (kinds and self.redactor):
            return request.messages
        out = []
        for m in request.messages:
            if isinstance(m.content, str):
                m = ChatMessage(role=m.role, content=self.redactor(m.content, kinds),
                                name=m.name, tool_calls=m.tool_calls, tool_call_id=m.tool_call_id)
            out.append(m)
        return tuple(out)

    async def run(self, request: CompletionRequest, sender: StreamSender) -> Done | Failed:
        if request.targets:  # the orchestrator's plan: executed as it is, in its order
            chain = tuple(t.name for t in request.targets if self.target(t.name) is not None)
            if not chain:
                return Failed(error="NoAllowedTarget", status=503,
                              detail=f"none of the targets the policy allows for "
                                     f"{request.model!r} is configured here")
        else:  # a request without a plan (an older sender): the route's whole chain
            chain = self.chain(request.model)
            if chain is None:
                return Failed(error="UnknownModel", status=404,
                              detail=f"no model or route named {request.model!r}")
        started = time.monotonic()
        record = CallRecord(self.store, request, LLMCallStarted(
            call_id=request.call_id, session_id=request.session_id, model=request.model,
            targets=chain, nodes=dict(request.nodes), strategy=request.plan_strategy,
            loads=request.plan_loads))
        try:
            return await self._run(request, sender, chain, started, record)
        finally:
            await record.close()

    async def _run(self, request: CompletionRequest, sender: StreamSender, chain: tuple[str, ...],
                   started: float, record: CallRecord) -> Done | Failed:
        retry = self.config.retry
        attempts = 0
        fallbacks: list[str] = []
        last: UpstreamError | None = None
        for index, name in enumerate(chain):
            target = self.target(name)
            assert target is not None
            for attempt in range(1, retry.max_attempts + 1):
                attempts += 1
                result = AttemptResult()
                span = self._tracer.start_span(
                    f"chat {target.model}", kind=SpanKind.CLIENT, attributes={
                        "gen_ai.operation.name": "chat", "gen_ai.provider.name": target.provider,
                        "gen_ai.request.model": target.model,
                        "gen_ai.request.max_tokens": request.max_tokens or 0,
                        "nexus.call_id": request.call_id, "nexus.attempt": attempt})
                try:
                    with trace_use(span):
                        async with target.limiter.slot():
                            await self._attempt(target, request, sender, result)
                except ConsumerLost as exc:
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
                    span.set_attribute("error.type", "Cancelled")
                    span.end()
                    failed = Failed(error="Cancelled", detail=str(exc), status=499,
                                    after_first_token=result.sent_any)
                    await record.append(LLMCallFailed(
                        call_id=request.call_id, session_id=request.session_id, target=name,
                        attempt=attempt, error="Cancelled", detail=str(exc), final=True,
                        after_first_token=result.sent_any))
                    return failed
                except UpstreamError as exc:
                    exc.detail = self.scrub(exc.detail)
                    span.set_status(Status(StatusCode.ERROR, exc.kind))
                    span.set_attribute("error.type", exc.kind)
                    span.end()
                    self.metrics.failures.add(1, {"gen_ai.provider.name": target.provider,
                                                  "error.type": exc.kind})
                    last = exc
                    more_here = exc.retryable and attempt < retry.max_attempts and not result.sent_any
                    next_target = chain[index + 1] if index + 1 < len(chain) else None
                    give_up = result.sent_any or (not more_here and next_target is None)
                    delay = self._backoff(attempt, exc.retry_after_s) if more_here else None
                    await record.append(LLMCallFailed(
                        call_id=request.call_id, session_id=request.session_id, target=name,
                        attempt=attempt, error=exc.kind, detail=exc.detail[:500], status=exc.status,
                        fallback=None if more_here or give_up else next_target,
                        after_first_token=result.sent_any, final=give_up, retry_in_s=delay))
                    if result.sent_any:
                        return Failed(error=exc.kind, detail=f"{name}: {exc.detail}"[:500],
                                      status=502, after_first_token=True)
                    if delay is not None:
                        await asyncio.sleep(delay)
                        continue
                    fallbacks.append(f"{name}: {exc.kind}")
                    if index + 1 < len(chain):
                        self.metrics.fallbacks.add(1, {"gen_ai.provider.name": target.provider})
                    break
                done = self._done(target, request, result, started, attempts, fallbacks)
                usage = done.usage
                span.set_attributes({
                    "gen_ai.response.model": done.model,
                    "gen_ai.usage.input_tokens": usage.input_tokens,
                    "gen_ai.usage.output_tokens": usage.output_tokens,
                    "gen_ai.response.finish_reasons": (done.finish_reason,),
                    **({"nexus.node.id": done.node} if done.node else {})})
                span.end()
                # recorded once the answer is on its way (four histogram records)
                sender.after_end(functools.partial(
                    self.metrics.completed, model=target.model, provider=target.provider,
                    input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                    seconds=done.latency_ms / 1000,
                    ttft_s=done.ttft_ms / 1000 if done.ttft_ms is not None else None,
                    cost_usd=done.cost_micro_usd / 1e6))
                completed = LLMCallCompleted(
                    call_id=request.call_id, session_id=request.session_id, model=done.model,
                    provider=target.provider, target=name, node=done.node,
                    latency_ms=done.latency_ms, ttft_ms=done.ttft_ms,
                    input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                    usage_estimated=usage.estimated, cost_micro_usd=done.cost_micro_usd,
                    finish_reason=done.finish_reason, attempts=attempts)
                if request.caller_records:  # appended by the requester with its settle
                    return msgspec.structs.replace(done, record=await record.take(completed))
                await record.append(completed)
                return done
        # busy or rate-limited to the end (queue full, node busy, upstream 429): say so
        status = 429 if isinstance(last, Overloaded) or (last and last.status == 429) else 502
        return Failed(error=last.kind if last else "NoTarget",
                      detail="all targets failed: " + "; ".join(fallbacks), status=status)

    @staticmethod
    def _done(target: Target, request: CompletionRequest, result: AttemptResult, started: float,
              attempts: int, fallbacks: list[str]) -> Done:
        """The call's outcome. A node's `Done` is passed on with the usage, latency and
        time to first token it measured; only cost, attempts and fallbacks are added."""
        end = result.end
        assert end is not None
        extra = {"provider": target.provider, "attempts": attempts, "fallbacks": tuple(fallbacks)}
        if isinstance(end, Done):
            return msgspec.structs.replace(end, **extra, cost_micro_usd=cost_micro_usd(
                target.price, end.usage.input_tokens, end.usage.output_tokens))
        usage = usage_of(end, messages_text(request.messages) if end.input_tokens is None else "",
                         "".join(result.output) if end.output_tokens is None else "")
        ttft_ms = ((result.first_token_at - started) * 1000
                   if result.first_token_at is not None else None)
        return Done(finish_reason=end.finish_reason, usage=usage, model=end.model or target.model,
                    latency_ms=round((time.monotonic() - started) * 1000, 3),
                    ttft_ms=round(ttft_ms, 3) if ttft_ms is not None else None,
                    cost_micro_usd=cost_micro_usd(target.price, usage.input_tokens,
                                                  usage.output_tokens), **extra)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        retry = self.config.retry
        delay = min(retry.max_delay_s, retry.base_delay_s * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.5)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, 30.0))
        return delay

    async def _attempt(self, target: Target, request: CompletionRequest, sender: StreamSender,
                       result: AttemptResult) -> None:
        """One try against one target; cancelled at once when the receiver cancels."""
        await sender.cancellable(self._consume(target, request, sender, result))

    async def _consume(self, target: Target, request: CompletionRequest, sender: StreamSender,
                       result: AttemptResult) -> None:
        stream = target.adapter.stream(target.model, request, self._messages_for(target, request))
        first = request.stream  # a whole answer's pieces come at its end: no first-token wait
        try:
            while True:
                try:
                    if first:  # a timeout scope, not wait_for's task per call
                        async with asyncio.timeout(self.config.retry.first_token_timeout_s):
                            piece = await anext(stream)
                    else:
                        piece = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise UpstreamError("Timeout", f"{target.name}: no first token within "
                                        f"{self.config.retry.first_token_timeout_s:g}s") from None
                first = False
                if isinstance(piece, Text):
                    if result.first_token_at is None and request.stream:
                        result.first_token_at = time.monotonic()
                    result.output.append(piece.content)
                    # a whole answer's text: it leaves with its end, in one write
                    await sender.delta(content=piece.content, held=not request.stream)
                    result.sent_any = True
                elif isinstance(piece, ToolCalls):
                    await sender.delta(tool_calls=piece.tool_calls)
                    result.sent_any = True
                elif isinstance(piece, Delta):  # a node's frame, passed on as it is
                    await sender.delta(content=piece.content, tool_calls=piece.tool_calls)
                    result.sent_any = True
                else:
                    result.end = piece
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        if result.end is None:
            raise UpstreamError("StreamCut", f"{target.name}: no end of stream")
