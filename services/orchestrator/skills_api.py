"""`/v1/skills`, `/v1/calls/{call_id}/feedback|explain` and `/v1/replays`: thin handlers
over `SkillService`, `CallExplainer` and `ReplayService`, scoped to the caller's tenant
(another tenant's skill or call is a 404)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Controller, get, post
from litestar.params import Parameter

from services.orchestrator.auth import require_admin
from services.orchestrator.calls import CallLifecycle
from services.orchestrator.explain import CallExplainer
from services.orchestrator.keys import Caller
from services.orchestrator.replay import ReplayService
from services.orchestrator.skills import SkillOut, SkillService
from shared.contracts.errors import InvalidRequest
from shared.domain.skills import SKILL_NAME, LlmRouting

SkillName = Annotated[str, Parameter(pattern=SKILL_NAME)]
Text = Annotated[str, msgspec.Meta(max_length=2000)]
Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]


class SkillIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tenant skill: routing rules and what `auto` matches against (docs: README "Skills")."""

    name: Annotated[str, msgspec.Meta(pattern=SKILL_NAME)]
    category: Annotated[str, msgspec.Meta(max_length=64)] = "general"
    description: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    capabilities: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=32)] = []
    examples: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]],
                        msgspec.Meta(max_length=32)] = []
    llm_routing: LlmRouting
    expected_version: Annotated[int, msgspec.Meta(ge=0)] | None = None


class SkillList(msgspec.Struct, frozen=True, kw_only=True):
    skills: list[SkillOut]


class FeedbackIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    score: Unit
    comment: Annotated[str, msgspec.Meta(max_length=1000)] = ""


class FeedbackOut(msgspec.Struct, frozen=True, kw_only=True):
    call_id: str
    score: float
    source: str
    learned: bool  # the call was routed: the score updates its (cluster, model)
    cluster: str | None = None
    model: str | None = None


class ReplayIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`since`/`until`: an ISO time or a duration back from now (`24h`, `30m`, `7d`)."""

    since: Annotated[str, msgspec.Meta(min_length=2, max_length=40)] = "24h"
    until: Annotated[str, msgspec.Meta(min_length=2, max_length=40)] | None = None
    cost_weight: Unit | None = None
    performance_weight: Unit | None = None
    models: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]],
                      msgspec.Meta(min_length=1, max_length=64)] | None = None
    execute: Annotated[int, msgspec.Meta(ge=0, le=50)] = 0
    # a model that scores each re-run answer 0..10: the measured quality of `execute`
    grader: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


_DURATION = re.compile(r"^(\d{1,6})([smhd])$")


def moment(value: str, field: str, now: datetime) -> datetime:
    m = _DURATION.match(value)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now - timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: n})
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{field}: an ISO time or a duration like 24h",
                             [{"field": field, "message": "an ISO time or a duration like 24h"}]) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


class SkillsController(Controller):
    path = "/v1/skills"

    @get("/")
    async def list_skills(self, caller: Caller, skill_service: SkillService) -> SkillList:
        """The skills the tenant can route with: the system's (files) and its own."""
        return SkillList(skills=await skill_service.list(caller))

    @post("/", status_code=201)
    async def define_skill(self, data: SkillIn, caller: Caller, skill_service: SkillService,
                           calls: CallLifecycle) -> SkillOut:
        """Define a skill, or a new version of it (admin); its models must be served."""
        require_admin(caller)
        body = msgspec.to_builtins(data)
        expected = body.pop("expected_version", None)
        return await skill_service.define(caller, body, set(await calls.models()),
                                          expected_version=expected)

    @get("/{name:str}")
    async def get_skill(self, name: SkillName, caller: Caller, skill_service: SkillService) -> SkillOut:
        return await skill_service.get(caller, name)


class CallsController(Controller):
    path = "/v1/calls/{call_id:str}"

    @post("/feedback", status_code=200)
    async def call_feedback(self, call_id: str, data: FeedbackIn, caller: Caller,
                            call_explainer: CallExplainer) -> FeedbackOut:
        """Score a call's answer 0..1: routing learns it for the call's (cluster, model)."""
        return FeedbackOut(**await call_explainer.feedback(caller, call_id, data.score,
                                                           comment=data.comment))

    @get("/explain")
    async def explain_call(self, call_id: str, caller: Caller,
                           call_explainer: CallExplainer) -> dict[str, Any]:
        """The call's decision chain from its events: routing, policy, budget, plan,
        attempts and fallbacks, outcome, feedback."""
        return await call_explainer.explain(caller, call_id)


class ReplaysController(Controller):
    path = "/v1/replays"

    @post("/", status_code=200)
    async def replay(self, data: ReplayIn, caller: Caller,
                     replay_service: ReplayService) -> dict[str, Any]:
        """Re-decide the routed calls of a period under other weights or models
        (counterfactual); `execute` re-runs that many changed calls (admin)."""
        if data.execute:
            require_admin(caller)
        now = datetime.now(UTC)
        since = moment(data.since, "since", now)
        until = moment(data.until, "until", now) if data.until else now
        return await replay_service.replay(
            caller, since, until, cost_weight=data.cost_weight,
            performance_weight=data.performance_weight, models=data.models, execute=data.execute,
            grader=data.grader)
