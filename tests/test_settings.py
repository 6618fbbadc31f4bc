"""Settings: each declared once, read by one generic `from_env`, secrets never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.infra.settings import Settings, declarations


def test_unset_or_empty_variables_keep_the_declared_defaults() -> None:
    empty = {decl.env: "" for _, decl in declarations()}
    for environ in ({}, empty):
        s = Settings.from_env(environ)
        assert (s.nats_port, s.request_timeout_s, s.data_dir) == (4222, 5.0, Path(".nexus"))
        assert s.node_labels == {} and s.admin_key is None and s.providers_file is None
        assert s.node_dir == Path(".nexus") / "node"


def test_each_variable_is_parsed_by_its_declaration() -> None:
    s = Settings.from_env({"NEXUS_NATS_PORT": "4333", "NEXUS_BUDGET_SWEEP_S": "0.5",
                           "NEXUS_DATA_DIR": "/tmp/x", "NEXUS_LOG_LEVEL": "debug",
                           "NEXUS_NODE_LABELS": "zone=a, gpu = h100",
                           "NEXUS_PROVIDERS_FILE": "/etc/p.toml", "NEXUS_INSTANCE_ID": "i-1"})
    assert (s.nats_port, s.budget_sweep_s, s.data_dir) == (4333, 0.5, Path("/tmp/x"))
    assert s.log_level == "DEBUG" and s.instance_id == "i-1"
    assert s.node_labels == {"zone": "a", "gpu": "h100"}
    assert s.providers_file == Path("/etc/p.toml")


@pytest.mark.parametrize(("env", "raw", "message"), [
    ("NEXUS_NATS_PORT", "42x", "environment variable NEXUS_NATS_PORT='42x' is not an integer"),
    ("NEXUS_BUDGET_SWEEP_S", "soon", "environment variable NEXUS_BUDGET_SWEEP_S='soon' is not a number"),
    ("NEXUS_NODE_LABELS", "zone", "NEXUS_NODE_LABELS='zone' is invalid: item 'zone' is not key=value"),
])
def test_a_bad_value_names_its_variable(env: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        Settings.from_env({env: raw})
    assert message in str(exc.value)


def test_repr_hides_every_secret() -> None:
    s = Settings.from_env({"NEXUS_ADMIN_KEY": "nx_admin_s3cret", "NEXUS_API_KEY": "nx_k_s3cret",
                           "NEXUS_NATS_PASSWORD": "s3cret",
                           "DATABASE_URL": "postgresql://nexus:s3cret@db:5432/nexus"})
    text = repr(s)
    assert "s3cret" not in text
    assert "admin_key='***'" in text and "nats_password='***'" in text
    assert "postgresql://nexus:***@db:5432/nexus" in text
    assert {decl.env for _, decl in declarations() if decl.secret} == {
        "DATABASE_URL", "NEXUS_ADMIN_KEY", "NEXUS_API_KEY", "NEXUS_NATS_PASSWORD"}


def test_every_field_is_a_declared_setting_with_a_doc() -> None:
    envs = [decl.env for _, decl in declarations()]
    assert len(envs) == len(set(envs))
    assert all(decl.doc for _, decl in declarations())
