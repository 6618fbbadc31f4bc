"""The routing decision (`shared.domain.routing.plan_call`), alone: no I/O, a fake fleet."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contracts.messages import ModelInfo, TargetInfo
from shared.domain.policy import ChatRequestFacts, PolicyRules, RateUsage, compile_policy
from shared.domain.routing import Plan, RouteTarget, plan_call, route_of

ROUTE = (
    RouteTarget(name="node/small", provider="node", model="small", hosted=False, on_node=True),
    RouteTarget(name="openai/gpt", provider="openai", model="gpt"),
    RouteTarget(name="local/small", provider="local", model="small", hosted=False),
)


class FakeFleet:
    def __init__(self, nodes: dict[str, tuple[str, ...]]) -> None:
        self.nodes = nodes
        self.asked: list[str] = []

    def nodes_for(self, model: str) -> tuple[str, ...]:
        self.asked.append(model)
        return self.nodes.get(model, ())


def decide(route=ROUTE, **rules):
    policy = compile_policy(PolicyRules(**rules))
    return policy.evaluate_chat(
        ChatRequestFacts(model="default", targets=tuple(t.facts() for t in route)), RateUsage())


def test_without_a_policy_every_target_is_planned_in_order_with_its_nodes() -> None:
    fleet = FakeFleet({"small": ("n1", "n2")})
    plan = plan_call(ROUTE, None, fleet)
    assert [t.name for t in plan.targets] == ["node/small", "openai/gpt", "local/small"]
    assert [t.nodes for t in plan.targets] == [("n1", "n2"), (), ()]
    assert all(t.redact == () for t in plan.targets) and plan.dropped == ()
    assert plan.nodes == {"small": ("n1", "n2")}
    assert fleet.asked == ["small"]  # once per node-served model, only for node targets


def test_denied_targets_are_dropped_and_each_kept_one_has_its_redaction() -> None:
    fleet = FakeFleet({"small": ("n1",)})
    plan = plan_call(ROUTE, decide(providers_deny=("local",)), fleet)
    assert [t.name for t in plan.targets] == ["node/small", "openai/gpt"]
    assert [(d.target, d.rule) for d in plan.dropped] == [("local/small", "providers.deny")]
    by_name = {t.name: t for t in plan.targets}
    assert by_name["openai/gpt"].redact == ("email", "phone", "card", "api_key")  # hosted
    assert by_name["node/small"].redact == ()  # not hosted: text stays as written
    assert (by_name["openai/gpt"].provider, by_name["openai/gpt"].model,
            by_name["openai/gpt"].hosted) == ("openai", "gpt", True)


def test_the_fleet_is_never_asked_for_a_dropped_target() -> None:
    fleet = FakeFleet({"small": ("n1",)})
    plan = plan_call(ROUTE, decide(providers_deny=("node",)), fleet)
    assert "node/small" not in [t.name for t in plan.targets]
    assert fleet.asked == [] and plan.nodes == {}


def test_a_node_target_without_an_eligible_node_is_planned_without_nodes() -> None:
    plan = plan_call(ROUTE, None, FakeFleet({}))
    assert plan.targets[0].name == "node/small" and plan.targets[0].nodes == ()
    assert plan.nodes == {}


def test_route_of_a_model_keeps_order_hosted_and_node_flags() -> None:
    info = ModelInfo(name="default", targets=("node/small", "openai/gpt"), target_info=(
        TargetInfo(name="node/small", provider="node", model="small", hosted=False, on_node=True),
        TargetInfo(name="openai/gpt", provider="openai", model="gpt")),
        input_usd_per_mtok=1, output_usd_per_mtok=1, context=100, node_models=("small",))
    assert route_of(info) == ROUTE[:2]
    bare = ModelInfo(name="x", targets=("a/m",), input_usd_per_mtok=0, output_usd_per_mtok=0,
                     context=1)
    assert route_of(bare) == (RouteTarget(name="a/m", provider="a", model="m"),)


names = st.sampled_from(["p1", "p2", "p3"])
targets = st.builds(lambda p, m, hosted, node: RouteTarget(
    name=f"{p}/{m}", provider=p, model=m, hosted=hosted, on_node=node),
    names, st.sampled_from(["a", "b"]), st.booleans(), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(targets, min_size=1, max_size=6, unique_by=lambda t: t.name),
       st.lists(names, max_size=3))
def test_a_plan_is_the_allowed_targets_in_route_order(route, denied) -> None:
    decision = decide(tuple(route), providers_deny=tuple(denied))
    fleet = FakeFleet({"a": ("n-a",), "b": ("n-b1", "n-b2")})
    plan: Plan = plan_call(route, decision, fleet)
    kept = [t for t in route if t.provider not in denied]
    assert [t.name for t in plan.targets] == [t.name for t in kept]
    assert sorted(d.target for d in plan.dropped) == sorted(t.name for t in route
                                                            if t.provider in denied)
    for planned, target in zip(plan.targets, kept):
        assert planned.nodes == (fleet.nodes[target.model] if target.on_node else ())
        assert bool(planned.redact) == target.hosted
    assert set(fleet.asked) == {t.model for t in kept if t.on_node}
    assert len(fleet.asked) == len(set(fleet.asked))
