"""The inference runtime a node fronts, and the relay from NATS to it.

`ManagedLlama` supervises a local `llama-server` when no `NEXUS_RUNTIME_URL` is given:
builds it once if needed (shared.infra.llama; the node reports its runtime as not
ready meanwhile), starts it on a free loopback port with the Gemma model,
health-checks it, restarts it when it dies, stops it with the node.

`Relay` answers `nexus.node.<id>.infer`: it forwards the completion to the runtime
over its OpenAI-compatible API and streams the answer back as frames
(shared.streaming: credit-based flow control, cancellation, lost-consumer detection),
counting active requests and latency for the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

import httpx
from nats.aio.msg import Msg

from shared.infra import free_port
from shared.infra.llama import MODEL_NAME, ensure_llama_server, ensure_model
from shared.infra.process import die_with_parent
from shared.messages import CompletionRequest, RuntimeInfo
from shared.messaging import Bus
from shared.streaming import ConsumerLost, Done, Failed, StreamSender, Usage
from shared.tracing import tracer
from services.node.agent import NodeAgent
from services.provider.adapters import End, OpenAIAdapter, Text, ToolCalls, UpstreamError
from services.provider.config import ModelPrice, ProviderConfig

log = logging.getLogger("nexus.node.runtime")


async def probe(base_url: str, kind: str = "openai") -> RuntimeInfo:
    """What an OpenAI-compatible runtime serves (not ready if it does not answer)."""
    try:
        async with httpx.AsyncClient(timeout=3) as http:
            resp = await http.get(f"{base_url.rstrip('/')}/models")
            resp.raise_for_status()
            models = tuple(m["id"] for m in resp.json().get("data", []))
            return RuntimeInfo(kind=kind, base_url=base_url, models=models, ready=bool(models))
    except (httpx.HTTPError, ValueError, KeyError):
        return RuntimeInfo(kind=kind, base_url=base_url, ready=False)


class ManagedLlama:
    """A llama-server child process with the bundled model, kept alive."""

    def __init__(self, log_dir, on_change: Callable[[RuntimeInfo], None], *,
                 threads: int | None = None, context: int = 4096) -> None:
        self.log_dir = log_dir
        self.on_change = on_change
        self.threads = threads or os.cpu_count() or 2
        self.context = context
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.info = RuntimeInfo(kind="llama.cpp", ready=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _set(self, info: RuntimeInfo) -> None:
        if info != self.info:
            self.info = info
            self.on_change(info)

    async def run(self) -> None:
        binary = await asyncio.to_thread(ensure_llama_server, lambda m: log.info(m))
        model = await asyncio.to_thread(ensure_model, lambda m: log.info(m))
        delay = 1.0
        while True:
            started = time.monotonic()
            await self._start(binary, model)
            if await self._wait_healthy(timeout=120):
                delay = 1.0
                self._set(RuntimeInfo(kind="llama.cpp", version=await self._version(),
                                      base_url=self.base_url, models=(MODEL_NAME,), ready=True))
            while self.proc is not None and self.proc.poll() is None:
                await asyncio.sleep(0.5)
            code = self.proc.returncode if self.proc else None
            self._set(RuntimeInfo(kind="llama.cpp", base_url=self.base_url, ready=False))
            log.warning("llama-server exited (%s); restarting in %.0fs", code, delay)
            await asyncio.sleep(delay)
            if time.monotonic() - started < 60:
                delay = min(delay * 2, 30.0)

    async def _start(self, binary, model) -> None:
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "llama-server.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-m", str(model), "--alias", MODEL_NAME, "--host", "127.0.0.1",
                 "--port", str(self.port), "-c", str(self.context), "-t", str(self.threads),
                 "--parallel", "2", "--no-webui"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent)

    async def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200:
                        return True
                await asyncio.sleep(0.25)
        return False

    async def _version(self) -> str | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            async with httpx.AsyncClient(timeout=2) as http:
                props = (await http.get(f"http://127.0.0.1:{self.port}/props")).json()
                return str(props.get("build_info") or "llama.cpp")
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Relay:
    """`nexus.node.<id>.infer` -> the runtime's OpenAI API -> frames back."""

    def __init__(self, agent: NodeAgent, bus: Bus, runtime: Callable[[], RuntimeInfo], *,
                 max_concurrency: int = 4, max_queue: int = 32) -> None:
        self.agent = agent
        self.bus = bus
        self.runtime = runtime
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._adapter: OpenAIAdapter | None = None
        self._adapter_url: str | None = None

    def adapter(self, info: RuntimeInfo) -> OpenAIAdapter:
        if self._adapter is None or self._adapter_url != info.base_url:
            config = ProviderConfig(name=f"node-{self.agent.node_id}", kind="openai",
                                    base_url=info.base_url or "", hosted=False, timeout_s=300,
                                    models=tuple(ModelPrice(name=m) for m in info.models))
            self._adapter = OpenAIAdapter(config)
            self._adapter_url = info.base_url
        return self._adapter

    async def on_infer(self, request: CompletionRequest, msg: Msg) -> None:
        if not msg.reply:
            return
        async with StreamSender(self.bus, msg.reply) as sender:
            if self._slots.locked() and self.agent.queue_depth >= self._max_queue:
                await sender.fail(Failed(error="NodeBusy", status=429, detail=(
                    f"node {self.agent.node_id}: {self.agent.queue_depth} requests already waiting")))
                return
            self.agent.queue_depth += 1  # reported in heartbeats
            try:
                await self._slots.acquire()
            finally:
                self.agent.queue_depth -= 1
            try:
                outcome = await self._run(request, sender)
            finally:
                self._slots.release()
            if isinstance(outcome, Failed):
                await sender.fail(outcome)
            else:
                await sender.done(outcome)

    async def _run(self, request: CompletionRequest, sender: StreamSender) -> Done | Failed:
        info = self.runtime()
        if not info.ready:
            return Failed(error="RuntimeNotReady", detail=f"node {self.agent.node_id}: runtime not ready",
                          status=503)
        model = request.model if request.model in info.models else info.models[0]
        with tracer("nexus.node").start_as_current_span(
                f"relay {model}", attributes={"nexus.node.id": self.agent.node_id,
                                              "gen_ai.request.model": model,
                                              "nexus.call_id": request.call_id}):
            return await self._relay(info, model, request, sender)

    async def _relay(self, info: RuntimeInfo, model: str, request: CompletionRequest,
                     sender: StreamSender) -> Done | Failed:
        started = time.monotonic()
        first: float | None = None
        sent = False
        async with self.agent.track_request():
            work = asyncio.ensure_future(self._stream(info, model, request, sender))
            cancelled = asyncio.ensure_future(sender.cancelled.wait())
            await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            cancelled.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                return Failed(error="Cancelled", detail="the receiver cancelled", status=499)
            try:
                end, first, sent = work.result()
            except ConsumerLost as exc:
                return Failed(error="Cancelled", detail=str(exc), status=499, after_first_token=sent)
            except UpstreamError as exc:
                return Failed(error=exc.kind, detail=exc.detail[:500], status=exc.status or 502,
                              after_first_token=sender.seq > 0)
        return Done(finish_reason=end.finish_reason,
                    usage=Usage(input_tokens=end.input_tokens or 0,
                                output_tokens=end.output_tokens or 0,
                                estimated=end.input_tokens is None or end.output_tokens is None),
                    model=end.model or model, provider="node", node=self.agent.node_id,
                    latency_ms=round((time.monotonic() - started) * 1000, 3),
                    ttft_ms=round((first - started) * 1000, 3) if first else None)

    async def _stream(self, info: RuntimeInfo, model: str, request: CompletionRequest,
                      sender: StreamSender) -> tuple[End, float | None, bool]:
        first = None
        end: End | None = None
        async for piece in self.adapter(info).stream(model, request, request.messages):
            if isinstance(piece, Text):
                first = first or time.monotonic()
                await sender.delta(content=piece.content)
            elif isinstance(piece, ToolCalls):
                await sender.delta(tool_calls=piece.tool_calls)
            else:
                end = piece
        if end is None:
            raise UpstreamError("StreamCut", "runtime stream ended without a finish")
        return end, first, sender.seq > 0
