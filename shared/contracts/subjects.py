"""Every NATS subject and JetStream stream Nexus uses, declared once.

Services import names from here and never spell a subject inline. Subjects are
`nexus.<area>.<...>`; per-entity subjects are built by the functions below.
docs/ARCHITECTURE.md has the subject map.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "nexus"

# Service liveness: request/reply, answered by one instance of the queue group.
PING_ORCHESTRATOR = f"{PREFIX}.orchestrator.ping"
PING_PROVIDER = f"{PREFIX}.provider.ping"
PING_NODE = f"{PREFIX}.node.ping"

# Orchestrator liveness: each orchestrator process subscribes (no queue) to its own
# `nexus.orchestrator.instance.<id>` for as long as its NATS connection lives. A request
# there answered "no responders" by the server means no process holds that id any more
# (killed, its connection gone); a request that times out means alive but busy (an event
# loop stall is not death). Survivors release a lost instance's budget reservations.
ORCHESTRATOR_INSTANCE_PREFIX = f"{PREFIX}.orchestrator.instance"


def orchestrator_instance(instance: str) -> str:
    """The liveness subject of one orchestrator process. Characters a subject token
    cannot hold become `_`; two ids that then collide only look alive for each other
    (their reservations wait for the TTL), never dead."""
    token = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in instance)
    return f"{ORCHESTRATOR_INSTANCE_PREFIX}.{token or '_'}"


# LLM calls: the orchestrator asks a provider instance (queue group) and receives the
# answer as a frame stream on its reply inbox (shared.infra.streaming).
PROVIDER_COMPLETE = f"{PREFIX}.provider.complete"
PROVIDER_MODELS = f"{PREFIX}.provider.models"

# Queue groups (one per service kind: instances of a service share the work).
QUEUE_ORCHESTRATOR = "orchestrator"
QUEUE_PROVIDER = "provider"
QUEUE_NODE = "node"

# Nodes. A node publishes only under its own prefix `nexus.node.<node_id>.` (its NATS
# credentials allow nothing else); the orchestrator listens on the wildcards.
NODE_PREFIX = f"{PREFIX}.node"
NODE_REGISTER_ALL = f"{NODE_PREFIX}.*.register"    # request/reply -> orchestrator (queue)
NODE_HEARTBEAT_ALL = f"{NODE_PREFIX}.*.heartbeat"  # publish, kept on NEXUS_HEARTBEATS
NODE_STATUS_ALL = f"{NODE_PREFIX}.*.status"        # publish: draining / leaving


def node_register(node_id: str) -> str:
    return f"{NODE_PREFIX}.{node_id}.register"


def node_heartbeat(node_id: str) -> str:
    return f"{NODE_PREFIX}.{node_id}.heartbeat"


def node_status(node_id: str) -> str:
    return f"{NODE_PREFIX}.{node_id}.status"


def node_drain(node_id: str) -> str:
    """The operator's drain / resume of one node: a `NodeDrainCommand`, a `NodeDrainAck`
    reply (issue 15: DASH-PAGES)."""
    return f"{NODE_PREFIX}.{node_id}.drain"


def node_infer(node_id: str) -> str:
    """Inference on one node: a `CompletionRequest` with a frame-stream reply."""
    return f"{NODE_PREFIX}.{node_id}.infer"


def node_tool(node_id: str) -> str:
    """A tool call on one node: a `ToolExecRequest` with a frame-stream reply
    (`Started`, `Keepalive` while it runs, then `ToolDone` or `Failed`)."""
    return f"{NODE_PREFIX}.{node_id}.tool"


# -- model distribution (issue 14) --
NODE_MODEL_TASK_ALL = f"{NODE_PREFIX}.*.modeltask"          # node -> orchestrator (queue)
NODE_MODEL_PROGRESS_ALL = f"{NODE_PREFIX}.*.modelprogress"  # telemetry -> every orchestrator


def node_models(node_id: str) -> str:
    """Orchestrator -> node: a `ModelCommand` (pull, cancel, remove, inventory) ->
    `ModelCommandReply`."""
    return f"{NODE_PREFIX}.{node_id}.models"


def node_model_task(node_id: str) -> str:
    """Node -> orchestrator: a download task changed (`ModelTaskUpdate` -> `ModelTaskAck`);
    the node repeats it until answered."""
    return f"{NODE_PREFIX}.{node_id}.modeltask"


def node_model_progress(node_id: str) -> str:
    """Node -> every orchestrator: `ModelProgress` telemetry while bytes move (core NATS,
    never stored)."""
    return f"{NODE_PREFIX}.{node_id}.modelprogress"


def node_id_from_subject(subject: str) -> str:
    """`nexus.node.<id>.<verb>` -> `<id>` (the id the sender's credentials vouch for)."""
    parts = subject.split(".")
    if len(parts) != 4 or f"{parts[0]}.{parts[1]}" != NODE_PREFIX:
        raise ValueError(f"not a node subject: {subject!r}")
    return parts[2]


# Messages that could not be decoded are republished here with the reason.
DEADLETTER_PREFIX = f"{PREFIX}.deadletter"


def deadletter(subject: str) -> str:
    return f"{DEADLETTER_PREFIX}.{subject}"


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream; created or updated idempotently at service start."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    max_msgs: int = -1
    max_bytes: int = -1
    max_msgs_per_subject: int = -1
    description: str = ""


DEADLETTER_STREAM = StreamSpec(
    name="NEXUS_DEADLETTER",
    subjects=(f"{DEADLETTER_PREFIX}.>",),
    max_age_s=7 * 24 * 3600,
    max_msgs=100_000,
    max_bytes=256 * 1024 * 1024,
    description="Undecodable NATS messages, kept a week for inspection",
)

HEARTBEATS_STREAM = StreamSpec(
    name="NEXUS_HEARTBEATS",
    subjects=(NODE_HEARTBEAT_ALL,),
    max_age_s=10 * 60,
    max_msgs_per_subject=150,  # 5 minutes of history per node at the default 2 s
    max_bytes=1024 * 1024 * 1024,
    description="Node heartbeats: bounded telemetry (10 min, 150 per node), never in Postgres",
)

STREAMS: tuple[StreamSpec, ...] = (DEADLETTER_STREAM, HEARTBEATS_STREAM)


# -- object stores ----------------------------------------------------------------------
# JetStream Object Store buckets (each is the stream `OBJ_<bucket>`, subjects
# `$O.<bucket>.C.>` for chunks and `$O.<bucket>.M.>` for metadata), created or updated
# idempotently at service start like the streams above; a node creates one only if it
# is missing (its credentials may use, not manage, them: shared.infra.nats_auth).


@dataclass(frozen=True)
class ObjectStoreSpec:
    """A JetStream Object Store bucket. Full buckets refuse new objects (DiscardNew)."""

    bucket: str
    max_bytes: int = -1
    ttl_s: float | None = None  # objects older than this are removed; None: kept
    description: str = ""

    @property
    def stream(self) -> str:
        return f"OBJ_{self.bucket}"


# Session workspaces (shared.infra.workspace): each session's files as content-addressed
# blobs `<tenant>/<session_id>/blobs/<sha256>` plus one manifest object
# `<tenant>/<session_id>/manifest` (path -> blob), so a sync out commits atomically.
WORKSPACE_BUCKET = ObjectStoreSpec(
    bucket="NEXUS_WORKSPACES",
    max_bytes=2 * 1024 * 1024 * 1024,
    description="Session workspaces: files tool calls read and write, per tenant and session",
)

# Whole outputs of tool calls above their max_output_bytes (`ToolDone.output_ref`).
TOOL_OUTPUT_BUCKET = ObjectStoreSpec(
    bucket="NEXUS_TOOL_OUTPUTS",
    max_bytes=512 * 1024 * 1024,
    ttl_s=7 * 24 * 3600,
    description="Whole outputs of tool calls above their cap, kept a week",
)

# -- model distribution (issue 14) --
# The fleet's model store: one object per model (its name), chunks checked by digest;
# the GGUF's SHA-256 and header metadata in the object's description
# (shared.infra.model_store). Nodes may only read it (shared.infra.nats_auth).
MODEL_BUCKET = ObjectStoreSpec(
    bucket="NEXUS_MODELS",
    description="The fleet's model store: GGUF files with their SHA-256 and header metadata",
)

OBJECT_STORES: tuple[ObjectStoreSpec, ...] = (WORKSPACE_BUCKET, TOOL_OUTPUT_BUCKET, MODEL_BUCKET)
# Buckets a node may read but never write (nats_auth grants read rights only).
NODE_READ_ONLY_STORES: tuple[ObjectStoreSpec, ...] = (MODEL_BUCKET,)



def tool_output_ref(tenant: str, session_id: str, tool_call_id: str) -> str:
    """`ToolDone.output_ref`: `<bucket>/<object name>` of a call's whole output."""
    return f"{TOOL_OUTPUT_BUCKET.bucket}/{tenant}/{session_id}/{tool_call_id}"


def parse_output_ref(ref: str) -> tuple[str, str]:
    """`ToolDone.output_ref` -> (bucket, object name)."""
    bucket, sep, name = ref.partition("/")
    if not sep or not name or bucket != TOOL_OUTPUT_BUCKET.bucket:
        raise ValueError(f"not a tool output reference: {ref!r}")
    return bucket, name


# -- agent runs (issue 12: RUNS) --------------------------------------------------------
# Live view of a run: `RunLive` messages (tokens as generated, "an event was appended")
# published by the orchestrator driving the run, for SSE and WebSocket viewers. Core
# NATS, not kept: the durable part of a stream is read from the run's events.

RUN_LIVE_PREFIX = f"{PREFIX}.run"


def run_live(session_id: str, run_id: str) -> str:
    return f"{RUN_LIVE_PREFIX}.{session_id}.{run_id}"


def session_runs_live(session_id: str) -> str:
    return f"{RUN_LIVE_PREFIX}.{session_id}.*"


# A cancel recorded (`RunCancelled`) by any orchestrator: `RunInterrupt` broadcast to
# every orchestrator (no queue group); the one driving the run interrupts its LLM call or
# tool calls in flight at once (through the call path, so reservations are released).
RUN_INTERRUPT = f"{PREFIX}.runs.interrupt"
