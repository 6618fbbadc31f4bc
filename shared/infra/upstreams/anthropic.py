"""Anthropic Messages `/v1/messages` with its SSE event sequence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.upstreams.base import Adapter, End, Piece, Text, UpstreamError, decode_json


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
            if line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", errors="replace")
                continue
            if not line.startswith(b"data:"):
                continue
            data = decode_json(line[5:].strip() or b"{}")
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
