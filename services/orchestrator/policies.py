"""Tenant policies: declared (versioned events), pinned by sessions, compiled once."""

from __future__ import annotations

import msgspec

from shared.contracts.errors import InvalidRequest, PolicyInvalid
from shared.contracts.events import Metadata, PolicyDefined, policy_stream
from shared.infra.eventstore import EventStore, ProjectionRunner
from shared.domain.policy import CompiledPolicy, PolicyError, PolicyRules, compile_policy, decode_rules
from services.orchestrator.keys import Caller
from services.orchestrator.read_models.policies import PoliciesReadModel
from services.orchestrator.schemas import PolicyOut


ACCEPTED_KEPT = 256  # rules accepted lately, by their JSON: not validated again
ACCEPTED_MAX_BYTES = 4096  # larger rules are validated each time (the memory stays small)
_accepted: dict[bytes, PolicyRules] = {}


def rules_or_problem(raw: object, field: str = "rules") -> PolicyRules:
    """Decode and validate user-written rules; `InvalidRequest` naming each offending
    field (a 400 at the HTTP edge). Rules accepted lately are not compiled again (a
    client that starts many sessions sends the same inline policy each time: issue 16)."""
    encoded = msgspec.json.encode(raw)
    if (rules := _accepted.get(encoded)) is not None:
        return rules
    try:
        rules = decode_rules(encoded)
        compile_policy(rules)
    except PolicyError as exc:
        problems = [f"{field}.{p}" for p in exc.problems]
        raise InvalidRequest("; ".join(problems),
                             [{"field": p.split(":")[0], "message": p} for p in problems]) from None
    if len(encoded) <= ACCEPTED_MAX_BYTES:
        if len(_accepted) >= ACCEPTED_KEPT:
            del _accepted[next(iter(_accepted))]  # the oldest out
        _accepted[encoded] = rules
    return rules


def _compile_stored(raw: bytes, label: str) -> CompiledPolicy:
    """A policy accepted earlier; one that no longer compiles (a pattern valid before
    patterns ran on RE2, such as a look-ahead) denies every call, naming the field."""
    try:
        return compile_policy(decode_rules(raw))
    except PolicyError as exc:
        raise PolicyInvalid(f"the session's policy {label} no longer compiles; define a new "
                            f"version or start a new session: " + "; ".join(exc.problems),
                            label, exc.problems) from None


class PolicyService:
    def __init__(self, store: EventStore, runner: ProjectionRunner) -> None:
        self.store = store
        self.runner = runner
        self.read_model = PoliciesReadModel(store)
        self._compiled: dict[tuple[str, str, int], CompiledPolicy] = {}

    async def define(self, caller: Caller, name: str, rules: PolicyRules) -> int:
        stream = policy_stream(caller.tenant, name)
        result = await self.store.append(
            stream, [PolicyDefined(tenant=caller.tenant, name=name, rules=msgspec.to_builtins(rules))],
            expected_version=None, metadata=Metadata(tenant=caller.tenant, actor=caller.actor))
        await self.runner.wait_for(result.last_position, names=("policies",))
        return result.next_expected_version

    async def current_version(self, tenant: str, name: str) -> int | None:
        return await self.read_model.current_version(tenant, name)

    async def of_tenant(self, tenant: str) -> list[PolicyOut]:
        """The tenant's policies, each at its current version, by name."""
        return await self.read_model.of_tenant(tenant)

    async def compiled(self, tenant: str, name: str | None, version: int | None,
                       inline: dict | None) -> tuple[CompiledPolicy | None, str | None]:
        """The session's policy, compiled (cached by name@version), and its label."""
        if inline is not None:
            raw = msgspec.json.encode(inline)
            key = ("inline", raw.decode(), 0)
            if key not in self._compiled:
                if len(self._compiled) > 10_000:
                    self._compiled.clear()
                self._compiled[key] = _compile_stored(raw, "inline")
            return self._compiled[key], "inline"
        if name is None or version is None:
            return None, None
        key = (tenant, name, version)
        if key not in self._compiled:
            events = await self.store.read_stream(policy_stream(tenant, name))
            event = next(e.event for e in events if e.stream_version == version)
            assert isinstance(event, PolicyDefined)
            self._compiled[key] = _compile_stored(msgspec.json.encode(event.rules),
                                                  f"{name}@{version}")
        return self._compiled[key], f"{name}@{version}"
