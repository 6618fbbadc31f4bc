"""Settings, declared once and read from the environment.

Every knob Nexus has is a field here with its environment variable and a docstring;
README.md's configuration table is generated from the same names. Services call
`get_settings()` (cached) and never read `os.environ` themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from exc


def _parse_labels(raw: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"NEXUS_NODE_LABELS item {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


@dataclass(frozen=True)
class Settings:
    nats_url: str | None = None
    """NATS_URL: an external NATS server (with JetStream). Unset: `nexus up` starts one."""

    database_url: str | None = None
    """DATABASE_URL: an external Postgres. Unset: `nexus up` starts an embedded one."""

    data_dir: Path = Path(".nexus")
    """NEXUS_DATA_DIR: where embedded NATS/Postgres keep their data and logs."""

    nats_port: int = 4222
    """NEXUS_NATS_PORT: port of the embedded NATS server."""

    nats_monitor_port: int = 8222
    """NEXUS_NATS_MONITOR_PORT: HTTP monitoring port of the embedded NATS server."""

    pg_port: int = 55432
    """NEXUS_PG_PORT: port of the embedded Postgres (not 5432, to leave a system one alone)."""

    http_host: str = "127.0.0.1"
    """NEXUS_HTTP_HOST: interface the orchestrator's HTTP API binds to."""

    http_port: int = 8080
    """NEXUS_HTTP_PORT: port of the orchestrator's HTTP API."""

    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """NEXUS_INSTANCE_ID: this process's id in traces, logs and pongs."""

    log_level: str = "INFO"
    """NEXUS_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""

    request_timeout_s: float = 5.0
    """NEXUS_REQUEST_TIMEOUT_S: default timeout of NATS request/reply calls."""

    projection_poll_s: float = 1.0
    """NEXUS_PROJECTION_POLL_S: safety-net poll of projection runners (LISTEN/NOTIFY wakes them first)."""

    projection_batch_size: int = 500
    """NEXUS_PROJECTION_BATCH_SIZE: events a projection applies per transaction."""

    max_body_bytes: int = 1_048_576
    """NEXUS_MAX_BODY_BYTES: largest HTTP request body accepted (413 above it)."""

    db_pool_size: int = 10
    """NEXUS_DB_POOL_SIZE: asyncpg pool size per process."""

    reservation_ttl_s: float = 600.0
    """NEXUS_RESERVATION_TTL_S: a budget reservation whose call never settles is released after this."""

    budget_sweep_s: float = 5.0
    """NEXUS_BUDGET_SWEEP_S: how often the orchestrator looks for expired reservations."""

    budget_cache_size: int = 10_000
    """NEXUS_BUDGET_CACHE_SIZE: budget states an orchestrator keeps in memory (least recently used out; reloaded from the events)."""

    idempotency_wait_s: float = 10.0
    """NEXUS_IDEMPOTENCY_WAIT_S: how long a retry waits for the first request with its Idempotency-Key to finish, then a 409 with Retry-After."""

    admin_key: str | None = None
    """NEXUS_ADMIN_KEY: the bootstrap platform-admin API key (`nexus up` generates one if unset)."""

    api_key: str | None = None
    """NEXUS_API_KEY: the key `nexus` CLI commands send to the API (default: the admin key)."""

    nats_user: str | None = None
    """NEXUS_NATS_USER: NATS user of this process (unset: connect without credentials)."""

    nats_password: str | None = None
    """NEXUS_NATS_PASSWORD: its password (never logged)."""

    node_data_dir: Path | None = None
    """NEXUS_NODE_DATA_DIR: where a node keeps its stable id (default `<NEXUS_DATA_DIR>/node`)."""

    node_labels: dict[str, str] = field(default_factory=dict)
    """NEXUS_NODE_LABELS: labels of this node, `key=value,key=value`."""

    heartbeat_interval_s: float = 2.0
    """NEXUS_HEARTBEAT_INTERVAL_S: how often a node reports its load."""

    node_offline_after_s: float = 6.0
    """NEXUS_NODE_OFFLINE_AFTER_S: silence after which the orchestrator marks a node offline."""

    node_drain_timeout_s: float = 10.0
    """NEXUS_NODE_DRAIN_TIMEOUT_S: how long a stopping node waits for in-flight work."""

    cache_dir: Path = Path.home() / ".cache" / "nexus"
    """NEXUS_CACHE_DIR: where the built llama-server and the model are kept (per machine)."""

    runtime_url: str | None = None
    """NEXUS_RUNTIME_URL: the OpenAI-compatible runtime a node fronts (e.g. http://host:8080/v1)."""

    runtime: str = "llama"
    """NEXUS_RUNTIME: with no NEXUS_RUNTIME_URL, `llama` (start llama-server) or `none`."""

    runtime_model: str | None = None
    """NEXUS_RUNTIME_MODEL: the model name the runtime serves (default: what it reports)."""

    local_model: str = "smollm2-135m-instruct"
    """NEXUS_LOCAL_MODEL: the bundled model a node's own llama-server serves: `smollm2-135m-instruct` (default) or `gemma-3-270m` (a base model)."""

    llama_server_bin: Path | None = None
    """NEXUS_LLAMA_SERVER_BIN: the llama-server binary a node starts (unset: the one built once per machine)."""

    runtime_max_restarts: int = 5
    """NEXUS_RUNTIME_MAX_RESTARTS: restarts of a crashing llama-server before the node reports it failed and stops."""

    runtime_restart_backoff_s: float = 1.0
    """NEXUS_RUNTIME_RESTART_BACKOFF_S: delay before the first restart; it doubles each time, up to 30s."""

    node_max_concurrency: int = 4
    """NEXUS_NODE_MAX_CONCURRENCY: inference requests a node runs at once."""

    node_max_queue: int = 32
    """NEXUS_NODE_MAX_QUEUE: requests a node lets wait beyond that; then it answers busy (429)."""

    node_selection: str = "least_loaded"
    """NEXUS_NODE_SELECTION: round_robin, least_loaded or power_of_two."""

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            nats_url=_env("NATS_URL"),
            database_url=_env("DATABASE_URL"),
            data_dir=Path(_env("NEXUS_DATA_DIR", ".nexus")),
            nats_port=_env_int("NEXUS_NATS_PORT", 4222),
            nats_monitor_port=_env_int("NEXUS_NATS_MONITOR_PORT", 8222),
            pg_port=_env_int("NEXUS_PG_PORT", 55432),
            http_host=_env("NEXUS_HTTP_HOST", "127.0.0.1"),
            http_port=_env_int("NEXUS_HTTP_PORT", 8080),
            instance_id=_env("NEXUS_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}",
            log_level=(_env("NEXUS_LOG_LEVEL", "INFO") or "INFO").upper(),
            request_timeout_s=_env_float("NEXUS_REQUEST_TIMEOUT_S", 5.0),
            projection_poll_s=_env_float("NEXUS_PROJECTION_POLL_S", 1.0),
            projection_batch_size=_env_int("NEXUS_PROJECTION_BATCH_SIZE", 500),
            max_body_bytes=_env_int("NEXUS_MAX_BODY_BYTES", 1_048_576),
            db_pool_size=_env_int("NEXUS_DB_POOL_SIZE", 10),
            reservation_ttl_s=_env_float("NEXUS_RESERVATION_TTL_S", 600.0),
            budget_sweep_s=_env_float("NEXUS_BUDGET_SWEEP_S", 5.0),
            budget_cache_size=_env_int("NEXUS_BUDGET_CACHE_SIZE", 10_000),
            idempotency_wait_s=_env_float("NEXUS_IDEMPOTENCY_WAIT_S", 10.0),
            admin_key=_env("NEXUS_ADMIN_KEY"),
            api_key=_env("NEXUS_API_KEY"),
            nats_user=_env("NEXUS_NATS_USER"),
            nats_password=_env("NEXUS_NATS_PASSWORD"),
            node_data_dir=Path(d) if (d := _env("NEXUS_NODE_DATA_DIR")) else None,
            node_labels=_parse_labels(_env("NEXUS_NODE_LABELS", "") or ""),
            heartbeat_interval_s=_env_float("NEXUS_HEARTBEAT_INTERVAL_S", 2.0),
            node_offline_after_s=_env_float("NEXUS_NODE_OFFLINE_AFTER_S", 6.0),
            node_drain_timeout_s=_env_float("NEXUS_NODE_DRAIN_TIMEOUT_S", 10.0),
            cache_dir=Path(_env("NEXUS_CACHE_DIR") or Path.home() / ".cache" / "nexus"),
            runtime_url=_env("NEXUS_RUNTIME_URL"),
            runtime=_env("NEXUS_RUNTIME", "llama") or "llama",
            runtime_model=_env("NEXUS_RUNTIME_MODEL"),
            local_model=_env("NEXUS_LOCAL_MODEL", "smollm2-135m-instruct") or "smollm2-135m-instruct",
            llama_server_bin=Path(b) if (b := _env("NEXUS_LLAMA_SERVER_BIN")) else None,
            runtime_max_restarts=_env_int("NEXUS_RUNTIME_MAX_RESTARTS", 5),
            runtime_restart_backoff_s=_env_float("NEXUS_RUNTIME_RESTART_BACKOFF_S", 1.0),
            node_max_concurrency=_env_int("NEXUS_NODE_MAX_CONCURRENCY", 4),
            node_max_queue=_env_int("NEXUS_NODE_MAX_QUEUE", 32),
            node_selection=_env("NEXUS_NODE_SELECTION", "least_loaded") or "least_loaded",
        )

    @property
    def node_dir(self) -> Path:
        return self.node_data_dir or self.data_dir / "node"

    def __repr__(self) -> str:  # never print secrets
        hidden = {"admin_key", "api_key", "nats_password"}
        fields = ", ".join(
            f"{f.name}={'***' if f.name in hidden and getattr(self, f.name) else getattr(self, f.name)!r}"
            if f.name != "database_url" or not self.database_url
            else f"database_url={redact_url(self.database_url)!r}"
            for f in dataclasses.fields(self)
        )
        return f"Settings({fields})"

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)



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
