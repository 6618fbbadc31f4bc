"""NATS message bodies (requests, replies, notifications), declared once.

Each subject in `shared.contracts.subjects` carries exactly one of these types. Like events
they are msgspec Structs; unlike events they are not stored, so they may change
between versions as long as old senders stay decodable (add fields with defaults).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Pct = Annotated[float, msgspec.Meta(ge=0, le=100)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Bytes = Annotated[int, msgspec.Meta(ge=0)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class Ping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sender: str


class Pong(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    instance_id: str
    version: str
    uptime_s: float


# -- nodes --------------------------------------------------------------------------


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    index: Count
    name: str
    uuid: str
    memory_total_bytes: Bytes


RuntimeState = Literal["starting", "ready", "crashed", "failed", "unreachable"]


class RuntimeInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The inference runtime a node fronts (`kind="none"` until one is configured).

    `state` (None from nodes older than it): `starting` (being built or started),
    `ready`, `crashed` (exited; restarted after a backoff), `failed` (gave up: too many
    restarts, or it could not be built), `unreachable` (a configured `NEXUS_RUNTIME_URL`
    does not answer). `reason` says why in words, e.g. "crashed: signal SIGILL (illegal
    instruction), 3 restarts"; `exit_code` / `exit_signal` are those of its last exit.
    """

    kind: str = "none"
    version: str | None = None
    base_url: str | None = None
    models: tuple[str, ...] = ()
    ready: bool = False
    state: RuntimeState | None = None
    reason: str = ""
    restarts: Count = 0
    exit_code: int | None = None
    exit_signal: str | None = None  # e.g. "SIGILL"


class NodeRegistration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.register` request: who the node is and what it has."""

    node_id: NodeId
    hostname: str
    addresses: tuple[str, ...] = ()
    labels: dict[str, str] = {}
    cpu_count: Count
    memory_total_bytes: Bytes
    gpus: tuple[GpuInfo, ...] = ()
    runtime: RuntimeInfo = RuntimeInfo()
    agent_version: str
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class RegistrationAck(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    status: str
    heartbeat_timeout_s: float


class GpuLoad(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    index: Count
    utilization_pct: Pct
    memory_used_bytes: Bytes


class InstalledModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model installed on a node (verified SHA-256, in its models directory)."""

    name: str
    sha256: str
    size_bytes: Bytes
    loaded: bool = False  # a runtime serves it now


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.heartbeat`: live load, every `heartbeat_interval_s`."""

    node_id: NodeId
    seq: Count
    sent_at: Annotated[float, msgspec.Meta(gt=0)]  # unix seconds
    cpu_pct: Pct
    memory_pct: Pct
    gpus: tuple[GpuLoad, ...] = ()
    active_requests: Count = 0
    queue_depth: Count = 0
    avg_response_ms: Annotated[float, msgspec.Meta(ge=0)] | None = None
    draining: bool = False
    models: tuple[InstalledModel, ...] = ()  # the node's inventory (model distribution)


class NodeStatusChange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.status`: a node announces it is draining, then leaving."""

    node_id: NodeId
    status: Literal["draining", "leaving"]
    reason: str = ""


# -- LLM completions (orchestrator -> provider; frames in shared.infra.streaming) -------------


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An OpenAI-style chat message (content may be text or a list of parts)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        """The message's text (the text parts of multi-part content, joined)."""
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return ""


def messages_text(messages: tuple[ChatMessage, ...]) -> str:
    """All text of a conversation, one message per line."""
    return "\n".join(m.text for m in messages)


class PlannedTarget(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One step of a call's plan (`shared.domain.routing.plan_call`): a target the
    session's policy allows, what to redact before text leaves for it and, for a
    node-served target, the nodes to try, best first."""

    name: str  # "provider/model"
    redact: tuple[str, ...] = ()  # kinds to redact before text leaves for it
    provider: str = ""
    model: str = ""
    hosted: bool = True
    nodes: tuple[str, ...] = ()  # node-served: the nodes chosen by the orchestrator


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.provider.complete`: one LLM call; the reply is a frame stream.

    `targets`: the plan (`shared.domain.routing`): the only targets that may be tried,
    in order, each with its redaction and nodes (the policy evaluated every target of
    the route; denied ones are not listed). The provider executes it (attempts,
    retries, fallback along it) and decides no route of its own. Empty (an older
    sender): the route's whole chain, `redact` applying to its hosted targets.
    `nodes`: the plan's nodes by runtime model, for the node adapter.
    """

    call_id: str
    session_id: str
    tenant: str
    model: str  # what the client asked for: a route name or "provider/model"
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    redact: tuple[str, ...] = ()  # kinds to redact before text leaves for a hosted provider
    nodes: dict[str, tuple[str, ...]] = {}  # runtime model -> the plan's nodes, best first
    targets: tuple[PlannedTarget, ...] = ()  # the plan: the targets to try, in order; empty: all
    # for the record (`LLMCallStarted`, what explain shows): the node strategy, and the
    # load of each planned node as the orchestrator's selector saw it
    plan_strategy: str = ""
    plan_loads: tuple[dict[str, Any], ...] = ()
    # the requester records the answer: the provider puts the events it would append for
    # a completed call (`LLMCallStarted` if still held, `LLMCallCompleted`) on the `Done`
    # frame (`Done.record`) and the requester appends them in the transaction that
    # settles the call, before its client sees the end (one append per call instead of
    # two; issue 16). Failures and attempts given up are recorded by the provider as
    # before. False (an older requester): the provider appends them itself.
    caller_records: bool = False
    # the requester takes the answer as it comes (True) or only whole (False): a provider
    # may then ask its upstream for a whole answer (one document, not a stream: less
    # work on both sides; issue 16). The frames are the same either way, but a whole
    # answer's come at its end (no first-token timeout, no time to first token).
    stream: bool = True
    # the requester takes `Frames` (the frames one turn of the sender gives, in one
    # message: a whole answer's `Started`, `Delta` and `Done`); False (an older
    # requester): each frame is a message of its own
    batch_frames: bool = False


class TargetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One target of a model's fallback chain: what a policy decides on."""

    name: str  # "provider/model"
    provider: str
    model: str
    hosted: bool = True  # text leaves for a hosted provider (redaction applies)
    on_node: bool = False  # served by a node daemon (the orchestrator chooses the nodes)


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the name clients use
    targets: tuple[str, ...]  # "provider/model", in fallback order
    target_info: tuple[TargetInfo, ...] = ()  # the same targets, in the same order, in detail
    input_usd_per_mtok: float  # the highest price along the chain (worst case)
    output_usd_per_mtok: float
    context: int
    node_models: tuple[str, ...] = ()  # models of this chain served by nodes (selection needed)


class ModelsRequest(msgspec.Struct, frozen=True, kw_only=True):
    pass


class ModelsReply(msgspec.Struct, frozen=True, kw_only=True):
    models: tuple[ModelInfo, ...]
    # installed models (model distribution): the provider that serves a model installed on
    # nodes by its own name ("" none), and the context nodes run installed models with
    node_provider: str = ""
    node_context: int = 4096


# -- tools ----------------------------------------------------------------------------


class ToolLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one tool call may use in the sandbox; exceeding one ends the call, named."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    memory_mb: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 512
    cpu_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    max_output_bytes: Annotated[int, msgspec.Meta(ge=256, le=64 * 1024 * 1024)] = 1024 * 1024
    processes: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64


class ToolExecRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Run one decided tool call on a node (`subjects.node_tool`).

    `kind` and `target` say what runs: a builtin (`target` = "python", "shell",
    "http_fetch", "files.read", ...), an HTTP tool (`http`: method, url, headers with
    secret *values* resolved by the orchestrator for this call only; never logged), or
    an MCP tool (`mcp`: transport, url or command, headers, the server's tool name).
    `network` is the allowlist ("host" or "host:port"; empty: no network at all);
    `filesystem` the session workspace's access ("none", "ro", "rw").
    """

    tool_call_id: str
    tenant: str
    session_id: str
    tool: str
    kind: Literal["builtin", "http", "mcp"]
    target: str
    arguments: dict[str, Any] = {}
    limits: ToolLimits = ToolLimits()
    network: tuple[str, ...] = ()
    filesystem: Literal["none", "ro", "rw"] = "none"
    http: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None


# -- model distribution (issue 14) --------------------------------------------------------


class ModelCommand(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.models`: `pull` a model from the store (resumes from the bytes
    already on disk; verifies `sha256` before installing), `cancel` a task, `remove` an
    installed model, or `inventory` (just answer what is installed)."""

    op: Literal["pull", "cancel", "remove", "inventory"]
    task_id: str = ""
    model: str = ""
    sha256: str = ""
    size_bytes: Bytes = 0
    source: Literal["store", "ollama"] = "store"


class ModelCommandReply(msgspec.Struct, frozen=True, kw_only=True):
    accepted: bool
    detail: str = ""
    installed: tuple[InstalledModel, ...] = ()
    running: tuple[str, ...] = ()  # task ids downloading now
    queued: tuple[str, ...] = ()   # task ids waiting for a slot


class ModelTaskUpdate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.modeltask`: a task started, completed or failed on the node."""

    node_id: NodeId
    task_id: str
    state: Literal["started", "completed", "failed"]
    model: str = ""
    bytes_done: Bytes = 0
    total_bytes: Bytes = 0
    resumed_from: Bytes = 0  # bytes already on disk when it (re)started
    fetched_bytes: Bytes = 0  # bytes read from the store by this attempt
    sha256: str = ""
    reason: str = ""
    detail: str = ""


class ModelTaskAck(msgspec.Struct, frozen=True, kw_only=True):
    known: bool
    status: str = ""


class ModelProgress(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.modelprogress`: telemetry, at least once a second while bytes move."""

    node_id: NodeId
    task_id: str
    bytes_done: Bytes
    total_bytes: Bytes
    speed_bps: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    sent_at: float = 0.0


# -- agent runs (issue 12: RUNS) --------------------------------------------------------


class RunLive(msgspec.Struct, frozen=True, kw_only=True):
    """On `subjects.run_live`: `kind` "delta" (text as generated at `step`) or "event"
    (the run's stream reached `version`: read it)."""

    run_id: str
    kind: Literal["delta", "event"]
    step: int = 0
    version: int = 0
    text: str = ""


class RunInterrupt(msgspec.Struct, frozen=True, kw_only=True):
    """On `subjects.RUN_INTERRUPT`: the run's stream ends with a `RunCancelled` now;
    whoever drives it stops what it has in flight."""

    run_id: str


# -- operator drain (issue 15: DASH-PAGES) -------------------------------------------------


class NodeDrainCommand(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`nexus.node.<id>.drain` (request/reply, orchestrator -> node): the operator asks
    the node to drain (`drain`: take no new work, finish what it has; its heartbeats
    then say `draining`) or to take work again (`drain` false)."""

    node_id: NodeId
    drain: bool
    reason: str = ""


class NodeDrainAck(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    draining: bool
    active_requests: int = 0
