"""HTTP API bodies. Inputs forbid unknown fields, so a typo is a 400 naming the field."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

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
    # the agent's version pinned at start and whose it is ("tenant" or "system"); None:
    # `agent` names no defined agent (a label)
    agent_version: int | None = None
    agent_source: str | None = None


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
    # an agent run's messages: the assistant's tool calls, which call a tool message answers
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    run_id: str | None = None


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
    # slices orchestrators hold to admit calls from in memory (budget leases), counted
    # against the limit like reservations
    leased_usd: float = 0.0
    leased_tokens: int = 0
    open_leases: int = 0
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
    line: int | None = None  # in an agent file (markdown): the line of the problem


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


# -- tools ------------------------------------------------------------------------------

ToolName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
HostPort = Annotated[str, msgspec.Meta(min_length=1, max_length=260)]


class ToolPermissionsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    network: Annotated[list[HostPort], msgspec.Meta(max_length=64)] | Literal["none"] = "none"
    filesystem: Literal["none", "ro", "rw"] = "none"


class ToolLimitsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 512
    cpu_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    max_output_bytes: Annotated[int, msgspec.Meta(ge=256, le=64 * 1024 * 1024)] = 1024 * 1024
    processes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64


class HttpToolIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url_template: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    # header -> the NAME of a tenant secret (PUT /v1/secrets/{name}), never a value
    headers: Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=128)],
                            Annotated[str, msgspec.Meta(min_length=1, max_length=128)]],
                       msgspec.Meta(max_length=32)] = {}


class ToolIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tenant tool: `kind` builtin (instantiating `builtin` with its own permissions) or
    http (`http`). `parameters` is the JSON Schema of its arguments (an object)."""

    name: ToolName
    description: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    kind: Literal["builtin", "http"] = "builtin"
    builtin: Literal["python", "shell", "http_fetch", "files.read", "files.write",
                     "files.list"] | None = None
    parameters: dict[str, Any] | None = None
    permissions: ToolPermissionsIn = ToolPermissionsIn()
    limits: ToolLimitsIn = ToolLimitsIn()
    needs_approval: bool = False
    effect: Literal["read_only", "idempotent", "side_effecting"] = "side_effecting"
    http: HttpToolIn | None = None
    node_labels: Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
                                Annotated[str, msgspec.Meta(max_length=256)]],
                           msgspec.Meta(max_length=16)] = {}
    expected_version: Annotated[int, msgspec.Meta(ge=0)] | None = None  # 0: must be new


class ToolOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    parameters: dict[str, Any]
    kind: str
    builtin: str | None
    source: str  # builtin, tenant, mcp
    version: int  # 0 for builtins
    permissions: dict[str, Any]
    limits: dict[str, Any]
    needs_approval: bool
    effect: str
    http: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None
    node_labels: dict[str, str] = {}


class ToolList(msgspec.Struct, frozen=True, kw_only=True):
    tools: list[ToolOut]


class ToolInvokeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    arguments: dict[str, Any] = {}
    run_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NAME)] | None = None


class ToolCallView(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call: `status` requested, pending_approval, approved, running, finished or
    failed (`error` names why: invalid_arguments, denied, rejected, timeout, memory, cpu,
    node_lost, no_node, sandbox_error, upstream_error, cancelled, ...)."""

    tool_call_id: str
    session_id: str
    tool: str
    tool_version: int
    status: str
    arguments: dict[str, Any] = {}
    run_id: str | None = None
    verdict: str | None = None
    rule: str | None = None
    reason: str | None = None
    approved: bool | None = None
    approved_by: str | None = None
    node: str | None = None
    is_error: bool | None = None
    exit_code: int | None = None
    output: str | None = None
    result: Any = None
    output_bytes: int | None = None
    truncated: bool | None = None
    output_ref: str | None = None
    duration_ms: float | None = None
    cpu_s: float | None = None
    peak_memory_mb: float | None = None
    error: str | None = None
    detail: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ToolApprovalIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    approve: bool
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


SECRET_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$"


class SecretIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    value: Annotated[str, msgspec.Meta(min_length=1, max_length=16384)]


class SecretOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    created_at: datetime
    updated_at: datetime


class SecretList(msgspec.Struct, frozen=True, kw_only=True):
    secrets: list[SecretOut]


# -- MCP servers (services/orchestrator/mcp_servers.py) -----------------------------------

McpServerName = Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                            pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"  # an HTTP header name (RFC 9110 token)


class McpServerIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tenant's MCP server: `url` (Streamable HTTP) or `command` (an argv run over
    stdio inside the sandbox on a node), exactly one. `headers` map a header to the NAME
    of a tenant secret (PUT /v1/secrets/{name}). `limits` bound the listing and every
    call of its tools; `needs_approval` and `effect` apply to each of its tools. A stdio
    server gets no network."""

    name: McpServerName
    url: Annotated[str, msgspec.Meta(min_length=8, max_length=2048,
                                     pattern=r"^https?://[^\s@/?#]+[^\s]*$")] | None = None
    command: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]],
                       msgspec.Meta(min_length=1, max_length=64)] | None = None
    headers: Annotated[dict[Annotated[str, msgspec.Meta(pattern=HEADER_NAME)],
                            Annotated[str, msgspec.Meta(pattern=SECRET_NAME)]],
                       msgspec.Meta(max_length=32)] = {}
    limits: ToolLimitsIn = ToolLimitsIn(timeout_s=10.0)
    needs_approval: bool = False
    effect: Literal["read_only", "idempotent", "side_effecting"] = "side_effecting"


class McpToolOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the registry's name: mcp.<server>.<tool>
    tool: str  # the server's own name
    description: str
    parameters: dict[str, Any]


class McpSkippedOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    reason: str


class McpServerOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    transport: str  # http or stdio
    url: str | None
    command: list[str]
    headers: dict[str, str]  # header -> secret name
    tools: list[McpToolOut]
    skipped: list[McpSkippedOut]  # listed tools left out, with the reason
    limits: dict[str, Any]
    needs_approval: bool
    effect: str


class McpServerList(msgspec.Struct, frozen=True, kw_only=True):
    servers: list[McpServerOut]


# -- agents (definitions) -----------------------------------------------------------------

AGENT_MARKDOWN_MAX = 256 * 1024  # shared.domain.agents.MAX_MARKDOWN_BYTES


class AgentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/agents` as JSON; the body may also be the markdown itself
    (`Content-Type: text/markdown`)."""

    markdown: Annotated[str, msgspec.Meta(min_length=1, max_length=AGENT_MARKDOWN_MAX)]


class AgentOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    source: str  # tenant (its own) or system (shipped in agents/)
    description: str
    model: str | None  # as written; None: inherit
    route: str | None  # what a run asks the call path for; None: the run's/session's model
    tools: list[str]
    ignored_tools: list[str]  # coding-agent-only tools left out
    max_steps: int
    max_cost_usd: float | None
    approval: list[str]
    temperature: float | None
    system_prompt: str
    markdown: str
    skills: list[str] = []  # what it is good at: how a run that names no agent picks it


class AgentList(msgspec.Struct, frozen=True, kw_only=True):
    agents: list[AgentOut]


# -- agent runs (issue 12: RUNS) ------------------------------------------------------------


class RunIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/sessions/{id}/runs`: the agent (its name) and the task. No `agent`: the
    session's agent, else (and for `"auto"`) the agent whose skills fit the task best."""

    input: Annotated[str, msgspec.Meta(min_length=1, max_length=1_000_000)]
    agent: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class RunApprovalIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tool_call_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    decision: Literal["approve", "reject"]
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class RunCancelIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class RunApprovalRequest(msgspec.Struct, frozen=True, kw_only=True):
    tool_call_id: str
    tool: str
    arguments: dict[str, Any]
    reason: str  # needs_approval, or outcome_unknown (approve = run it again)
    expires_at: datetime


class RunToolCallOut(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    tool: str
    tool_call_id: str | None  # the last attempt's (GET /v1/sessions/{id}/tool-calls/{id})
    attempts: int
    status: str  # pending, running, awaiting_approval, finished, failed, rejected, denied, outcome_unknown
    is_error: bool | None = None


class RunOut(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    session_id: str
    agent: str
    agent_version: int
    model: str
    status: str  # running, awaiting_approval, finished, failed, cancelled
    steps: int
    max_steps: int
    cost_usd: float
    max_cost_usd: float | None
    input_tokens: int
    output_tokens: int
    answer: str | None = None
    error: str | None = None  # why it failed: max_steps, budget, policy, approval_expired, ...
    detail: str | None = None
    pending_approvals: list[RunApprovalRequest] = []
    tool_calls: list[RunToolCallOut] = []


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    session_id: str
    agent: str
    agent_version: int
    status: str
    steps: int
    cost_usd: float
    answer: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime


class RunList(msgspec.Struct, frozen=True, kw_only=True):
    runs: list[RunSummary]


# -- model distribution (issue 14) ------------------------------------------------------

ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128,  # `:` for Ollama tags
                                        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._:-]*$")]
NodeIdIn = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class DistributeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: ModelName
    target: Literal["all", "specific", "auto"] = "auto"
    node_ids: Annotated[list[NodeIdIn], msgspec.Meta(max_length=1000)] = []


class PullIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: ModelName


class TaskOut(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    node_id: str
    model: str
    status: str  # pending, in_progress, completed, failed, cancelled
    progress: float  # 0..1
    bytes_done: int
    total_bytes: int
    speed_bps: float
    error: str | None
    detail: str
    attempt: int
    resumed_from: int
    fetched_bytes: int  # read from the store by the last attempt (a resume skips what it had)
    reason: str
    reconciled: bool
    progress_at: float | None = None  # unix time of the last progress telemetry


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    tasks: list[TaskOut]


class TaskIds(msgspec.Struct, frozen=True, kw_only=True):
    task_ids: list[str]
    tasks: list[TaskOut]


class ModelFit(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    fits: bool
    reason: str | None


class AvailableModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    sha256: str
    size_bytes: int
    architecture: str
    parameters: int
    quantization: str
    context_length: int
    memory_needed_bytes: int
    source: str
    fit: list[ModelFit]


class AvailableModels(msgspec.Struct, frozen=True, kw_only=True):
    models: list[AvailableModel]


class NodeModelOut(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    sha256: str
    size_bytes: int
    loaded: bool


class NodeModels(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    installed: list[NodeModelOut]
    downloading: list[TaskOut]
