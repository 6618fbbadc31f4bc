"""The pure tool decision (`shared.domain.tools`): properties that must hold whatever
the input."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.policy import PolicyRules, compile_policy
from shared.domain.tools import (
    BUILTINS,
    TOOL_NAME,
    Permissions,
    ToolError,
    ToolSpec,
    builtin_spec,
    decide_tool_call,
    decode_spec,
    schema_problems,
    validate_spec,
)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
policies = st.sampled_from([None, compile_policy(PolicyRules()),
                            compile_policy(PolicyRules(tools_allow=("*",))),
                            compile_policy(PolicyRules(tools_allow=("files.*",)))])


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(BUILTINS)), arguments=st.dictionaries(
    st.sampled_from(["code", "command", "path", "content", "url", "x"]), json_values, max_size=3),
       policy=policies, approval=st.booleans())
def test_an_invalid_or_denied_call_is_never_allowed(name, arguments, policy, approval) -> None:
    spec = msgspec.structs.replace(builtin_spec(name), needs_approval=approval)
    verdict = decide_tool_call(spec, policy, arguments)
    schema_ok = not (verdict.rule == "tool.arguments")
    policy_ok = policy is not None and policy.evaluate_tool(name).allowed
    if verdict.allowed:
        assert schema_ok and policy_ok and not approval
    if not schema_ok:  # schema first: a failing field is always named, never run
        assert verdict.verdict == "denied" and verdict.errors
        assert all(e["field"].startswith("arguments") for e in verdict.errors)
    elif not policy_ok:
        assert verdict.verdict == "denied"
    elif approval:
        assert verdict.verdict == "needs_approval"


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(TOOL_NAME, fullmatch=True), hosts=st.lists(
    st.from_regex(r"[a-z]{1,10}\.example\.org(:[1-9][0-9]{0,3})?", fullmatch=True), max_size=3))
def test_a_valid_definition_round_trips_through_its_event_form(name, hosts) -> None:
    spec = ToolSpec(name=name, builtin="http_fetch",
                    permissions=Permissions(network=tuple(hosts) if hosts else "none"))
    try:
        checked = validate_spec(spec)
    except ToolError as exc:
        assert name in BUILTINS and exc.errors[0]["field"] == "name"
        return
    assert decode_spec(msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(checked)))) == checked


def test_schemas_that_could_stall_or_reach_out_are_refused() -> None:
    assert schema_problems({"type": "object", "properties": {"a": {"pattern": "(a+)+\\1"}}})
    assert schema_problems({"type": "object", "properties": {"a": {"$ref": "http://example.org/s"}}})
    assert schema_problems({"type": "array"})[0]["field"] == "parameters/type"
    assert schema_problems({"type": "object", "properties": {"a": {"type": "string"}}}) == []
