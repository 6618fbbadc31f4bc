"""OpenAI-compatible `/chat/completions` with SSE (`data: {...}`, `[DONE]`), or one
`chat.completion` document for a whole answer: llama.cpp's llama-server, vLLM, LM
Studio, Ollama's `/v1` and hosted OpenAI all speak it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.upstreams.base import (
    Adapter,
    End,
    Piece,
    Text,
    ToolCalls,
    UpstreamError,
    decode_json,
)


class OpenAIAdapter(Adapter):
    async def stream(self, model: str, request: CompletionRequest,
                     messages: tuple[ChatMessage, ...]) -> AsyncIterator[Piece]:
        body: dict[str, Any] = {"model": model, "stream": request.stream,
                                "messages": [msgspec.to_builtins(m) for m in messages]}
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        for field in ("max_tokens", "temperature", "top_p", "tools", "tool_choice"):
            value = getattr(request, field)
            if value is not None:
                body[field] = value
        if request.stop:
            body["stop"] = list(request.stop)
        headers = {"Authorization": f"Bearer {key}"} if (key := self.config.api_key()) else {}
        if not request.stream:
            for piece in self._answer(await self._whole("POST", "/chat/completions", body, headers)):
                yield piece
            return
        finish, usage, seen_model = None, None, None
        done = False
        async for line in self._lines("POST", "/chat/completions", body, headers):
            # read to the end even after [DONE]: a response read whole returns its
            # connection to the pool (no new TCP/TLS handshake for the next call)
            if done or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            try:
                chunk = decode_json(data)
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

    def _answer(self, data: Any) -> list[Piece]:
        """A `chat.completion` document as the pieces a stream of it would yield (tool
        calls with their `index`, as stream deltas carry it)."""
        if not isinstance(data, dict):
            raise UpstreamError("BadResponse", f"{self.config.name}: an answer that is no object")
        if "error" in data:
            raise UpstreamError("UpstreamError", f"{self.config.name}: {data['error']}"[:300])
        choices = data.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        finish = choice.get("finish_reason")
        if finish is None:
            raise UpstreamError("BadResponse", f"{self.config.name}: an answer without a finish")
        message = choice.get("message") or {}
        pieces: list[Piece] = []
        if message.get("content"):
            pieces.append(Text(message["content"]))
        if message.get("tool_calls"):
            pieces.append(ToolCalls([{**call, "index": i}
                                     for i, call in enumerate(message["tool_calls"])]))
        usage = data.get("usage") or {}
        pieces.append(End(finish, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          data.get("model")))
        return pieces
