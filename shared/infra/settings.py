"""Settings, declared once and read from the environment.

Every knob Nexus has is one `setting(...)` below: its environment variable, its default,
how its text is parsed, whether it is a secret, and the line README.md shows for it.
`Settings.from_env()` reads every declaration the same way, the redacting `repr` hides
every secret, and README.md's configuration table is generated from the declarations
(`nexus docs settings`; tests/test_docs.py fails with the diff when they drift).
Services call `get_settings()` (cached) and never read `os.environ` themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Setting:
    """How one field of `Settings` comes from the environment and how it is documented."""

    env: str
    doc: str
    parse: Callable[[str], Any] = str
    secret: bool = False
    shown_default: str | None = None  # README's "(default X)"; None: no default shown


def setting(env: str, default: Any = None, *, doc: str, parse: Callable[[str], Any] | None = None,
            factory: Callable[[], Any] | None = None, secret: bool = False,
            shown: str | None = None) -> Any:
    """Declare a field of `Settings`: `env` read by `from_env`, parsed with `parse` (by
    default the type of `default`: int, float, Path or str), `default` (or `factory`)
    when unset or empty. README shows `(default X)` from `shown`, or from `default` when
    it is not None."""
    if parse is None:
        parse = type(default) if isinstance(default, (int, float, Path)) else str
    if shown is None and default is not None and factory is None:
        shown = f"{default:g}" if isinstance(default, float) else str(default)
    meta = {"setting": Setting(env, doc, parse, secret, shown or None)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r}: expected one of {', '.join(allowed)}")
    return value


def parse_labels(raw: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"item {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


_KIND = {int: "an integer", float: "a number"}


@dataclass(frozen=True)
class Settings:
    nats_url: str | None = setting(
        "NATS_URL", doc="an external NATS server (with JetStream). Unset: `nexus up` starts one.")
    database_url: str | None = setting(
        "DATABASE_URL", secret=True,  # its password is redacted, the rest shown
        doc="an external Postgres. Unset: `nexus up` starts an embedded one "
            "(password in `.nexus/postgres/password`).")
    data_dir: Path = setting(
        "NEXUS_DATA_DIR", Path(".nexus"), shown="`.nexus`",
        doc="where embedded NATS/Postgres keep their data and logs.")
    nats_port: int = setting("NEXUS_NATS_PORT", 4222, doc="port of the embedded NATS server.")
    nats_monitor_port: int = setting(
        "NEXUS_NATS_MONITOR_PORT", 8222, doc="HTTP monitoring port of the embedded NATS server.")
    pg_port: int = setting(
        "NEXUS_PG_PORT", 55432, shown="55432, to leave a system one alone",
        doc="port of the embedded Postgres.")
    http_host: str = setting(
        "NEXUS_HTTP_HOST", "127.0.0.1",
        doc="interface the orchestrator's HTTP API and every service's `/metrics` bind to.")
    http_port: int = setting("NEXUS_HTTP_PORT", 8080, doc="port of the orchestrator's HTTP API.")
    metrics_port: int = setting(
        "NEXUS_METRICS_PORT", 9464,
        doc="port of a service's Prometheus `GET /metrics`, 0: none (under `nexus up` the "
            "provider's; the node's is the next port, the orchestrator's `/metrics` is on "
            "its API port).")
    instance_id: str = setting(
        "NEXUS_INSTANCE_ID", factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        shown="host-pid", doc="this process's id in traces, logs and pongs.")
    log_level: str = setting(
        "NEXUS_LOG_LEVEL", "INFO", parse=str.upper, doc="DEBUG, INFO, WARNING or ERROR.")
    request_timeout_s: float = setting(
        "NEXUS_REQUEST_TIMEOUT_S", 5.0,
        doc="default timeout of NATS request/reply calls.")
    projection_poll_s: float = setting(
        "NEXUS_PROJECTION_POLL_S", 1.0,
        doc="safety-net poll of projection runners; LISTEN/NOTIFY wakes them first.")
    projection_batch_size: int = setting(
        "NEXUS_PROJECTION_BATCH_SIZE", 500, doc="events a projection applies per transaction.")
    projection_coalesce_s: float = setting(
        "NEXUS_PROJECTION_COALESCE_S", 0.05,
        doc="after a wake-up, a projection runner takes the appends of this long into the "
            "same step (fewer, larger steps); a request waiting for its own write cuts it short.")
    max_body_bytes: int = setting(
        "NEXUS_MAX_BODY_BYTES", 1_048_576, shown="1 MiB",
        doc="largest HTTP request body accepted, 413 above it.")
    db_pool_size: int = setting("NEXUS_DB_POOL_SIZE", 10, doc="asyncpg pool size per process.")
    reservation_ttl_s: float = setting(
        "NEXUS_RESERVATION_TTL_S", 600.0,
        doc="a budget reservation whose call never settles is released after this.")
    budget_sweep_s: float = setting(
        "NEXUS_BUDGET_SWEEP_S", 5.0,
        doc="how often the orchestrator looks for expired reservations.")
    orchestrator_lost_after_s: float = setting(
        "NEXUS_ORCHESTRATOR_LOST_AFTER_S", 10.0,
        doc="an orchestrator process gone from NATS this long (its liveness subject has "
            "no subscriber; a stalled but connected process is alive) is lost: another "
            "releases its budget reservations.")
    budget_lease_calls: int = setting(
        "NEXUS_BUDGET_LEASE_CALLS", 64,
        doc="budget leases (escrow): an orchestrator takes a slice of a budget once and "
            "admits calls against it in memory, no append per admission; a slice covers up "
            "to this many calls' worst case (at most a quarter of the budget's room). 0: "
            "off, every call reserves on its budgets (and records its policy decision) "
            "before it runs.")
    budget_cache_size: int = setting(
        "NEXUS_BUDGET_CACHE_SIZE", 10_000,
        doc="budget states an orchestrator keeps in memory, least recently used out, "
            "reloaded from the events.")
    run_lease_s: float = setting(
        "NEXUS_RUN_LEASE_S", 2.0,
        doc="an agent run's lease: the orchestrator driving it renews it every quarter of "
            "this; a run whose owner died is taken over by another once it lapses.")
    run_scan_s: float = setting(
        "NEXUS_RUN_SCAN_S", 0.25,
        doc="how often each orchestrator looks for runs whose lease lapsed (or whose "
            "approval was answered) to take over.")
    run_approval_ttl_s: float = setting(
        "NEXUS_RUN_APPROVAL_TTL_S", 86400.0,
        doc="how long a run waits for a human's approval before it fails "
            "(`approval_expired`).")
    idempotency_wait_s: float = setting(
        "NEXUS_IDEMPOTENCY_WAIT_S", 10.0,
        doc="how long a retry waits for the first request with its `Idempotency-Key` to "
            "finish before a 409 with `Retry-After`.")
    admin_key: str | None = setting(
        "NEXUS_ADMIN_KEY", secret=True,
        doc="the bootstrap platform-admin API key (`nexus up` generates one if unset; only "
            "the orchestrator gets it).")
    api_key: str | None = setting(
        "NEXUS_API_KEY", secret=True,
        doc="the key `nexus` CLI commands send to the API (default: the admin key).")
    providers: str | None = setting(
        "NEXUS_PROVIDERS",
        doc="provider, model and route configuration, as TOML text (format in "
            "`services/provider/config.py`); unset: `NEXUS_PROVIDERS_FILE`.")
    providers_file: Path | None = setting(
        "NEXUS_PROVIDERS_FILE", parse=Path,
        doc="the same as a file; neither set: the model `default` routed to the nodes' "
            "local model.")
    nats_user: str | None = setting(
        "NEXUS_NATS_USER",
        doc="NATS user of this process (unset: connect without credentials; `nexus up` sets it).")
    nats_password: str | None = setting(
        "NEXUS_NATS_PASSWORD", secret=True, doc="its password (never logged).")
    node_data_dir: Path | None = setting(
        "NEXUS_NODE_DATA_DIR", parse=Path, shown="`<NEXUS_DATA_DIR>/node`",
        doc="where a node keeps its stable id.")
    node_labels: dict[str, str] = setting(
        "NEXUS_NODE_LABELS", factory=dict, parse=parse_labels,
        doc="labels of this node, `key=value,key=value`.")
    heartbeat_interval_s: float = setting(
        "NEXUS_HEARTBEAT_INTERVAL_S", 2.0, doc="how often a node reports its load.")
    node_offline_after_s: float = setting(
        "NEXUS_NODE_OFFLINE_AFTER_S", 6.0,
        doc="silence after which the orchestrator marks a node offline.")
    node_drain_timeout_s: float = setting(
        "NEXUS_NODE_DRAIN_TIMEOUT_S", 10.0,
        doc="how long a stopping node waits for in-flight work.")
    runtime_url: str | None = setting(
        "NEXUS_RUNTIME_URL",
        doc="the OpenAI-compatible runtime a node fronts (e.g. `http://host:8080/v1`); "
            "unset: see `NEXUS_RUNTIME`.")
    runtime: str = setting(
        "NEXUS_RUNTIME", "llama", shown="",
        doc="with no `NEXUS_RUNTIME_URL`: `llama` (the node starts and supervises "
            "llama-server with the bundled model, default), `installed` (only the models "
            "installed from the model store, one llama-server each; `llama` serves those "
            "too) or `none`.")
    local_model: str = setting(
        "NEXUS_LOCAL_MODEL", "smollm2-135m-instruct", shown="",
        doc="the bundled model that llama-server serves: `smollm2-135m-instruct` (default) "
            "or `gemma-3-270m` (a base model).")
    runtime_kind: str = setting(
        "NEXUS_RUNTIME_KIND", "openai", parse=lambda v: _one_of(v, ("openai", "ollama")),
        doc="what `NEXUS_RUNTIME_URL` is: `openai` (any OpenAI-compatible server) or "
            "`ollama` (its `/v1` API; models are then pulled through Ollama's own "
            "`/api/pull` and removed with `/api/delete`).")
    runtime_model: str | None = setting(
        "NEXUS_RUNTIME_MODEL",
        doc="the model name a configured runtime serves (default: what it reports).")
    llama_server_bin: Path | None = setting(
        "NEXUS_LLAMA_SERVER_BIN", parse=Path,
        doc="the llama-server binary a node starts (unset: the one built once per machine).")
    runtime_max_restarts: int = setting(
        "NEXUS_RUNTIME_MAX_RESTARTS", 5,
        doc="restarts of a crashing llama-server before the node reports it `failed` and "
            "stops restarting it.")
    runtime_restart_backoff_s: float = setting(
        "NEXUS_RUNTIME_RESTART_BACKOFF_S", 1.0,
        doc="delay before the first restart; it doubles each time, up to 30 s.")
    cache_dir: Path = setting(
        "NEXUS_CACHE_DIR", factory=lambda: Path.home() / ".cache" / "nexus", parse=Path,
        shown="`~/.cache/nexus`", doc="where the built llama-server and the model are kept.")
    node_max_concurrency: int = setting(
        "NEXUS_NODE_MAX_CONCURRENCY", 4, doc="inference requests a node runs at once.")
    node_max_queue: int = setting(
        "NEXUS_NODE_MAX_QUEUE", 32,
        doc="requests a node lets wait beyond that, then answers busy (429) and the next "
            "node is tried.")
    node_selection: str = setting(
        "NEXUS_NODE_SELECTION", "least_loaded", shown="",
        doc="`round_robin`, `least_loaded` (default) or `power_of_two`.")
    node_tool_concurrency: int = setting(
        "NEXUS_NODE_TOOL_CONCURRENCY", 4,
        doc="tool calls a node runs at once; one more is answered `overloaded` at once "
            "(never queued).")
    workspace_quota_mb: float = setting(
        "NEXUS_WORKSPACE_QUOTA_MB", 100.0,
        doc="the most a session's workspace may hold, MiB; a call that would exceed it "
            "fails (`quota`) and keeps nothing.")
    tool_output_store_mb: float = setting(
        "NEXUS_TOOL_OUTPUT_STORE_MB", 16.0,
        doc="a tool output above its call's cap is kept whole in the object store "
            "(`output_ref`) up to this size, MiB.")
    # -- model distribution (issue 14) --
    model_placement: str = setting(
        "NEXUS_MODEL_PLACEMENT", "", shown="",
        doc="placement rules: which model a node gets by the memory of its largest GPU, "
            "`GIB:model,...` plus `cpu:model` for nodes without GPUs (e.g. "
            "`16:big,8:mid,cpu:smollm2-135m-instruct`); applied on registration and "
            "hardware changes; empty: none.")
    model_context: int = setting(
        "NEXUS_MODEL_CONTEXT", 4096,
        doc="the context installed models run with (and that their fit is estimated at).")
    model_stall_s: float = setting(
        "NEXUS_MODEL_STALL_S", 30.0,
        doc="a running download with no progress for this long fails as `stalled`.")
    model_max_downloads: int = setting(
        "NEXUS_MODEL_MAX_DOWNLOADS", 10,
        doc="downloads a node runs at once; more wait in its queue (pending).")
    model_pull_rate_bps: float = setting(
        "NEXUS_MODEL_PULL_RATE_BPS", 0.0, shown="",
        doc="cap on each download's speed in bytes per second (0: none; tests throttle "
            "with it).")
    model_progress_interval_s: float = setting(
        "NEXUS_MODEL_PROGRESS_INTERVAL_S", 0.5,
        doc="how often a node reports a running download's progress.")
    fake_gpu_memory_gib: str = setting(
        "NEXUS_FAKE_GPU_MEMORY_GIB", "", shown="",
        doc="test hook: the node reports GPUs of these sizes in GiB (`24` or `24,8`; "
            "`24/20`: 20 GiB of it in use) instead of what NVML finds.")
    # -- the dashboard (issue 15) --
    grafana_url: str = setting(
        "NEXUS_GRAFANA_URL", "", shown="",
        doc="Grafana's base URL (e.g. `http://localhost:3000`): the dashboard's trace ids "
            "link to its trace view (Explore, the Tempo data source); empty: no links.")
    grafana_tempo_datasource: str = setting(
        "NEXUS_GRAFANA_TEMPO_DATASOURCE", "tempo",
        doc="the uid of Grafana's Tempo data source the trace links open.")
    ui_session_ttl_s: float = setting(
        "NEXUS_UI_SESSION_TTL_S", 43200.0,
        doc="how long a dashboard login lasts (its cookie), seconds; revoking the key ends "
            "it sooner.")
    # -- skills and adaptive routing (issue 13) --
    routing_cluster_threshold: float = setting(
        "NEXUS_ROUTING_CLUSTER_THRESHOLD", 0.82,
        doc="cosine similarity (multilingual-e5-small) at which a routed request joins its "
            "nearest task cluster; below it, it starts a new one.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Every declared setting from `environ` (default `os.environ`); unset or empty
        keeps the default. A value its parser rejects names the variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f, decl in declarations():
            raw = environ.get(decl.env)
            if raw in (None, ""):
                continue
            try:
                values[f.name] = decl.parse(raw)
            except ValueError as exc:
                what = _KIND.get(decl.parse)
                detail = f"is not {what}" if what else f"is invalid: {exc}"
                raise ValueError(f"environment variable {decl.env}={raw!r} {detail}") from None
        return cls(**values)

    @property
    def node_dir(self) -> Path:
        return self.node_data_dir or self.data_dir / "node"

    def __repr__(self) -> str:  # never print secrets
        shown = []
        for f, decl in declarations():
            value = getattr(self, f.name)
            if decl.secret and value:
                value = redact_url(value) if "://" in value else "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def declarations() -> list[tuple[dataclasses.Field, Setting]]:
    """Each field of `Settings` with its declaration, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(Settings)]


# Variables read by libraries, not by Nexus: documented with the settings.
LIBRARY_VARIABLES = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "send traces and metrics over OTLP/HTTP there (the "
                                   "OpenTelemetry SDK's own variables apply).",
    "OTEL_METRICS_EXEMPLAR_FILTER": "which measurements carry an exemplar (their trace), as "
                                    "the OpenTelemetry SDK reads it; unset, `trace_based` when "
                                    "metrics go over OTLP and none otherwise (only OTLP carries "
                                    "them).",
    "OTEL_TRACES_SAMPLER": "which traces are recorded once they are exported, as the "
                           "OpenTelemetry SDK reads it (default: every one). Without an "
                           "exporter no span is recorded at all (nothing would receive it); "
                           "trace ids still reach logs and events. Set the endpoint on every "
                           "service or on none: a service that records nothing passes its "
                           "traces on unsampled.",
}


def settings_table() -> str:
    """README.md's configuration table (markdown), generated from the declarations."""
    rows = ["| variable | meaning |", "| --- | --- |"]
    for _, decl in declarations():
        default = f" (default {decl.shown_default})" if decl.shown_default else ""
        doc = decl.doc[:-1] + default + "." if default and decl.doc.endswith(".") else decl.doc + default
        rows.append(f"| `{decl.env}` | {doc} |")
    rows += [f"| `{name}` | {doc} |" for name, doc in LIBRARY_VARIABLES.items()]
    return "\n".join(rows) + "\n"


def env_secret(name: str) -> str | None:
    """A secret whose variable's *name* is configuration (a provider's `api_key_env`):
    the one other place the environment is read."""
    return os.environ.get(name) or None


def redact_url(url: str) -> str:
    """`url` with the password of its user info replaced by `***`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@functools.cache
def get_settings() -> Settings:
    return Settings.from_env()
