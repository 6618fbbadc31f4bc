"""Installed models callable by their own name: the pure parts (the orchestrator's
model info for a model nodes serve, the provider's on-demand node target). The whole
path, a real node and a real call, is in tests/test_models.py."""

from __future__ import annotations

from services.provider.config import parse
from services.provider.router import Router
from shared.domain.routing import installed_model_info, route_of

NODE_CONFIG = """
[[providers]]
name = "fleet"
kind = "node"
hosted = false
[[providers.models]]
name = "configured"
input_usd_per_mtok = 1.0
[[routes]]
model = "default"
targets = ["fleet/configured"]
"""

HOSTED_ONLY = """
[[providers]]
name = "node"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
[[providers.models]]
name = "gpt"
"""


def test_installed_model_info_is_one_local_node_target():
    info = installed_model_info("qwen2:0.5b", "node", 4096)
    assert info.name == "qwen2:0.5b" and info.targets == ("node/qwen2:0.5b",)
    assert (info.input_usd_per_mtok, info.output_usd_per_mtok, info.context) == (0.0, 0.0, 4096)
    [target] = route_of(info)
    assert target.on_node and not target.hosted and target.model == "qwen2:0.5b"


def test_router_serves_any_model_of_its_node_provider():
    router = Router(parse(NODE_CONFIG), store=None, installed_context=2048)
    assert router.node_provider == "fleet"
    target = router.target("fleet/new-model")
    assert target is not None and target.on_node and target.price.context == 2048
    assert target.adapter is router.targets["fleet/configured"].adapter  # the same limits
    assert router.target("fleet/configured") is router.targets["fleet/configured"]
    assert router.target("other/new-model") is None and router.target("fleet/") is None
    assert "fleet/new-model" not in {m.name for m in router.models()}  # not configured


def test_router_without_a_node_provider_has_an_implicit_one_unless_the_name_is_taken():
    assert Router(parse(NODE_CONFIG.replace('"node"', '"openai"').replace(
        "hosted = false", 'base_url = "http://127.0.0.1:9/v1"')), store=None).node_provider == "node"
    taken = Router(parse(HOSTED_ONLY), store=None)
    assert taken.node_provider == "" and taken.target("node/anything") is None
