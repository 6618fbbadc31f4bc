"""Ollama's native `/api/chat` with NDJSON lines, or one document for a whole answer."""

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
        body = {"model": model, "stream": request.stream, "options": options,
                "messages": [{"role": m.role, "content": m.text} for m in messages]}
        if not request.stream:
            data = await self._whole("POST", "/api/chat", body, {})
            pieces = self._pieces(data) if isinstance(data, dict) else []
            if not pieces or not isinstance(pieces[-1], End):
                raise UpstreamError("BadResponse", f"{self.config.name}: an answer not done")
            for piece in pieces:
                yield piece
            return
        end: End | None = None
        async for line in self._lines("POST", "/api/chat", body, {}):
            if not line.strip():
                continue
            for piece in self._pieces(decode_json(line)):
                if isinstance(piece, End):
                    end = piece
                else:
                    yield piece
        if end is None:
            raise UpstreamError("StreamCut", f"{self.config.name}: stream ended without done")
        yield end

    def _pieces(self, data: Any) -> list[Piece]:
        """One line of the stream (or the whole answer) as pieces: its text, and its end
        when it says done."""
        if "error" in data:
            raise UpstreamError("UpstreamError", f"{self.config.name}: {data['error']}"[:300])
        text = (data.get("message") or {}).get("content")
        pieces: list[Piece] = [Text(text)] if text else []
        if data.get("done"):
            pieces.append(End(data.get("done_reason") or "stop", data.get("prompt_eval_count"),
                              data.get("eval_count"), data.get("model")))
        return pieces
