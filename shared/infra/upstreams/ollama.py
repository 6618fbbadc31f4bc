"""Ollama's native `/api/chat` with NDJSON lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from shared.contracts.messages import ChatMessage, CompletionRequest
from shared.infra.upstreams.base import Adapter, End, Piece, Text, UpstreamError, decode_json


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
            data = decode_json(line)
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
