"""The provider's configuration (`NEXUS_PROVIDERS`, TOML) is checked when it is loaded:
a mistake names its field and stops the start, instead of failing the first call."""

from __future__ import annotations

import pytest

from services.provider.config import ConfigError, parse


def providers(base_url: str, kind: str = "openai") -> str:
    return f"""
[[providers]]
name = "up"
kind = "{kind}"
base_url = "{base_url}"
[[providers.models]]
name = "m"

[[routes]]
model = "default"
targets = ["up/m"]
"""


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8080/v1", "https://api.example.com/v1",
                                      "https://user:secret@llm.internal"])
def test_an_http_or_https_base_url_is_taken(base_url: str) -> None:
    assert parse(providers(base_url)).providers[0].base_url == base_url


@pytest.mark.parametrize("base_url", ["", "api.example.com/v1", "ftp://example.com", "http:///v1"])
def test_a_base_url_an_adapter_cannot_reach_is_refused_naming_the_field(base_url: str) -> None:
    with pytest.raises(ConfigError, match=r"providers\[0\]\.base_url"):
        parse(providers(base_url))


def test_a_node_target_needs_no_base_url() -> None:
    assert parse(providers("", kind="node")).providers[0].kind == "node"


def test_duplicate_names_and_unknown_targets_are_refused() -> None:
    twice = providers("http://a") + providers("http://b").split("[[routes]]")[0]
    with pytest.raises(ConfigError, match="duplicate names"):
        parse(twice)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.targets\[0\]: unknown target"):
        parse(providers("http://a").replace('targets = ["up/m"]', 'targets = ["up/x"]'))
