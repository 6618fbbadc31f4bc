"""The event catalogue: every durable fact in Nexus, declared once.

Events are immutable msgspec Structs in one tagged union; the tag (the class name) is
the `type` column of the event store. Add an event by subclassing `Event` and listing
it in `EVENT_TYPES`; docs/ARCHITECTURE.md lists who appends each one.

Rules for evolving an event: add fields only with defaults; never rename or remove a
field or a type that has been stored (old events must keep decoding).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal, Union

import msgspec

from shared.contracts.messages import NodeRegistration, RuntimeInfo


class Metadata(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Who and what caused an event; stored beside it, not inside it."""

    tenant: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    actor: str | None = None
    idempotency_key: str | None = None  # the client's Idempotency-Key, when it sent one
    request_hash: str | None = None     # sha256 of the request body that carried it


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """Base of all events; the subclass name is its type."""


# -- sessions ---------------------------------------------------------------------------


class BudgetLimits(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    limit_usd: float | None = None
    limit_tokens: int | None = None


class SessionStarted(Event, frozen=True):
    session_id: str
    tenant: str
    budget: BudgetLimits | None = None
    policy: str | None = None  # a tenant policy's name ...
    policy_version: int | None = None  # ... pinned at the version current at start
    policy_rules: dict[str, object] | None = None  # or inline rules (shared.domain.policy.PolicyRules)
    agent: str | None = None
    metadata: dict[str, str] = {}


class SessionClosed(Event, frozen=True):
    session_id: str
    reason: str = "closed by client"


# -- nodes ------------------------------------------------------------------------------
# Durable facts about nodes only: transitions, never heartbeats (those are telemetry
# on the NEXUS_HEARTBEATS JetStream stream, see docs/ARCHITECTURE.md).


class NodeRegistered(Event, frozen=True):
    node_id: str
    registration: NodeRegistration


class NodeCapabilitiesChanged(Event, frozen=True):
    node_id: str
    registration: NodeRegistration


class NodeRuntimeChanged(Event, frozen=True):
    """The node's runtime changed state (starting, ready, crashed, failed, ...), with why."""

    node_id: str
    runtime: RuntimeInfo


class NodeWentOffline(Event, frozen=True):
    node_id: str
    last_heartbeat_at: float | None  # unix seconds
    timeout_s: float


class NodeCameBack(Event, frozen=True):
    node_id: str
    via: str  # "registration" or "heartbeat"


class NodeDraining(Event, frozen=True):
    node_id: str
    reason: str = ""


class NodeLeft(Event, frozen=True):
    node_id: str
    reason: str = ""


class NodeDeregistered(Event, frozen=True):
    node_id: str
    actor: str


# -- tenants and API keys ---------------------------------------------------------------


class ApiKeyCreated(Event, frozen=True):
    """A key was issued. Only its SHA-256 is kept: the key itself is shown once."""

    key_id: str
    tenant: str
    name: str
    role: str  # "admin" (manages its tenant) or "member"
    key_hash: str


class ApiKeyRevoked(Event, frozen=True):
    key_id: str
    tenant: str
    actor: str


# -- budgets (folds and decisions: shared/budget.py) ------------------------------------


class BudgetOpened(Event, frozen=True):
    budget_id: str
    scope: Literal["session", "tenant"]
    owner: str  # session id or tenant
    limit_micro_usd: int | None = None
    limit_tokens: int | None = None
    period: str | None = None  # "YYYY-MM" for tenant monthly budgets


class BudgetReserved(Event, frozen=True):
    budget_id: str
    call_id: str
    micro_usd: int
    tokens: int
    expires_at: float  # unix seconds
    # the orchestrator process holding it (its liveness id: services/orchestrator/liveness.py);
    # when that process is lost its reservations are released ("orchestrator-lost")
    instance: str | None = None


class BudgetCommitted(Event, frozen=True):
    """Actual spend of a call, charged in full; the rest of its reservation is released.

    `micro_usd` / `tokens` are the actual cost, all of it committed; `overrun_*` is the
    part of it above the call's reservation (included in `micro_usd` / `tokens`, not in
    addition), zero unless the reservation's worst case was wrong. (Events appended
    before this rule charged at most the budget's room and put the rest in `overrun_*`.)
    `late`: the reservation had lapsed (expired, or released for a lost orchestrator)
    before the call finished; all of the cost is then overrun.
    """

    budget_id: str
    call_id: str
    micro_usd: int
    tokens: int
    overrun_micro_usd: int = 0
    overrun_tokens: int = 0
    late: bool = False


class BudgetReleased(Event, frozen=True):
    budget_id: str
    call_id: str
    reason: str  # "failed", "cancelled", "expired", "orchestrator-lost"


class BudgetExceeded(Event, frozen=True):
    """A denied reservation, recorded for audit; it changes nothing.

    `available_*` is None for an unlimited dimension.
    """

    budget_id: str
    call_id: str
    requested_micro_usd: int
    requested_tokens: int
    available_micro_usd: int | None
    available_tokens: int | None
    reason: str


class BudgetLimitChanged(Event, frozen=True):
    budget_id: str
    limit_micro_usd: int | None
    limit_tokens: int | None


class PolicyDefined(Event, frozen=True):
    """A tenant's named policy; each definition is a new version (the stream version)."""

    tenant: str
    name: str
    rules: dict[str, object]  # shared.domain.policy.PolicyRules, as JSON


class DroppedTarget(msgspec.Struct, frozen=True, kw_only=True):
    """A target of a call's fallback chain that the policy denied, and why."""

    target: str  # "provider/model"
    rule: str
    reason: str


class PolicyEvaluated(Event, frozen=True):
    """One policy decision, with the rule that decided and a readable reason.

    A chat decision names the targets of the route the call may try (`targets`, in
    order) and those the policy dropped from it (`dropped`, each with its rule).
    """

    session_id: str
    call_id: str
    action: str  # "chat", "tool", "output"
    allowed: bool
    rule: str
    reason: str
    policy: str | None = None  # name@version, or "inline"
    scope: str | None = None
    targets: tuple[str, ...] = ()  # chat: the targets allowed, "provider/model", in order
    dropped: tuple[DroppedTarget, ...] = ()  # chat: the targets the policy denied


class MessageAppended(Event, frozen=True):
    """A turn of a session's conversation (stream conversation-{session_id})."""

    session_id: str
    message_id: str
    role: str  # "user" or "assistant"
    content: str
    call_id: str | None = None
    model: str | None = None
    provider: str | None = None
    node: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_micro_usd: int | None = None
    finish_reason: str | None = None


class TenantBudgetSet(Event, frozen=True):
    """A tenant's monthly budget (across all its sessions); applies from the next reserve."""

    tenant: str
    limit_micro_usd: int | None
    limit_tokens: int | None


# -- LLM calls (appended by the provider; stream llmcall-{call_id}) ---------------------


class LLMCallStarted(Event, frozen=True):
    call_id: str
    session_id: str
    model: str  # as the client asked
    targets: tuple[str, ...]  # the fallback chain, "provider/model"


class LLMCallFailed(Event, frozen=True):
    """One failed attempt; `fallback` names the next target taken (None: retry or give up)."""

    call_id: str
    session_id: str
    target: str
    attempt: int
    error: str
    detail: str
    status: int | None = None
    fallback: str | None = None
    after_first_token: bool = False
    final: bool = False  # the call as a whole failed
    retry_in_s: float | None = None  # the backoff before retrying this target (honours Retry-After)


class LLMCallCompleted(Event, frozen=True):
    call_id: str
    session_id: str
    model: str  # as the upstream reported it
    provider: str
    target: str
    node: str | None
    latency_ms: float
    ttft_ms: float | None
    input_tokens: int
    output_tokens: int
    usage_estimated: bool
    cost_micro_usd: int
    finish_reason: str
    attempts: int


# -- tools ------------------------------------------------------------------------------
# A tool call's stream is `toolcall-<tool_call_id>`; definitions are versioned per
# (tenant, name) like policies. The shapes of `spec` and `arguments` are the domain's
# (`shared.domain.tools`), kept here as JSON so old events always decode.


class ToolDefined(Event, frozen=True):
    """A tenant's tool (stream `tool-<tenant>-<name>`); each definition a new version."""

    tenant: str
    name: str
    spec: dict[str, object]  # shared.domain.tools.ToolSpec, as JSON (secrets by name only)


class McpServerRegistered(Event, frozen=True):
    """A tenant's MCP server (stream `mcpserver-<tenant>-<name>`) and the tools it listed."""

    tenant: str
    name: str
    transport: str  # "http" (Streamable HTTP) or "stdio" (run in the sandbox on a node)
    url: str | None = None
    command: tuple[str, ...] = ()
    headers: dict[str, str] = {}  # header -> the *name* of a tenant secret, never a value
    tools: tuple[dict[str, object], ...] = ()  # as `tools/list` answered: name, description, inputSchema
    # listed tools left out (unusable name, invalid inputSchema), each with its reason
    skipped: tuple[dict[str, str], ...] = ()
    limits: dict[str, object] = {}  # ToolLimits of its tools' calls, as JSON ({}: the defaults)
    needs_approval: bool = False  # every call of its tools waits for a human
    effect: str = "side_effecting"  # of its tools (read_only, idempotent, side_effecting)


class ToolCallRequested(Event, frozen=True):
    session_id: str
    tool_call_id: str
    tool: str  # the registry name ("python", "mcp.<server>.<tool>", a tenant's own)
    tool_version: int
    arguments: dict[str, object]
    run_id: str | None = None  # the agent run that asked for it, if any


class ToolCallDecided(Event, frozen=True):
    """The orchestrator's verdict on a tool call, with the rule that decided it."""

    session_id: str
    tool_call_id: str
    tool: str
    verdict: str  # "allowed", "denied", "needs_approval"
    rule: str
    reason: str


class ToolCallApprovalGiven(Event, frozen=True):
    """A human's answer to a call that needed approval."""

    session_id: str
    tool_call_id: str
    approved: bool
    reason: str = ""
    by: str = ""  # the key id that answered


class ToolCallStarted(Event, frozen=True):
    session_id: str
    tool_call_id: str
    tool: str
    node: str


class ToolCallFinished(Event, frozen=True):
    """The tool ran to its end (`is_error`: it reported a failure, e.g. a non-zero exit)."""

    session_id: str
    tool_call_id: str
    tool: str
    node: str | None
    is_error: bool
    exit_code: int | None
    duration_ms: float
    cpu_s: float
    peak_memory_mb: float
    output_bytes: int  # all the output the tool produced, before the cap
    truncated: bool
    output: str  # the result as the caller sees it (capped)
    output_ref: str | None = None  # the whole output in the object store, when above the cap
    result: object = None  # a JSON result when the tool gave one (ToolDone.result)


class ToolCallFailed(Event, frozen=True):
    """The call did not run to its end; `reason` names why."""

    session_id: str
    tool_call_id: str
    tool: str
    # "invalid_arguments", "denied", "rejected", "approval_expired", "timeout", "memory",
    # "cpu", "node_lost", "no_node", "sandbox_error", "upstream_error", "cancelled"
    reason: str
    detail: str
    node: str | None = None


EVENT_TYPES: tuple[type[Event], ...] = (
    SessionStarted,
    SessionClosed,
    NodeRegistered,
    NodeCapabilitiesChanged,
    NodeRuntimeChanged,
    NodeWentOffline,
    NodeCameBack,
    NodeDraining,
    NodeLeft,
    NodeDeregistered,
    ApiKeyCreated,
    ApiKeyRevoked,
    BudgetOpened,
    BudgetReserved,
    BudgetCommitted,
    BudgetReleased,
    BudgetExceeded,
    BudgetLimitChanged,
    TenantBudgetSet,
    PolicyDefined,
    PolicyEvaluated,
    MessageAppended,
    LLMCallStarted,
    LLMCallFailed,
    LLMCallCompleted,
    ToolDefined,
    McpServerRegistered,
    ToolCallRequested,
    ToolCallDecided,
    ToolCallApprovalGiven,
    ToolCallStarted,
    ToolCallFinished,
    ToolCallFailed,
)
AnyEvent = Union[EVENT_TYPES]  # type: ignore[valid-type]
EVENT_TYPE_NAMES: frozenset[str] = frozenset(t.__name__ for t in EVENT_TYPES)


# -- streams ----------------------------------------------------------------------------


def session_stream(session_id: str) -> str:
    return f"session-{session_id}"


def node_stream(node_id: str) -> str:
    return f"node-{node_id}"


def llmcall_stream(call_id: str) -> str:
    return f"llmcall-{call_id}"


def conversation_stream(session_id: str) -> str:
    return f"conversation-{session_id}"


def policy_stream(tenant: str, name: str) -> str:
    return f"policy-{tenant}-{name}"


def tenant_stream(tenant: str) -> str:
    return f"tenant-{tenant}"


def apikey_stream(key_id: str) -> str:
    return f"apikey-{key_id}"


def tool_stream(tenant: str, name: str) -> str:
    return f"tool-{tenant}-{name}"


def mcpserver_stream(tenant: str, name: str) -> str:
    return f"mcpserver-{tenant}-{name}"


def toolcall_stream(tool_call_id: str) -> str:
    return f"toolcall-{tool_call_id}"


def new_id() -> str:
    return str(uuid.uuid4())


# -- encoding ---------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)
_meta_decoder = msgspec.json.Decoder(Metadata)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> Event:
    return _decoder.decode(data)


def encode_metadata(meta: Metadata) -> bytes:
    return _encoder.encode(meta)


def decode_metadata(data: bytes | str) -> Metadata:
    return _meta_decoder.decode(data)


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as stored: the event plus its envelope."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    stream_version: int
    type: str
    event: Event
    metadata: Metadata
    recorded_at: datetime
