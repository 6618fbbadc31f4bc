"""Anthropic Messages `/v1/messages` with its SSE event sequence, or one message
document for a whole answer."""

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
        body: dict[str, Any] = {"model": model, "stream": request.stream, "messages": turns,
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
        if not request.stream:
            for piece in self._answer(await self._whole("POST", "/v1/messages", body, headers)):
                yield piece
            return
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
        yield End(_finish(stop), input_tokens, output_tokens, seen_model)

    def _answer(self, data: Any) -> list[Piece]:
        """A message document as the pieces its stream would yield."""
        if not isinstance(data, dict):
            raise UpstreamError("BadResponse", f"{self.config.name}: an answer that is no object")
        if data.get("type") == "error" or "error" in data:
            raise UpstreamError("UpstreamError", f"{self.config.name}: {data.get('error')}"[:300])
        stop = data.get("stop_reason")
        if stop is None:
            raise UpstreamError("BadResponse", f"{self.config.name}: an answer without a stop")
        text = "".join(block.get("text") or "" for block in data.get("content") or []
                       if isinstance(block, dict) and block.get("type") == "text")
        usage = data.get("usage") or {}
        return [*([Text(text)] if text else []),
                End(_finish(stop), usage.get("input_tokens"), usage.get("output_tokens"),
                    data.get("model"))]


def _finish(stop: str) -> str:
    """Anthropic's stop reason in OpenAI's words."""
    return {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop",
            "tool_use": "tool_calls"}.get(stop, stop)
