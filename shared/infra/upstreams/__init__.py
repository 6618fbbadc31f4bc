"""Upstream adapters: one per wire protocol, used by the provider (hosted and
self-hosted upstreams) and the node (its runtime) alike.

- `openai`: OpenAI-compatible `/chat/completions` with SSE;
- `anthropic`: Anthropic Messages `/v1/messages` with its SSE event sequence;
- `ollama`: Ollama's native `/api/chat` with NDJSON lines.

Each is configured by an `UpstreamConfig` and yields `Piece`s (`base.py`).
"""

from __future__ import annotations

from shared.infra.upstreams.anthropic import AnthropicAdapter
from shared.infra.upstreams.base import (
    Adapter,
    End,
    Piece,
    Text,
    ToolCalls,
    UpstreamConfig,
    UpstreamError,
    estimate_tokens,
    usage_of,
)
from shared.infra.upstreams.ollama import OllamaAdapter
from shared.infra.upstreams.openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter, "anthropic": AnthropicAdapter, "ollama": OllamaAdapter,
}


def adapter_for(config: UpstreamConfig) -> Adapter:
    return ADAPTERS[config.kind](config)


__all__ = ["ADAPTERS", "Adapter", "AnthropicAdapter", "End", "OllamaAdapter", "OpenAIAdapter",
           "Piece", "Text", "ToolCalls", "UpstreamConfig", "UpstreamError", "adapter_for",
           "estimate_tokens", "usage_of"]
