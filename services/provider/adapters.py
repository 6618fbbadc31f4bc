"""Upstream adapters: each speaks one wire protocol over HTTP and yields `Piece`s.

- `openai`: OpenAI-compatible `/chat/completions` with SSE (`data: {...}`, `[DONE]`);
  llama.cpp's llama-server, vLLM, LM Studio and hosted OpenAI all speak it.
- `anthropic`: Anthropic Messages `/v1/messages` with its SSE event sequence.
- `ollama`: Ollama's native `/api/chat` with NDJSON lines.

Errors are `UpstreamError`s classified as retryable (connection errors, timeouts,
429, 5xx) or not (other 4xx), with `Retry-After` when the upstream sent one. Error
details never include the request headers (where the API key travels).

HTTP is aiohttp, one session (connection pool) per upstream: at a thousand concurrent
streams httpx's pool added seconds per call where aiohttp stays at the ideal (measured:
1000 slow streams, 16.3 s vs 37.7 s for 16 s of generation).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from shared.contracts.messages import ChatMessage, CompletionRequest
from services.provider.config import ProviderConfig


@dataclass
class Text:
    content: str


@dataclass
class ToolCalls:
    tool_calls: list[dict[str, Any]]


@dataclass
class End:
    finish_reason: str
    input_tokens: int | None
    output_tokens: int | None
    model: str | None
    node: str | None = None  # the node that answered (kind "node")


Piece = Text | ToolCalls | End


class UpstreamError(Exception):
    def __init__(self, kind: str, detail: str, *, status: int | None = None,
                 retryable: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


async def _raise_for_status(resp: aiohttp.ClientResponse, provider: str) -> None:
    if resp.status < 400:
        return
    body = (await resp.read())[:300].decode(errors="replace")
    retryable = resp.status == 429 or resp.status >= 500
    kind = "RateLimited" if resp.status == 429 else f"HTTP{resp.status}"
    raise UpstreamError(kind, f"{provider} answered {resp.status}: {body}",
                        status=resp.status, retryable=retryable,
                        retry_after_s=_retry_after(resp))


class Adapter:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The upstream's connection pool (created in the running event loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                              sock_read=self.config.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.config.max_concurrency * 2),
                read_bufsize=1 << 20,  # SSE lines up to 1 MiB
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def stream(self, model: str, request: CompletionRequest,
               messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        raise NotImplementedError

    async def _lines(self, method: str, path: str, body: dict[str, Any],
                     headers: dict[str, str]) -> AsyncIterator[str]:
        url = self.config.base_url.rstrip("/") + path
        try:
            async with self.session().request(method, url, json=body, headers=headers) as resp:
                await _raise_for_status(resp, self.config.name)
                async for raw in resp.content:  # line by line, read to the end
                    yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
        except TimeoutError as exc:
            raise UpstreamError("Timeout", f"{self.config.name}: {type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("ConnectionError",
                                f"{self.config.name}: {type(exc).__name__}: {exc}") from None


class OpenAIAdapter(Adapter):
    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        body: dict[str, Any] = {
            "model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [msgspec.to_builtins(m) for m in messages],
        }
        for field in ("max_tokens", "temperature", "top_p", "tools", "tool_choice"):
            value = getattr(request, field)
            if value is not None:
                body[field] = value
        if request.stop:
            body["stop"] = list(request.stop)
        headers = {"Authorization": f"Bearer {key}"} if (key := self.config.api_key()) else {}
        finish, usage, seen_model = None, None, None
        done = False
        async for line in self._lines("POST", "/chat/completions", body, headers):
            # read to the end even after [DONE]: a response read whole returns its
            # connection to the pool (no new TCP/TLS handshake for the next call)
            if done or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamError("BadResponse", f"{self.config.name}: undecodable chunk") from None
            if "error" in chunk:
                raise UpstreamError("UpstreamError", f"{self.config.name}: {chunk['error']}"[:300])
            seen_model = chunk.get("model") or seen_model
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    yield Text(delta["content"])
                if delta.get("tool_calls"):
                    yield ToolCalls(delta["tool_calls"])
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise UpstreamError("StreamCut", f"{self.config.name}: stream ended without a finish")
        yield End(finish, (usage or {}).get("prompt_tokens"), (usage or {}).get("completion_tokens"),
                  seen_model)


class AnthropicAdapter(Adapter):
    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        system = "\n".join(m.text for m in messages if m.role in ("system", "developer"))
        turns = [{"role": "assistant" if m.role == "assistant" else "user", "content": m.text}
                 for m in messages if m.role not in ("system", "developer")]
        body: dict[str, Any] = {"model": model, "stream": True, "messages": turns,
                                "max_tokens": request.max_tokens or 1024}
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        headers = {"anthropic-version": "2023-06-01"}
        if key := self.config.api_key():
            headers["x-api-key"] = key
        input_tokens = output_tokens = None
        stop, seen_model, event = None, None, None
        async for line in self._lines("POST", "/v1/messages", body, headers):
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:].strip() or "{}")
            if event == "message_start":
                msg = data.get("message", {})
                seen_model = msg.get("model")
                input_tokens = (msg.get("usage") or {}).get("input_tokens")
            elif event == "content_block_delta":
                text = (data.get("delta") or {}).get("text")
                if text:
                    yield Text(text)
            elif event == "message_delta":
                stop = (data.get("delta") or {}).get("stop_reason") or stop
                output_tokens = (data.get("usage") or {}).get("output_tokens", output_tokens)
            elif event == "error":
                raise UpstreamError("UpstreamError", f"{self.config.name}: {data.get('error')}"[:300])
            elif event == "message_stop":
                continue  # read to the end: the connection goes back to the pool
        if stop is None:
            raise UpstreamError("StreamCut", f"{self.config.name}: stream ended without a stop")
        finish = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop",
                  "tool_use": "tool_calls"}.get(stop, stop)
        yield End(finish, input_tokens, output_tokens, seen_model)


class OllamaAdapter(Adapter):
    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        options: dict[str, Any] = {}
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.stop:
            options["stop"] = list(request.stop)
        body = {"model": model, "stream": True, "options": options,
                "messages": [{"role": m.role, "content": m.text} for m in messages]}
        end: End | None = None
        async for line in self._lines("POST", "/api/chat", body, {}):
            if not line.strip():
                continue
            data = json.loads(line)
            if "error" in data:
                raise UpstreamError("UpstreamError", f"{self.config.name}: {data['error']}"[:300])
            text = (data.get("message") or {}).get("content")
            if text:
                yield Text(text)
            if data.get("done"):
                end = End(data.get("done_reason") or "stop", data.get("prompt_eval_count"),
                          data.get("eval_count"), data.get("model"))
        if end is None:
            raise UpstreamError("StreamCut", f"{self.config.name}: stream ended without done")
        yield end


_TRY_NEXT_NODE = ("NodeBusy", "RuntimeNotReady")


class NodeAdapter(Adapter):
    """A self-hosted runtime behind a node daemon, over NATS (`nexus.node.<id>.infer`).

    The orchestrator chose the nodes (load-based selection) and put them in the request;
    they are tried in order until one starts answering.
    """

    def __init__(self, config: ProviderConfig, bus) -> None:
        super().__init__(config)
        self.bus = bus

    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        from shared.contracts import subjects
        from shared.infra.messaging import MessagingError
        from shared.contracts.frames import Delta, Done
        from shared.infra.streaming import StreamReceiver

        candidates = request.nodes.get(model, ())
        if not candidates:
            raise UpstreamError("NoNode", f"no online node serves {model!r}", status=503,
                                retryable=False)
        last: UpstreamError | None = None
        for node_id in candidates:
            node_request = msgspec.structs.replace(request, model=model, messages=messages, nodes={})
            sent = False
            try:
                async with StreamReceiver(self.bus, subjects.node_infer(node_id), node_request,
                                          first_frame_timeout_s=self.config.connect_timeout_s
                                          ) as stream:
                    async for frame in stream.frames():
                        if isinstance(frame, Delta):
                            sent = True
                            if frame.content:
                                yield Text(frame.content)
                            if frame.tool_calls:
                                yield ToolCalls(frame.tool_calls)
                        elif isinstance(frame, Done):
                            yield End(frame.finish_reason, frame.usage.input_tokens,
                                      frame.usage.output_tokens, frame.model, node=node_id)
                            return
                        elif frame.error in _TRY_NEXT_NODE and not sent:
                            # this node cannot take it now; the orchestrator's spare may
                            last = UpstreamError(frame.error, f"node {node_id}: {frame.detail}",
                                                 status=frame.status)
                            break
                        else:
                            raise UpstreamError(frame.error, f"node {node_id}: {frame.detail}",
                                                status=frame.status,
                                                retryable=not frame.after_first_token)
            except MessagingError as exc:
                last = UpstreamError("NodeUnavailable", f"node {node_id}: {exc}", status=503)
                if sent:
                    raise last from None
        raise last or UpstreamError("NoNode", "no node answered", status=503)


ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter, "anthropic": AnthropicAdapter, "ollama": OllamaAdapter,
}


def adapter_for(config: ProviderConfig, bus=None) -> Adapter:
    if config.kind == "node":
        return NodeAdapter(config, bus)
    return ADAPTERS[config.kind](config)
