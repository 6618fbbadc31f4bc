"""The inference runtime a node fronts, and the relay from NATS to it.

`ManagedLlama` supervises a local `llama-server` when no `NEXUS_RUNTIME_URL` is given:
builds it once if needed (shared.infra.llama; the node reports its runtime as
`starting` meanwhile; `NEXUS_LLAMA_SERVER_BIN` names another binary), starts it on a
free loopback port with the Gemma model, health-checks it, restarts it when it dies
(exponential backoff, at most `NEXUS_RUNTIME_MAX_RESTARTS` times, then `failed`),
stops it with the node. Every state change, with how it died ("crashed: signal
SIGILL (illegal instruction), 3 restarts"), goes to the orchestrator as a
re-registration, which appends `NodeRuntimeChanged`.

`Relay` answers `nexus.node.<id>.infer`: it forwards the completion to the runtime
with the OpenAI-compatible adapter (shared.infra.upstreams) and streams the answer back
as frames (shared.infra.streaming: credit-based flow control, cancellation,
lost-consumer detection) ending in a `Done` with the usage, latency and time to first
token measured here, which the provider passes on; it counts active requests and
latency for the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from nats.aio.msg import Msg

from shared.infra import free_port
from shared.infra.llama import LocalModel, ensure_llama_server, ensure_model, local_model, server_args
from shared.infra.process import describe_exit, restart_delay, spawn, stop_process
from shared.contracts.messages import CompletionRequest, RuntimeInfo, messages_text
from shared.infra.messaging import Bus
from shared.contracts.frames import Done, Failed
from shared.infra.streaming import ConsumerLost, StreamSender
from shared.infra.tracing import tracer
from shared.infra.upstreams import (
    End,
    OpenAIAdapter,
    Text,
    ToolCalls,
    UpstreamConfig,
    UpstreamError,
    usage_of,
)
from services.node.daemon import NodeDaemon

log = logging.getLogger("nexus.node.runtime")


async def probe(base_url: str, kind: str = "openai") -> RuntimeInfo:
    """What an OpenAI-compatible runtime serves (not ready if it does not answer)."""
    try:
        async with httpx.AsyncClient(timeout=3) as http:
            resp = await http.get(f"{base_url.rstrip('/')}/models")
            resp.raise_for_status()
            models = tuple(m["id"] for m in resp.json().get("data", []))
            if kind == "ollama":  # `qwen2:latest` is also callable as `qwen2`
                models = tuple(dict.fromkeys(
                    n for m in models for n in (m, m.removesuffix(":latest"))))
            if models:
                return RuntimeInfo(kind=kind, base_url=base_url, models=models, ready=True,
                                   state="ready")
            reason = "unreachable: it serves no models"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        reason = f"unreachable: {type(exc).__name__} from {base_url}/models"
    return RuntimeInfo(kind=kind, base_url=base_url, ready=False, state="unreachable", reason=reason)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class ManagedLlama:
    """A llama-server child process with the bundled model, kept alive within bounds.

    Its state is reported through `on_change` (a `RuntimeInfo`): `starting`, `ready`,
    `crashed` (it exited: how, e.g. "signal SIGILL (illegal instruction)", and how many
    restarts so far; restarted after an exponential backoff), `failed` (it crashed
    again after `max_restarts` restarts, or could not be built or started: not
    restarted any more; the node keeps serving nothing until it is restarted). A run
    that was ready for `stable_s` resets the restart count.
    """

    def __init__(self, log_dir, on_change: Callable[[RuntimeInfo], None], *,
                 binary: Path | None = None, max_restarts: int = 5,
                 backoff_s: float = 1.0, backoff_max_s: float = 30.0, stable_s: float = 60.0,
                 health_timeout_s: float = 120.0, threads: int | None = None,
                 context: int = 4096, model_file: Path | None = None,
                 alias: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.on_change = on_change
        self.binary = binary
        self.max_restarts = max(0, max_restarts)
        self.backoff_s = max(0.0, backoff_s)
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.health_timeout_s = health_timeout_s
        self.threads = threads or os.cpu_count() or 2
        self.context = context
        self.model_file = model_file  # an installed model (services.node.models); None: bundled
        self.alias = alias
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.info = RuntimeInfo(kind="llama.cpp", state="starting", reason="starting")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _set(self, info: RuntimeInfo) -> None:
        if info != self.info:
            self.info = info
            self.on_change(info)

    def _fail(self, reason: str) -> None:
        log.error("llama-server failed: %s", reason)
        self._set(RuntimeInfo(kind="llama.cpp", state="failed", reason=reason[:500],
                              restarts=self.info.restarts, exit_code=self.info.exit_code,
                              exit_signal=self.info.exit_signal))

    async def run(self) -> None:
        try:
            if self.binary is None:
                self._set(RuntimeInfo(kind="llama.cpp", state="starting",
                                      reason="starting: preparing llama-server (built once per machine)"))
            binary = self.binary or await asyncio.to_thread(ensure_llama_server, lambda m: log.info(m))
            if self.model_file is not None:
                spec = LocalModel(name=self.alias or self.model_file.stem, file=self.model_file.name,
                                  sha256="", source="model store", chat_template=None,
                                  description="installed from the model store")
                model = self.model_file
            else:
                spec = local_model()
                model = await asyncio.to_thread(ensure_model, lambda m: log.info(m), spec.name)
        except Exception as exc:  # noqa: BLE001 - reported, not raised into the void
            self._fail(f"failed: could not prepare llama-server: {exc}")
            return
        restarts = 0
        while True:
            try:
                await self._start(binary, server_args(spec, model))
            except OSError as exc:
                self._fail(f"failed: cannot start {binary}: {exc}")
                return
            log.info("llama-server started", extra={"pid": self.proc.pid, "port": self.port,
                                                    "restarts": restarts})
            ready_since: float | None = None
            hung = False
            if await self._wait_healthy(timeout=self.health_timeout_s):
                ready_since = time.monotonic()
                self._set(RuntimeInfo(kind="llama.cpp", version=await self._version(),
                                      base_url=self.base_url, models=(spec.name,), ready=True,
                                      state="ready", restarts=restarts,
                                      reason=f"ready after {_plural(restarts, 'restart')}"
                                      if restarts else ""))
            elif self.proc.poll() is None:  # running, but never healthy
                hung = True
                await asyncio.to_thread(stop_process, self.proc, 10)
            await self._exited()
            how, code, sig = describe_exit(self.proc.returncode)
            if hung:
                how = f"not healthy within {self.health_timeout_s:g}s, stopped"
            if ready_since is not None and time.monotonic() - ready_since >= self.stable_s:
                restarts = 0  # it ran well for a while: a new run of bad luck starts here
            log_path = self.log_dir / "llama-server.log"
            if restarts >= self.max_restarts:
                reason = f"crashed: {how}, {_plural(restarts, 'restart')}; not restarted again"
                log.error("llama-server %s (log: %s)", reason, log_path)
                self._set(RuntimeInfo(kind="llama.cpp", state="failed", reason=reason,
                                      restarts=restarts, exit_code=code, exit_signal=sig))
                return
            delay = restart_delay(restarts, self.backoff_s, self.backoff_max_s)
            reason = f"crashed: {how}, {_plural(restarts, 'restart')}; restarting in {delay:g}s"
            log.warning("llama-server %s (log: %s)", reason, log_path)
            self._set(RuntimeInfo(kind="llama.cpp", state="crashed", reason=reason,
                                  restarts=restarts, exit_code=code, exit_signal=sig))
            await asyncio.sleep(delay)
            restarts += 1

    async def _start(self, binary: Path, model_args: list[str]) -> None:
        self.port = free_port()
        self.proc = spawn(
            [str(binary), *model_args, "--host", "127.0.0.1",
             "--port", str(self.port), "-c", str(self.context), "-t", str(self.threads),
             "--parallel", "2", "--no-webui"],
            self.log_dir / (f"llama-server-{self.alias}.log" if self.alias else "llama-server.log"),
            cwd=self.log_dir)  # a core dump lands here, not in the caller's directory

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

    async def _exited(self) -> None:
        while self.proc is not None and self.proc.poll() is None:
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc, 10)


class Relay:
    """`nexus.node.<id>.infer` -> the runtime's OpenAI API -> frames back."""

    def __init__(self, agent: NodeDaemon, bus: Bus, runtime: Callable[[], RuntimeInfo], *,
                 max_concurrency: int = 4, max_queue: int = 32,
                 route: Callable[[str], RuntimeInfo | None] | None = None) -> None:
        self.agent = agent
        self.bus = bus
        self.runtime = runtime
        self.route = route  # model -> the runtime serving it (installed models), if any
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_queue = max_queue
        self._adapter: OpenAIAdapter | None = None
        self._adapter_url: str | None = None
        self._adapters: dict[str, OpenAIAdapter] = {}

    def adapter(self, info: RuntimeInfo) -> OpenAIAdapter:
        if self.route is not None and info.base_url != self.runtime().base_url:
            if info.base_url not in self._adapters:  # an installed model's own server
                self._adapters[info.base_url or ""] = OpenAIAdapter(UpstreamConfig(
                    name=f"node-{self.agent.node_id}", kind="openai", base_url=info.base_url or "",
                    timeout_s=300))
            return self._adapters[info.base_url or ""]
        if self._adapter is None or self._adapter_url != info.base_url:
            self._adapter = OpenAIAdapter(UpstreamConfig(
                name=f"node-{self.agent.node_id}", kind="openai", base_url=info.base_url or "",
                timeout_s=300))
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
        info = (self.route(request.model) if self.route is not None else None) or self.runtime()
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
        async with self.agent.track_request():
            try:
                end, first, output = await sender.cancellable(
                    self._stream(info, model, request, sender))
            except ConsumerLost as exc:
                return Failed(error="Cancelled", detail=str(exc), status=499,
                              after_first_token=sender.seq > 0)
            except UpstreamError as exc:
                return Failed(error=exc.kind, detail=exc.detail[:500], status=exc.status or 502,
                              after_first_token=sender.seq > 0)
        return Done(finish_reason=end.finish_reason,
                    usage=usage_of(end, messages_text(request.messages), output),
                    model=end.model or model, provider="node", node=self.agent.node_id,
                    latency_ms=round((time.monotonic() - started) * 1000, 3),
                    ttft_ms=round((first - started) * 1000, 3) if first else None)

    async def _stream(self, info: RuntimeInfo, model: str, request: CompletionRequest,
                      sender: StreamSender) -> tuple[End, float | None, str]:
        """Runtime pieces -> frames; (the end, when the first token came, the text sent)."""
        first = None
        end: End | None = None
        output: list[str] = []
        async for piece in self.adapter(info).stream(model, request, request.messages):
            if isinstance(piece, Text):
                if request.stream:  # a whole answer has no time to first token
                    first = first or time.monotonic()
                output.append(piece.content)
                await sender.delta(content=piece.content)
            elif isinstance(piece, ToolCalls):
                await sender.delta(tool_calls=piece.tool_calls)
            else:
                end = piece
        if end is None:
            raise UpstreamError("StreamCut", "runtime stream ended without a finish")
        return end, first, "".join(output)
