"""HTTP API bodies. Inputs forbid unknown fields, so a typo is a 400 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

NAME = r"^[A-Za-z0-9._:/-]+$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NAME)]
# a page cursor of GET /v1/sessions: `<microseconds since the epoch>.<session id>`
CURSOR = r"^[0-9]{1,17}\.[0-9a-f-]{1,36}$"
SESSION_STATUSES = ("open", "closed")
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MetaValue = Annotated[str, msgspec.Meta(max_length=1024)]


class BudgetIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    limit_usd: Annotated[float, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    limit_tokens: Annotated[int, msgspec.Meta(ge=0, le=10**12)] | None = None


class SessionCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    budget: BudgetIn | None = None
    policy: Name | None = None  # a tenant policy by name (the current version is pinned)
    policy_rules: dict[str, Any] | None = None  # or inline rules (see POST /v1/policies)
    agent: Name | None = None
    metadata: Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=64)] = {}


class BudgetView(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    limit_usd: float | None = None
    limit_tokens: int | None = None


class SessionView(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    tenant: str
    status: str
    budget: BudgetView | None
    policy: str | None
    policy_version: int | None
    policy_rules: dict[str, Any] | None
    agent: str | None
    metadata: dict[str, str]
    created_at: datetime
    closed_at: datetime | None
    version: int
    trace_id: str | None


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    nats: bool
    postgres: bool
    instance_id: str
    version: str


class ServicePing(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    instance_id: str | None = None
    uptime_s: float | None = None
    error: str | None = None


class SystemPing(msgspec.Struct, frozen=True, kw_only=True):
    orchestrator: ServicePing
    provider: ServicePing
    node: ServicePing


class NodeLoadOut(msgspec.Struct, frozen=True, kw_only=True):
    fresh: bool
    heartbeat_age_s: float | None
    cpu_pct: float | None
    memory_pct: float | None
    gpu_util_pct: float | None
    gpu_memory_used_bytes: int
    gpu_memory_total_bytes: int
    active_requests: int
    queue_depth: int
    avg_response_ms: float | None
    draining: bool


class NodeOut(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    status: str
    hostname: str
    addresses: tuple[str, ...]
    labels: dict[str, str]
    cpu_count: int
    memory_total_bytes: int
    gpus: tuple[dict[str, object], ...]
    runtime: dict[str, object]
    agent_version: str
    registered_at: datetime
    status_changed_at: datetime
    load: NodeLoadOut | None


class LoadSample(msgspec.Struct, frozen=True, kw_only=True):
    sent_at: float
    cpu_pct: float
    memory_pct: float
    gpu_util_pct: float | None
    gpu_memory_used_bytes: int
    active_requests: int
    avg_response_ms: float | None


class NodeDetail(NodeOut, frozen=True, kw_only=True):
    history: tuple[LoadSample, ...]


class NodeList(msgspec.Struct, frozen=True, kw_only=True):
    nodes: tuple[NodeOut, ...]
    total: int


class SessionList(msgspec.Struct, frozen=True, kw_only=True):
    sessions: tuple[SessionView, ...]
    next_cursor: str | None


class SessionCloseIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=500)] = "closed by client"


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    type: str
    stream_id: str
    recorded_at: datetime
    trace_id: str | None
    data: dict[str, object]


class AuditLog(msgspec.Struct, frozen=True, kw_only=True):
    events: tuple[AuditEvent, ...]
    next_after: int | None


class KeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Name
    role: Annotated[str, msgspec.Meta(pattern=r"^(admin|member)$")] = "member"
    tenant: Name | None = None  # platform admin only; default: the caller's tenant


class KeyIssued(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    key: str  # shown once
    tenant: str
    name: str
    role: str


class KeyView(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    tenant: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    keys: tuple[KeyView, ...]


# -- OpenAI-compatible chat -----------------------------------------------------------------

ToolName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                  omit_defaults=True):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: Annotated[str, msgspec.Meta(pattern="^function$")]
    function: FunctionDef


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool = False


class MessageIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                omit_defaults=True):
    role: Annotated[str, msgspec.Meta(pattern="^(system|developer|user|assistant|tool)$")]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class ChatCompletionIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The OpenAI chat-completions body. Fields Nexus does not act on but SDKs send are
    accepted (`user`, `seed`, penalties...); anything else is a 400 naming the field."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1, max_length=10_000)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None
    user: str | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class SessionMessageIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    content: Annotated[str, msgspec.Meta(min_length=1, max_length=1_000_000)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "default"
    stream: bool = False
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None


class MessageOut(msgspec.Struct, frozen=True, kw_only=True):
    message_id: str
    role: str
    content: str
    call_id: str | None
    model: str | None
    provider: str | None
    node: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: float | None
    finish_reason: str | None
    created_at: datetime


class MessageList(msgspec.Struct, frozen=True, kw_only=True):
    messages: tuple[MessageOut, ...]


class SessionReply(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    call_id: str
    message: MessageOut


class BudgetOut(msgspec.Struct, frozen=True, kw_only=True):
    budget_id: str
    scope: str
    limit_usd: float | None
    limit_tokens: int | None
    reserved_usd: float
    reserved_tokens: int
    committed_usd: float
    committed_tokens: int
    remaining_usd: float | None
    remaining_tokens: int | None
    open_reservations: int
    overrun_usd: float = 0.0  # committed beyond the calls' own reservations (in committed_*)
    overrun_tokens: int = 0
    overruns: int = 0  # calls that cost more than they reserved
    version: int
    as_of_position: int | None


class SessionBudgets(msgspec.Struct, frozen=True, kw_only=True):
    session: BudgetOut | None
    tenant: BudgetOut | None


class TenantBudgetIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    limit_usd: Annotated[float, msgspec.Meta(ge=0, le=1e9)] | None = None
    limit_tokens: Annotated[int, msgspec.Meta(ge=0, le=10**15)] | None = None


class PolicyIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Name
    rules: dict[str, Any]


class PolicyOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    rules: dict[str, Any]


# -- errors (RFC 9457), as every error response declares them ---------------------------------

class FieldError(msgspec.Struct, frozen=True, kw_only=True):
    field: str  # the body member (dotted), query parameter, path parameter or header
    message: str


class ProblemOut(msgspec.Struct, frozen=True, kw_only=True):
    """`application/problem+json`: every 4xx/5xx answer. Some types add members (a
    policy denial its `rule` and `policy`, a budget denial its `budget`)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    trace_id: str | None
    errors: list[FieldError] | None = None
