"""Skills: what a task needs and how its model is chosen (pure).

A skill names a kind of work (`category`, `description`, `capabilities`, `examples` of
requests) and carries its routing rules (`llm_routing`): the `preferred` model (the
router's prior favourite), the `fallback` models (the chain after the pick), the
weights of the trade-off (`performance_weight` x quality - `cost_weight` x cost) and,
optionally, the set of models `allowed` (default: preferred + fallback). System skills
ship as TOML files in `skills/`; a tenant's own are `SkillDefined` events and win by
name.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec

SKILL_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
_NAME = re.compile(SKILL_NAME)
MAX_EXAMPLES = 32
DEFAULT_SKILL = "general"  # a tenant's default skill: `auto` below the confidence threshold

Weight = Annotated[float, msgspec.Meta(ge=0, le=1)]


class LlmRouting(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    preferred: str
    fallback: tuple[str, ...] = ()
    cost_weight: Weight = 0.3
    performance_weight: Weight = 0.7
    allowed: tuple[str, ...] | None = None  # None: preferred + fallback


class SkillSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    category: str = "general"
    description: str
    capabilities: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()  # requests of this kind: what `auto` matches against
    llm_routing: LlmRouting

    @property
    def models(self) -> tuple[str, ...]:
        """The models the router may pick from, preferred first, without duplicates."""
        r = self.llm_routing
        chain = r.allowed if r.allowed is not None else (r.preferred, *r.fallback)
        return tuple(dict.fromkeys(chain))


class SkillError(ValueError):
    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


def skill_problems(spec: SkillSpec, known_models: frozenset[str] | set[str] | None) -> list[dict[str, str]]:
    """Every rule the skill breaks, each naming its field (empty: valid). With
    `known_models`, every model it names must be served."""
    errors: list[dict[str, str]] = []

    def bad(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    if not _NAME.match(spec.name):
        bad("name", f"must match {SKILL_NAME}")
    if not spec.description.strip():
        bad("description", "must not be empty")
    if len(spec.description) > 2000:
        bad("description", "at most 2000 characters")
    if len(spec.examples) > MAX_EXAMPLES:
        bad("examples", f"at most {MAX_EXAMPLES}")
    for i, example in enumerate(spec.examples):
        if not example.strip() or len(example) > 1000:
            bad(f"examples/{i}", "1 to 1000 characters")
    r = spec.llm_routing
    for field, weight in (("cost_weight", r.cost_weight), ("performance_weight", r.performance_weight)):
        if not 0 <= weight <= 1:
            bad(f"llm_routing/{field}", "must be within 0..1")
    if r.cost_weight + r.performance_weight <= 0:
        bad("llm_routing/performance_weight", "the weights cannot both be 0")
    if len(set(r.fallback)) != len(r.fallback):
        bad("llm_routing/fallback", "lists a model twice")
    if r.allowed is not None:
        for field, model in (("preferred", r.preferred), *(("fallback", m) for m in r.fallback)):
            if model not in r.allowed:
                bad(f"llm_routing/{field}", f"{model!r} is not in llm_routing/allowed")
    if known_models is not None:
        named = [("llm_routing/preferred", r.preferred),
                 *((f"llm_routing/fallback/{i}", m) for i, m in enumerate(r.fallback)),
                 *((f"llm_routing/allowed/{i}", m) for i, m in enumerate(r.allowed or ()))]
        for field, model in named:
            if model not in known_models:
                bad(field, f"unknown model {model!r}")
    return errors


def validate_skill(spec: SkillSpec, known_models: frozenset[str] | set[str] | None = None) -> SkillSpec:
    problems = skill_problems(spec, known_models)
    if problems:
        raise SkillError(problems)
    return spec


def parse_skill(data: dict, *, source: str = "skill") -> SkillSpec:
    """A skill from its JSON/TOML form; `SkillError` naming the field when it is malformed."""
    try:
        return msgspec.convert(data, SkillSpec)
    except msgspec.ValidationError as exc:
        path = str(exc).rsplit("at `$", 1)
        field = path[1].rstrip("`").lstrip(".").replace(".", "/") if len(path) == 2 else source
        raise SkillError([{"field": field or source, "message": str(exc)}]) from None


def load_skill_files(directory: Path) -> tuple[SkillSpec, ...]:
    """The system skills: every `*.toml` of `directory`, checked (names unique)."""
    skills: dict[str, SkillSpec] = {}
    for path in sorted(directory.glob("*.toml")):
        spec = validate_skill(parse_skill(tomllib.loads(path.read_text()), source=path.name))
        if spec.name in skills:
            raise SkillError([{"field": path.name, "message": f"skill {spec.name!r} defined twice"}])
        skills[spec.name] = spec
    return tuple(skills.values())


def resolve_models(spec: SkillSpec, served: set[str] | frozenset[str]) -> tuple[str, ...]:
    """The skill's models that are served here. A system skill names models by role;
    one that is not configured here is simply not a candidate."""
    return tuple(m for m in spec.models if m in served)
