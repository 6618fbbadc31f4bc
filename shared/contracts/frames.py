"""Stream frames: what a streamed reply (LLM tokens) is made of on the wire.

The protocol (credit flow control, cancellation, keepalives) is
`shared.infra.streaming`; these are its messages.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False  # True when the runtime reported none and we counted


class Started(msgspec.Struct, frozen=True, tag="started", kw_only=True):
    control: str  # where Credit / Cancel go


class Delta(msgspec.Struct, frozen=True, tag="delta", kw_only=True):
    seq: int
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI delta.tool_calls, passed through


class Done(msgspec.Struct, frozen=True, tag="done", kw_only=True):
    finish_reason: str
    usage: Usage
    model: str
    provider: str
    node: str | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cost_micro_usd: int = 0
    attempts: int = 1
    fallbacks: tuple[str, ...] = ()  # "provider/model: why" for each target given up


class Failed(msgspec.Struct, frozen=True, tag="failed", kw_only=True):
    error: str  # a class name: UpstreamError, Timeout, NoRoute, Overloaded, ...
    detail: str
    status: int = 502  # what an HTTP gateway should answer
    after_first_token: bool = False
    rule: str | None = None  # the policy rule, for error "PolicyDenied"


class Keepalive(msgspec.Struct, frozen=True, tag="keepalive", kw_only=True):
    pass


Frame = Started | Delta | Done | Failed | Keepalive


class Credit(msgspec.Struct, frozen=True, tag="credit", kw_only=True):
    acked: int


class Cancel(msgspec.Struct, frozen=True, tag="cancel", kw_only=True):
    reason: str = "client went away"


Control = Credit | Cancel
