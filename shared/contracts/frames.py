"""Stream frames: what a streamed reply (LLM tokens) is made of on the wire.

The protocol (credit flow control, cancellation, keepalives) is
`shared.infra.streaming`; these are its messages.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.contracts.events import LLMCallCompleted, LLMCallStarted


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
    # the call's events the requester appends with its settle (`CompletionRequest.caller_records`):
    # `LLMCallStarted` (unless the provider appended it already) and `LLMCallCompleted`
    record: tuple[LLMCallStarted | LLMCallCompleted, ...] = ()


class Failed(msgspec.Struct, frozen=True, tag="failed", kw_only=True):
    error: str  # a class name: UpstreamError, Timeout, NoRoute, Overloaded, ...
    detail: str
    status: int = 502  # what an HTTP gateway should answer
    after_first_token: bool = False
    rule: str | None = None  # the policy rule, for error "PolicyDenied"


class Keepalive(msgspec.Struct, frozen=True, tag="keepalive", kw_only=True):
    pass


class ToolDone(msgspec.Struct, frozen=True, tag="tool_done", kw_only=True):
    """A tool call's end on a node (`shared.contracts.subjects.node_tool`)."""

    is_error: bool  # the tool reported a failure (non-zero exit, an MCP isError, HTTP >= 400)
    exit_code: int | None = None
    output: str = ""  # what the caller sees, at most the tool's max_output_bytes
    output_bytes: int = 0  # all that the tool produced
    truncated: bool = False
    result: Any = None  # a JSON result when the tool gave one (python's `result`, MCP structuredContent)
    duration_ms: float = 0.0
    cpu_s: float = 0.0
    peak_memory_mb: float = 0.0
    output_ref: str | None = None  # the whole output in the object store, when above the cap
    node: str | None = None


class Frames(msgspec.Struct, frozen=True, tag="frames", kw_only=True):
    """Several frames in one message, in their order: what a sender gives in one turn
    (a whole answer: `Started`, its `Delta` and `Done`), to a receiver that asked for it
    (`CompletionRequest.batch_frames`): one NATS message instead of three (issue 16)."""

    frames: tuple[Started | Delta | Done | Failed | ToolDone, ...]


Frame = Started | Delta | Done | Failed | Keepalive | ToolDone | Frames


class Credit(msgspec.Struct, frozen=True, tag="credit", kw_only=True):
    acked: int


class Cancel(msgspec.Struct, frozen=True, tag="cancel", kw_only=True):
    reason: str = "client went away"


Control = Credit | Cancel
