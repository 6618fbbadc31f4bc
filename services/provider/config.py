"""Provider configuration: one TOML document, declared once, overridable by env.

    [[providers]]
    name = "openai"
    kind = "openai"                 # openai | anthropic | ollama
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"  # the NAME of the variable; the key never enters config
    max_concurrency = 16            # in flight to this upstream
    max_queue = 64                  # waiting for a slot; beyond it: 429
    timeout_s = 60                  # a streamed answer: the longest wait between two reads
    answer_timeout_s = 600          # a whole answer (a non-streaming client): the longest wait
    [[providers.models]]
    name = "gpt-4o-mini"
    input_usd_per_mtok = 0.15
    output_usd_per_mtok = 0.60
    context = 128000

    [[routes]]
    model = "default"               # the name clients ask for
    targets = ["local/gemma-3-270m", "openai/gpt-4o-mini"]   # fallback order

Every provider model is also reachable directly as "provider/model". Source: the
settings `NEXUS_PROVIDERS` (the TOML text) or `NEXUS_PROVIDERS_FILE` (a path); `retry`
settings likewise. Validation names the offending field.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from shared.infra.settings import Settings, env_secret
from shared.infra.upstreams import UpstreamConfig

Positive = Annotated[float, msgspec.Meta(gt=0)]
Price = Annotated[float, msgspec.Meta(ge=0)]


class ModelPrice(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    input_usd_per_mtok: Price = 0.0
    output_usd_per_mtok: Price = 0.0
    context: Annotated[int, msgspec.Meta(gt=0)] = 8192


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    kind: Literal["openai", "anthropic", "ollama", "node"]
    base_url: str = ""  # not used by kind "node": the orchestrator picks the node
    api_key_env: str | None = None
    hosted: bool = True  # redaction applies before text leaves for a hosted provider
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 16
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 64
    timeout_s: Positive = 60.0
    answer_timeout_s: Positive = 600.0
    connect_timeout_s: Positive = 5.0
    models: tuple[ModelPrice, ...] = ()

    def upstream(self) -> UpstreamConfig:
        """What the adapter of this provider's wire protocol needs (not kind "node")."""
        assert self.kind != "node", "a node target is reached over NATS, not HTTP"
        return UpstreamConfig(name=self.name, kind=self.kind, base_url=self.base_url,
                              api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                              answer_timeout_s=self.answer_timeout_s,
                              connect_timeout_s=self.connect_timeout_s,
                              max_connections=self.max_concurrency * 2)

    def api_key(self) -> str | None:
        return env_secret(self.api_key_env) if self.api_key_env else None

    def __repr__(self) -> str:  # nothing secret lives here, but keep dumps short
        return f"ProviderConfig(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r})"


class Route(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: str
    targets: tuple[str, ...]


class RetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3  # per target
    base_delay_s: Positive = 0.2
    max_delay_s: Positive = 5.0
    first_token_timeout_s: Positive = 30.0


class ProvidersConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    providers: tuple[ProviderConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    retry: RetryConfig = RetryConfig()

    def provider(self, name: str) -> ProviderConfig:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)


class ConfigError(ValueError):
    pass


def validate(config: ProvidersConfig) -> ProvidersConfig:
    names = [p.name for p in config.providers]
    if len(set(names)) != len(names):
        raise ConfigError(f"providers: duplicate names in {names}")
    for i, p in enumerate(config.providers):
        url = urlsplit(p.base_url)
        if p.kind != "node" and (url.scheme not in ("http", "https") or not url.hostname):
            raise ConfigError(f"providers[{i}].base_url: an http:// or https:// URL with a host")
    known = {f"{p.name}/{m.name}" for p in config.providers for m in p.models}
    for i, route in enumerate(config.routes):
        if not route.targets:
            raise ConfigError(f"routes[{i}].targets: empty")
        for j, target in enumerate(route.targets):
            if target not in known:
                raise ConfigError(f"routes[{i}].targets[{j}]: unknown target {target!r}")
    return config


def parse(text: str) -> ProvidersConfig:
    try:
        return validate(msgspec.toml.decode(text.encode(), type=ProvidersConfig))
    except msgspec.ValidationError as exc:
        raise ConfigError(f"provider config: {exc}") from None


def default_text(model: str) -> str:
    """Out of the box: the model the node daemons serve (their own llama-server)."""
    return f"""
[[providers]]
name = "node"
kind = "node"
hosted = false
max_concurrency = 8
timeout_s = 300
[[providers.models]]
name = "{model}"
context = 4096

[[routes]]
model = "default"
targets = ["node/{model}"]
"""


def load(settings: Settings) -> ProvidersConfig:
    """`NEXUS_PROVIDERS` (TOML text), else `NEXUS_PROVIDERS_FILE`, else the default."""
    if settings.providers:
        return parse(settings.providers)
    if settings.providers_file:
        return parse(settings.providers_file.read_text())
    return parse(default_text(settings.local_model))
