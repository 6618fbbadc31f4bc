"""The event catalogue: every durable fact in Nexus, declared once.

Events are immutable msgspec Structs in one tagged union; the tag (the class name) is
the `type` column of the event store. Add an event by subclassing `Event` and listing
it in `EVENT_TYPES`; docs/ARCHITECTURE.md lists who appends each one.

Rules for evolving an event: add fields only with defaults; never rename or remove a
field or a type that has been stored (old events must keep decoding).
"""

from __future__ import annotations

import os
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
    # the agent's definition pinned at start (AgentDefined's stream version) and whose it
    # is ("tenant" or "system"); None: `agent` names no defined agent (a label only)
    agent_version: int | None = None
    agent_source: str | None = None


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
    scope: Literal["session", "tenant", "run"]  # "run": an agent run's max_cost_usd
    owner: str  # session id, tenant or run id
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
    # the call was admitted from this lease (issue 16): its cost comes out of the lease's
    # slice; a commit against a lease no longer open is late, all of it overrun
    lease: str | None = None


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


# -- budget leases (issue 16, the hot path): escrow slices admitted from in memory -------


class BudgetLeased(Event, frozen=True):
    """A slice of a budget taken by one orchestrator process to admit calls from in
    memory (issue 16): counted against the limit like a reservation until the calls'
    commits use it up or it is returned."""

    budget_id: str
    lease_id: str
    micro_usd: int
    tokens: int
    expires_at: float  # unix seconds
    instance: str | None = None  # the orchestrator process holding it (liveness)


class BudgetLeaseReturned(Event, frozen=True):
    """What is left of a lease given back to the budget."""

    budget_id: str
    lease_id: str
    reason: str  # "idle", "used" (a new slice replaced it), "shutdown", "expired", "orchestrator-lost"


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
    # an agent run's messages: the assistant's tool calls, a tool result's call id
    tool_calls: tuple[dict[str, object], ...] | None = None
    tool_call_id: str | None = None
    run_id: str | None = None


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
    # the orchestrator's plan (what `CallPlanned` recorded in a separate append before):
    # per node-served model the nodes picked by `strategy`, each candidate's load then
    nodes: dict[str, tuple[str, ...]] = {}
    strategy: str = ""
    loads: tuple[dict[str, object], ...] = ()


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
    # "cpu", "node_lost", "no_node", "sandbox_error", "upstream_error", "cancelled",
    # "outcome_unknown" (a retried request found its earlier attempt's call started, never ended)
    reason: str
    detail: str
    node: str | None = None


# -- tools: removals and workspace cleanup (tools follow-up) -----------------------------


class McpServerRemoved(Event, frozen=True):
    """A tenant removed its MCP server (stream `mcpserver-<tenant>-<name>`): its tools
    leave the registry; registering the name again starts a new version."""

    tenant: str
    name: str
    by: str = ""


class WorkspaceDeleted(Event, frozen=True):
    """A closed session's workspace was deleted from the object store (stream
    `workspace-<session_id>`, appended once by the orchestrator's janitor)."""

    tenant: str
    session_id: str
    objects: int = 0  # objects deleted (the manifest and its blobs)
    bytes: int = 0


# -- agent runs (issue 12: RUNS) --------------------------------------------------------
# A run is the stream run-{run_id}; its state is `shared.domain.runs.fold_run` of it.
# The orchestrator that holds the run's lease appends at the stream's version (fencing).


class RunStarted(Event, frozen=True):
    """A run of an agent in a session, with the definition it pinned (so a takeover needs
    nothing else) and the caller it runs for."""

    run_id: str
    session_id: str
    tenant: str
    agent: str
    agent_version: int
    input: str
    model: str
    system_prompt: str = ""
    tools: tuple[str, ...] = ()
    approval: tuple[str, ...] = ()  # tools that need a human yes before each call
    max_steps: int = 10
    max_cost_micro_usd: int | None = None
    temperature: float | None = None
    key_id: str = ""
    role: str = "member"
    owner: str = ""  # the orchestrator process that took the first lease
    # the agent selector's choice when the run named no agent (SKILLS section below)
    selection: AgentSelection | None = None


class RunResumed(Event, frozen=True):
    """Another orchestrator process (or the restarted one) took the run over: its lease
    `epoch`; appended at the stream's version, so the previous owner's next append fails."""

    run_id: str
    owner: str
    epoch: int


class RunStepStarted(Event, frozen=True):
    run_id: str
    step: int


class RunLLMCallLinked(Event, frozen=True):
    """The step's LLM call is about to be sent (`llmcall-{call_id}`); an attempt without
    its `RunModelAnswered` was interrupted and is sent again under a new call id."""

    run_id: str
    step: int
    call_id: str


class RunModelAnswered(Event, frozen=True):
    """The model's answer of a step: its text and the tool calls it asked for."""

    run_id: str
    step: int
    call_id: str
    content: str = ""
    tool_calls: tuple[dict[str, object], ...] = ()  # OpenAI shape: id, type, function{name, arguments}
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micro_usd: int = 0
    model: str | None = None


class RunToolCallStarted(Event, frozen=True):
    """One attempt at a tool call the model asked for (`toolcall-{tool_call_id}`)."""

    run_id: str
    step: int
    index: int  # the position of the call in the model's answer
    model_call_id: str  # the model's id for it (the tool message answers it)
    tool_call_id: str
    tool: str
    effect: str = "side_effecting"
    attempt: int = 1


class RunToolResult(Event, frozen=True):
    """A tool call's result as the model will read it (errors too: they are fed back)."""

    run_id: str
    step: int
    index: int
    model_call_id: str
    tool_call_id: str | None
    tool: str
    content: str
    is_error: bool = False
    status: str = "finished"  # finished, failed, rejected, denied, outcome_unknown


class RunToolOutcomeUnknown(Event, frozen=True):
    """A side-effecting tool call was interrupted: it may or may not have run. It is
    not retried without a human's approval."""

    run_id: str
    step: int
    index: int
    tool_call_id: str
    tool: str


class RunAwaitingApproval(Event, frozen=True):
    """The run waits for a human (`POST /v1/runs/{id}/approvals`); nothing runs meanwhile."""

    run_id: str
    step: int
    index: int
    tool_call_id: str  # the id the approval names (the attempt it would run)
    tool: str
    arguments: dict[str, object] = {}
    reason: str = "needs_approval"  # or "outcome_unknown": approve = run it again
    expires_at: float = 0.0  # unix time; unanswered by then, the run fails


class RunApprovalGiven(Event, frozen=True):
    run_id: str
    tool_call_id: str
    approved: bool
    reason: str = ""
    by: str = ""


class RunFinished(Event, frozen=True):
    run_id: str
    answer: str
    steps: int
    cost_micro_usd: int


class RunFailed(Event, frozen=True):
    """The run stopped without an answer: `reason` max_steps, budget, policy,
    approval_expired, llm_error, tool_error, ..."""

    run_id: str
    reason: str
    detail: str = ""
    steps: int = 0
    cost_micro_usd: int = 0


class RunCancelled(Event, frozen=True):
    run_id: str
    reason: str = ""
    by: str = ""


# -- agent definitions (issue 12: AGENTS) -------------------------------------------------
# An agent's definitions are the stream `agent-<tenant>:<name>` (the name never holds a
# ':', so no two tenants' streams can meet), versioned by stream version; the system
# agents shipped in `agents/` are the tenant `@system` (no tenant can be named so).


class AgentDefined(Event, frozen=True):
    """A version of an agent: its markdown source as given and the parsed definition
    (`shared.domain.agents.AgentDefinition` as JSON, without version/source)."""

    tenant: str  # or SYSTEM_AGENTS for the agents shipped in `agents/`
    name: str
    markdown: str
    definition: dict[str, object]
    sha256: str = ""  # of the markdown: a system agent is redefined only when it changed


# -- model distribution (issue 14): streams modeltask-{task_id}, nodemodels-{node_id} --------


class ModelDownloadRequested(Event, frozen=True):
    """A model is to be put on a node (`reason`: manual, distribute, placement)."""

    task_id: str
    node_id: str
    model: str
    sha256: str
    size_bytes: int
    reason: str = "manual"
    source: str = "store"  # store | ollama
    actor: str = ""


class ModelDownloadStarted(Event, frozen=True):
    """The node took a slot and bytes move (again, after a resume: `attempt` > 1)."""

    task_id: str
    node_id: str
    attempt: int = 1
    resumed_from: int = 0  # bytes already on the node's disk


class ModelDownloadCompleted(Event, frozen=True):
    task_id: str
    node_id: str
    bytes_total: int
    fetched_bytes: int = 0  # read from the store by the last attempt
    reconciled: bool = False  # learned from the node's inventory, not its message


class ModelDownloadFailed(Event, frozen=True):
    """`reason`: `node offline` (resumable), `stalled`, `digest mismatch`, `not found`,
    `error`; `detail` says more."""

    task_id: str
    node_id: str
    reason: str
    detail: str = ""
    bytes_done: int = 0


class ModelDownloadResumed(Event, frozen=True):
    """A task failed as `node offline` goes back to pending when the node returns."""

    task_id: str
    node_id: str


class ModelDownloadCancelled(Event, frozen=True):
    task_id: str
    node_id: str
    actor: str = ""


class ModelInstalled(Event, frozen=True):
    node_id: str
    model: str
    sha256: str
    size_bytes: int
    task_id: str = ""


class ModelRemoved(Event, frozen=True):
    node_id: str
    model: str
    actor: str = ""


# -- skills and adaptive model routing (issue 13: SKILLS) ----------------------------------
# Skill definitions are the stream `skill-<tenant>:<name>` (versioned by stream version;
# the skills shipped in `skills/` are files, never events). A routed call's decision
# (`ModelRouted`) and its feedback (`CallFeedback`) go to the call's `llmcall-{id}`; a
# tenant's routing clusters to `routing-<tenant>`. The learned statistics are the
# `routing_stats` projection (`shared.domain.adaptive_routing.fold_arm`).


class SkillDefined(Event, frozen=True):
    """A version of a tenant's skill (`shared.domain.skills.SkillSpec` as JSON)."""

    tenant: str
    name: str
    spec: dict[str, object]


class RoutingCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """One model the router weighed: its learned quality (posterior mean, the sample
    drawn, the observations behind it), its expected cost, its score; or why it was
    excluded (`excluded`: the policy's rule, `not_served`)."""

    model: str
    quality: float = 0.0
    quality_sample: float = 0.0
    quality_n: float = 0.0
    cost_micro_usd: float = 0.0
    cost_n: int = 0
    score: float = 0.0
    excluded: str | None = None


class AgentCandidate(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    skill: str  # the agent's skill nearest the task
    similarity: float


class AgentSelection(msgspec.Struct, frozen=True, kw_only=True):
    """Why a run that named no agent (or `auto`) runs this one (`RunStarted.selection`):
    the agent whose skills fit the task best, with its confidence (softmax share) and
    every agent weighed."""

    requested: str  # "auto", or "" (omitted)
    agent: str
    skill: str
    confidence: float
    embedder: str
    candidates: tuple[AgentCandidate, ...] = ()


class ModelRouted(Event, frozen=True):
    """The router's decision for a call asked of `auto` or `skill:<name>`."""

    call_id: str
    session_id: str
    requested: str  # "auto" or "skill:<name>"
    skill: str
    skill_version: int = 0  # 0: a system skill (a file)
    matched_by: str = "explicit"  # explicit, auto, default
    confidence: float = 1.0
    cluster: str = ""
    embedder: str = ""
    cost_weight: float = 0.0
    performance_weight: float = 1.0
    candidates: tuple[RoutingCandidate, ...] = ()
    pick: str = ""
    fallback: tuple[str, ...] = ()  # the models planned after the pick, in order
    reason: str = ""
    exploration: bool = False  # the sampled pick differs from the best by posterior means


class RoutingClusterCreated(Event, frozen=True):
    """A new task cluster of a tenant: a request nearer to no centroid than the threshold
    became one (leader clustering; centroids never move, so replays are exact)."""

    tenant: str
    cluster: str
    centroid: tuple[float, ...]


class CallFeedback(Event, frozen=True):
    """A quality score of a call's answer, 0..1 (from `POST /v1/calls/{id}/feedback` or
    an evaluation run)."""

    call_id: str
    score: float
    source: str = "api"  # api, eval
    comment: str = ""


class CallPlanned(Event, frozen=True):
    """Where an admitted call was planned: the targets in order and, per node-served
    model, the nodes picked by the strategy with each candidate's load at that moment.
    Recorded only for a call that got no answer (an answered call's `LLMCallStarted`
    carries its plan: no extra append on the hot path)."""

    call_id: str
    targets: tuple[str, ...] = ()
    nodes: dict[str, tuple[str, ...]] = {}
    strategy: str = ""
    loads: tuple[dict[str, object], ...] = ()

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
    BudgetLeased,
    BudgetLeaseReturned,
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
    RunStarted,
    RunResumed,
    RunStepStarted,
    RunLLMCallLinked,
    RunModelAnswered,
    RunToolCallStarted,
    RunToolResult,
    RunToolOutcomeUnknown,
    RunAwaitingApproval,
    RunApprovalGiven,
    RunFinished,
    RunFailed,
    RunCancelled,
    AgentDefined,
    ModelDownloadRequested,
    ModelDownloadStarted,
    ModelDownloadCompleted,
    ModelDownloadFailed,
    ModelDownloadResumed,
    ModelDownloadCancelled,
    ModelInstalled,
    ModelRemoved,
    SkillDefined,
    ModelRouted,
    RoutingClusterCreated,
    CallFeedback,
    CallPlanned,
    McpServerRemoved,
    WorkspaceDeleted,
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


def workspace_stream(session_id: str) -> str:
    return f"workspace-{session_id}"


def run_stream(run_id: str) -> str:
    return f"run-{run_id}"


SYSTEM_AGENTS = "@system"  # the tenant of the agents shipped in `agents/`


def agent_stream(tenant: str, name: str) -> str:
    return f"agent-{tenant}:{name}"


def modeltask_stream(task_id: str) -> str:
    return f"modeltask-{task_id}"


def nodemodels_stream(node_id: str) -> str:
    return f"nodemodels-{node_id}"


def skill_stream(tenant: str, name: str) -> str:
    return f"skill-{tenant}:{name}"


def routing_stream(tenant: str) -> str:
    return f"routing-{tenant}"


def new_id() -> str:
    """A random (version 4) UUID as text: what `str(uuid.uuid4())` gives, in 0.9 us
    instead of 2.1 (a call takes about ten)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
