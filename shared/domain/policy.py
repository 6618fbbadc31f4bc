"""Tenant policies: declared as data, compiled once, evaluated without any I/O.

A tenant writes a policy as JSON (`PolicyRules`); nothing in it is code.
`decode_rules(json)` decodes and validates it, `compile_policy(rules)` compiles it once
(both raise `PolicyError` whose `problems` name the fields to fix), and the
`CompiledPolicy` then answers, per action, whether it may happen:

    evaluate_chat(facts, usage) -> Decision    evaluate_tool(name) -> Decision
    check_output(text) -> Decision             redact(text) -> (text, kinds)

Every answer is a `Decision`: allowed or not, the stable id of the rule that decided
(`models.deny`, `rate.calls_per_minute.session`, `content.input.deny[0]`,
`default.allow_chat`...) and a reason a human can read. Decisions are msgspec Structs,
so they can be recorded as events as they are. Reasons name models, providers, tools,
patterns and counts; they never quote the text evaluated (it may be the very secret
a rule is about).

Rules
-----
- `models_allow` / `models_deny`, `providers_allow` / `providers_deny`, `tools_allow`:
  glob patterns (`*`, `?`, `[seq]`, `[!seq]`, as `fnmatch`) matched against the whole
  name, case-insensitively. An `*_allow` of `None` means "any" for models and
  providers; for tools it means "none" (tools need permission, see below). An empty
  list allows nothing.
- Model and provider rules hold for every *target* a call can reach: a route is an
  ordered fallback chain of targets (`provider/model`, `ChatRequestFacts.targets`),
  and each is evaluated on its own. A target is denied by the provider rules on its
  provider, and by the model rules on any of its names: the model the client asked
  for (a route alias or `provider/model`), the target's model and `provider/model`
  (a deny pattern matching any of them denies; an allow list must match one of
  them). Denied targets are dropped from the chain (`Decision.targets` lists every
  target with its verdict); a call none of whose targets is allowed is denied by the
  rule that denied its first target.
- `max_tokens_per_call`: the most completion tokens (`max_tokens`) one call may ask
  for. A request that asks for no limit is not denied: the decision then carries
  `max_tokens`, the cap the caller must send to the provider.
- `rate_per_tenant`, `rate_per_key`, `rate_per_session`: calls and tokens per minute
  (`RateLimits`). The engine only declares limits and decides on counts the caller
  supplies (`RateUsage`: what each scope already used in the current one-minute
  window); counting happens elsewhere (Postgres) so that limits hold across
  processes. A call is admitted while its scope has room left: denied when
  `calls >= calls_per_minute` or `tokens >= tokens_per_minute`. A call's own tokens
  are only known once it ends, so a window can overshoot by one call's tokens. A
  limit of 0 blocks every call. `CompiledPolicy.rate_scopes` says which scopes have
  limits, so the caller counts only those. A scope whose usage is `None` does not
  apply to the request (no API key, no session): its limits are skipped. This is
  the only place rate limits are decided; the caller then takes the call's slot in
  every limited scope (`calls < calls_per_minute`, all or none) in the same
  transaction that records the allowed decision, so a denied call consumes nothing.
- `content.deny_input` / `content.deny_output`: regular expressions in RE2 syntax
  (`google-re2`; searched anywhere in the text; `(?i)` for case-insensitive). RE2
  runs in time linear in the text whatever the pattern (no backtracking: `(a|aa)*b`
  or `(a+)+b` cost what `ab` costs), so a user-written pattern cannot stall the
  process. It has no look-arounds, back-references or possessive repeats: a pattern
  RE2 cannot compile is refused, naming the field. Input rules see the request's text
  before any redaction. Glob patterns are matched with RE2 as well. (RE2 releases the
  GIL while it scans; the orchestrator scans large texts in a worker thread.)
- `content.redact`: the kinds of secrets to redact before text leaves for a hosted
  provider (all four by default), each replaced by `[REDACTED:<kind>]`:
  `email`; `phone`, written with a leading `+` (`+44 20 7946 0958`, `+1 (555)
  123-4567`, 8 to 17 digits) or in a North American shape (`(555) 123-4567`,
  `555-123-4567`), since a bare run of digits may well be an order number; `card`,
  13 to 19 digits, together or in groups like 4-4-4-4 or 4-6-5, passing the Luhn
  check; `api_key`: vendor-prefixed keys (`sk-...`, `nx_...`, `AKIA...`, `ghp_...`,
  `xoxb-...`, `AIza...`), JWTs, PEM private keys, the value of `Bearer <token>` and of
  `api_key=`, `secret:`, `token=`, `password=`... assignments, and long mixed-case
  tokens with digits that look random. These are heuristics: they lean towards
  redacting a little too much rather than leaking.

Defaults
--------
Tools need permission: a tool is allowed only when a pattern in `tools_allow` matches
it (`tools.allow`), otherwise denied (`default.deny_tools`). Plain chat needs none:
a request that no rule denies is allowed (`default.allow_chat`); budgets are checked
elsewhere. Output that no rule denies is allowed (`default.allow_output`).

Precedence of `evaluate_chat` (the first rule that denies decides)
------------------------------------------------------------------
1. per target: `providers.deny`, then `providers.allow`, then
2. `models.deny`, then `models.allow` (a deny pattern wins over an allow pattern);
   denied targets are dropped, the call is denied only when none is left
3. `max_tokens_per_call`
4. the tools the request offers, in order: `default.deny_tools` for the first not allowed
5. `content.input.deny[i]`, the first matching pattern in declared order
6. rate limits: tenant, then key, then session; within a scope calls before tokens
   (`rate.calls_per_minute.<scope>`, `rate.tokens_per_minute.<scope>`)
7. otherwise `default.allow_chat`

Permanent denials (who, what, how much, which content) come before rate limits, so a
request that can never succeed is not told to retry later.

An allowed chat decision carries the caller's obligations: `redact` (the kinds to
redact with `CompiledPolicy.redact` before the text leaves; empty unless a target
is hosted), `targets` (with `facts.targets`: each target's verdict, in chain order;
an allowed one carries its own `redact`, empty unless that target is hosted) and
`max_tokens` (the cap to send when the request gave none).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec
import re2

RedactKind = Literal["email", "phone", "card", "api_key"]
Scope = Literal["tenant", "key", "session"]

REDACT_KINDS: tuple[RedactKind, ...] = ("email", "phone", "card", "api_key")
SCOPES: tuple[Scope, ...] = ("tenant", "key", "session")

MAX_PATTERNS = 256
MAX_GLOB_LENGTH = 200
MAX_REGEX_LENGTH = 1000

Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GLOB_LENGTH)]
Globs = Annotated[tuple[Glob, ...], msgspec.Meta(max_length=MAX_PATTERNS)]
Regex = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REGEX_LENGTH)]
Regexes = Annotated[tuple[Regex, ...], msgspec.Meta(max_length=MAX_PATTERNS)]
PerMinute = Annotated[int, msgspec.Meta(ge=0)]
Tokens = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]


# -- the policy a tenant writes -----------------------------------------------------------


class RateLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Limits for one scope, per one-minute window; `None` = unlimited."""

    calls_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None


class ContentRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    deny_input: Regexes = ()
    deny_output: Regexes = ()
    redact: tuple[RedactKind, ...] = REDACT_KINDS  # applied for hosted providers


class PolicyRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models_allow: Globs | None = None  # None = any model
    models_deny: Globs = ()
    providers_allow: Globs | None = None  # None = any provider
    providers_deny: Globs = ()
    max_tokens_per_call: Tokens | None = None
    rate_per_tenant: RateLimits | None = None
    rate_per_key: RateLimits | None = None
    rate_per_session: RateLimits | None = None
    tools_allow: Globs | None = None  # None = no tool allowed (default deny)
    content: ContentRules = ContentRules()


# -- what is evaluated and what comes back -------------------------------------------------


class TargetFacts(msgspec.Struct, frozen=True, kw_only=True):
    """One target a call can reach (a step of a route's fallback chain)."""

    name: str  # "provider/model"
    provider: str
    model: str
    hosted: bool = True  # text sent to it leaves for a hosted provider (redaction applies)


class ChatRequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy needs to know about one chat call.

    `targets`: the targets the call can reach, in fallback order. Empty: one target,
    `provider` serving `model` (`hosted` says whether redaction applies to it).
    """

    model: str  # what the client asked for: a route alias or "provider/model"
    provider: str = ""
    targets: tuple[TargetFacts, ...] = ()
    max_tokens: int | None = None  # completion tokens asked for; None = provider default
    input_text: str = ""  # all user-visible text of the request, joined
    hosted: bool = True  # the text leaves for a hosted provider (redaction applies)
    tools: tuple[str, ...] = ()  # tools offered to the model


class WindowUsage(msgspec.Struct, frozen=True, kw_only=True):
    """What a scope used in the current one-minute window, before this call."""

    calls: Count = 0
    tokens: Count = 0


class RateUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Usage per scope; `None` = the request has no such scope (its limits are skipped)."""

    tenant: WindowUsage | None = None
    key: WindowUsage | None = None
    session: WindowUsage | None = None


class TargetDecision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The verdict on one target of a call: allowed (with its redaction) or dropped."""

    target: str  # "provider/model"
    allowed: bool
    rule: str  # "default.allow_target" or the rule that denied it
    reason: str
    redact: tuple[RedactKind, ...] = ()  # allowed: kinds to redact before sending to it


class Decision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    allowed: bool
    rule: str  # stable rule id, e.g. "models.deny", "rate.calls_per_minute.session"
    reason: str  # for humans
    scope: Scope | None = None  # rate-limit decisions only
    redact: tuple[RedactKind, ...] = ()  # allowed chat: kinds to redact before sending
    max_tokens: int | None = None  # allowed chat: cap to send when the request set none
    targets: tuple[TargetDecision, ...] = ()  # chat with facts.targets: each one's verdict

    @property
    def allowed_targets(self) -> tuple[TargetDecision, ...]:
        return tuple(t for t in self.targets if t.allowed)

    @property
    def dropped_targets(self) -> tuple[TargetDecision, ...]:
        return tuple(t for t in self.targets if not t.allowed)


class PolicyError(ValueError):
    """A policy a user must fix; `problems` name the fields."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid policy: " + "; ".join(problems))


# -- validation ---------------------------------------------------------------------------


def decode_rules(data: bytes | str | Mapping[str, Any]) -> PolicyRules:
    """Decode a policy from JSON (or already-decoded JSON) and validate it.

    Raises `PolicyError`: msgspec reports the first type or constraint error (unknown
    fields included) as `<path>: <message>`; then every `validate_rules` problem.
    """
    try:
        if isinstance(data, (bytes, str)):
            rules = msgspec.json.decode(data, type=PolicyRules)
        else:
            rules = msgspec.convert(data, PolicyRules)
    except msgspec.ValidationError as exc:
        raise PolicyError([_validation_problem(str(exc))]) from None
    except msgspec.DecodeError as exc:
        raise PolicyError([f"$: invalid JSON: {exc}"]) from None
    problems = validate_rules(rules)
    if problems:
        raise PolicyError(problems)
    return rules


def _validation_problem(message: str) -> str:
    # msgspec: "Object contains unknown field `x` - at `$.content`" -> "content: ..."
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    path = where.rstrip("`").removeprefix("$").removeprefix(".") or "$"
    return f"{path}: {text}"


def validate_rules(rules: PolicyRules) -> list[str]:
    """Everything a user must fix in `rules`, each problem naming its field.

    Checks what decoding checks (for rules built in Python, which msgspec does not
    validate) and what it cannot: regexes compile and cannot take exponential time.
    """
    problems: list[str] = []
    for name in ("models_allow", "models_deny", "providers_allow", "providers_deny",
                 "tools_allow"):
        value = getattr(rules, name)
        if value is not None:
            _check_strings(name, value, MAX_GLOB_LENGTH, problems, _glob_problem)
    _check_int("max_tokens_per_call", rules.max_tokens_per_call, 1, problems)
    for scope in SCOPES:
        name = f"rate_per_{scope}"
        limits = getattr(rules, name)
        if limits is None:
            continue
        if not isinstance(limits, RateLimits):
            problems.append(f"{name}: expected rate limits, got {type(limits).__name__}")
            continue
        _check_int(f"{name}.calls_per_minute", limits.calls_per_minute, 0, problems)
        _check_int(f"{name}.tokens_per_minute", limits.tokens_per_minute, 0, problems)
    content = rules.content
    if not isinstance(content, ContentRules):
        problems.append(f"content: expected content rules, got {type(content).__name__}")
        return problems
    for name in ("deny_input", "deny_output"):
        _check_strings(f"content.{name}", getattr(content, name), MAX_REGEX_LENGTH,
                       problems, _regex_problem)
    if isinstance(content.redact, str) or not isinstance(content.redact, (tuple, list)):
        problems.append("content.redact: expected a list of kinds")
    else:
        for i, kind in enumerate(content.redact):
            if kind not in REDACT_KINDS:
                problems.append(f"content.redact[{i}]: unknown kind {kind!r} "
                                f"(expected one of {', '.join(REDACT_KINDS)})")
    return problems


def _check_int(field: str, value: object, minimum: int, problems: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{field}: expected an integer, got {type(value).__name__}")
    elif value < minimum:
        problems.append(f"{field}: must be >= {minimum}, got {value}")


def _check_strings(field: str, value: object, max_length: int, problems: list[str],
                   extra: Callable[[str], str | None] | None) -> None:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        problems.append(f"{field}: expected a list of patterns, got {type(value).__name__}")
        return
    if len(value) > MAX_PATTERNS:
        problems.append(f"{field}: at most {MAX_PATTERNS} patterns, got {len(value)}")
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, str):
            problems.append(f"{where}: expected a string, got {type(item).__name__}")
        elif not item:
            problems.append(f"{where}: must not be empty")
        elif len(item) > max_length:
            problems.append(f"{where}: longer than {max_length} characters")
        elif extra is not None and (problem := extra(item)) is not None:
            problems.append(f"{where}: {problem}")


def _re2_options(*, case_sensitive: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would log the pattern to stderr: no user text in logs
    options.never_capture = True  # only "does it occur" is asked: the DFA answers that
    options.case_sensitive = case_sensitive
    return options


_CONTENT_OPTIONS = _re2_options(case_sensitive=True)
_GLOB_OPTIONS = _re2_options(case_sensitive=False)


def _re2_compile(pattern: str, options: re2.Options) -> Any:
    """RE2 compiled; raises `re2.error` with RE2's message in words."""
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise re2.error(str(detail)) from None


def _regex_problem(pattern: str) -> str | None:
    try:
        _re2_compile(pattern, _CONTENT_OPTIONS)
    except re2.error as exc:
        return (f"invalid regex: {exc} (patterns use RE2 syntax, which runs in linear "
                f"time: no look-arounds, back-references or possessive repeats)")
    return None


def _glob_regex(pattern: str) -> str:
    """A glob (`*`, `?`, `[seq]`, `[!seq]`, as `fnmatch`) as an anchored RE2 pattern."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(re2.escape("["))
                continue
            body = pattern[i:j].replace("\\", "\\\\").replace("[", "\\[")
            i = j + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
        else:
            out.append(re2.escape(ch))
    return "(?s)\\A" + "".join(out) + "\\z"


def _glob_problem(pattern: str) -> str | None:
    try:
        _re2_compile(_glob_regex(pattern), _GLOB_OPTIONS)
    except re2.error as exc:
        return f"invalid glob: {exc}"
    return None


# -- compiled policy ----------------------------------------------------------------------


class _Globs:
    """Glob patterns, each compiled with RE2 (case-insensitive); reports which matched."""

    __slots__ = ("patterns", "_regexes")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = tuple(patterns)
        self._regexes = tuple(_re2_compile(_glob_regex(p), _GLOB_OPTIONS) for p in self.patterns)

    def first_match(self, *names: str) -> str | None:
        """The first pattern, in declared order, that matches one of `names`."""
        for pattern, regex in zip(self.patterns, self._regexes):
            if any(regex.search(name) is not None for name in names):
                return pattern
        return None


def _q(value: str, limit: int = 80) -> str:
    """A user-supplied name or pattern, quoted for a reason (bounded length)."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return repr(value)


def _listing(patterns: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(_q(p) for p in patterns[:limit])
    return shown + (f" and {len(patterns) - limit} more" if len(patterns) > limit else "")


class CompiledPolicy:
    """A validated policy with its patterns compiled; evaluation does no I/O."""

    __slots__ = ("rules", "rate_scopes", "_models_allow", "_models_deny", "_providers_allow",
                 "_providers_deny", "_tools_allow", "_deny_input", "_deny_output",
                 "_rates", "_redact")

    def __init__(self, rules: PolicyRules) -> None:
        self.rules = rules
        self._models_allow = None if rules.models_allow is None else _Globs(rules.models_allow)
        self._models_deny = _Globs(rules.models_deny)
        self._providers_allow = (None if rules.providers_allow is None
                                 else _Globs(rules.providers_allow))
        self._providers_deny = _Globs(rules.providers_deny)
        self._tools_allow = None if rules.tools_allow is None else _Globs(rules.tools_allow)
        self._deny_input = tuple((p, _re2_compile(p, _CONTENT_OPTIONS))
                                 for p in rules.content.deny_input)
        self._deny_output = tuple((p, _re2_compile(p, _CONTENT_OPTIONS))
                                  for p in rules.content.deny_output)
        self._rates: tuple[tuple[Scope, RateLimits], ...] = tuple(
            (scope, limits) for scope in SCOPES
            if (limits := getattr(rules, f"rate_per_{scope}")) is not None
            and (limits.calls_per_minute is not None or limits.tokens_per_minute is not None))
        #: scopes with a declared limit, the only ones whose usage the caller must count
        self.rate_scopes: tuple[Scope, ...] = tuple(scope for scope, _ in self._rates)
        self._redact = tuple(dict.fromkeys(rules.content.redact))

    # -- chat ---------------------------------------------------------------------------

    @property
    def has_content_rules(self) -> bool:
        """Whether evaluating a text scans it (worth doing off the event loop when big)."""
        return bool(self._deny_input or self._deny_output)

    def evaluate_target(self, requested: str, target: TargetFacts) -> TargetDecision:
        """Provider and model rules on one target of a call for model `requested`."""
        names = tuple(dict.fromkeys((requested, target.model, target.name)))
        denied = (self._check_name("provider", "providers", target.provider,
                                   self._providers_deny, self._providers_allow)
                  or self._check_name("model", "models", requested, self._models_deny,
                                      self._models_allow, names, target.name))
        if denied is not None:
            return TargetDecision(target=target.name, allowed=False, rule=denied.rule,
                                  reason=denied.reason)
        return TargetDecision(target=target.name, allowed=True, rule="default.allow_target",
                              reason=f"no rule denies provider {_q(target.provider)} "
                                     f"with model {_q(target.model)}",
                              redact=self._redact if target.hosted else ())

    def evaluate_chat(self, facts: ChatRequestFacts, usage: RateUsage) -> Decision:
        """Allow or deny one chat call; the first denying rule decides (module docs)."""
        targets = facts.targets or (TargetFacts(name=facts.model, provider=facts.provider,
                                                model=facts.model, hosted=facts.hosted),)
        verdicts = tuple(self.evaluate_target(facts.model, t) for t in targets)
        shown = verdicts if facts.targets else ()
        allowed = [v for v in verdicts if v.allowed]
        if not allowed:
            first = verdicts[0]
            reasons = list(dict.fromkeys(v.reason for v in verdicts))
            reason = (reasons[0] if len(reasons) == 1 else
                      f"no target of {_q(facts.model)} is allowed: "
                      + "; ".join(f"{v.target}: {v.reason}" for v in verdicts))
            return Decision(allowed=False, rule=first.rule, reason=reason, targets=shown)
        denied = self._check_max_tokens(facts.max_tokens)
        if denied is not None:
            return denied
        for tool in facts.tools:
            decision = self.evaluate_tool(tool)
            if not decision.allowed:
                return decision
        if self._deny_input:
            denied = _first_deny(self._deny_input, facts.input_text, "input")
            if denied is not None:
                return denied
        if self._rates:
            denied = self._check_rates(usage)
            if denied is not None:
                return denied
        cap = self.rules.max_tokens_per_call if facts.max_tokens is None else None
        if facts.targets:
            dropped = len(verdicts) - len(allowed)
            reason = (f"no rule denies model {_q(facts.model)} through "
                      f"{_listing(tuple(v.target for v in allowed))}"
                      + (f" ({dropped} target{'s' if dropped > 1 else ''} dropped)"
                         if dropped else ""))
        else:
            reason = (f"no rule denies model {_q(facts.model)} "
                      f"from provider {_q(facts.provider)}")
        redact = self._redact if any(v.redact for v in allowed) else ()
        return Decision(allowed=True, rule="default.allow_chat", reason=reason,
                        redact=redact, max_tokens=cap, targets=shown)

    @staticmethod
    def _check_name(what: str, rule: str, name: str, deny: _Globs, allow: _Globs | None,
                    names: tuple[str, ...] = (), target: str | None = None) -> Decision | None:
        """`name` (or any of `names`, the aliases of one target) against deny, then allow."""
        names = names or (name,)
        for alias in names:
            pattern = deny.first_match(alias)
            if pattern is not None:
                return Decision(allowed=False, rule=f"{rule}.deny",
                                reason=f"{what} {_q(alias)} is denied by pattern {_q(pattern)}")
        if allow is not None and allow.first_match(*names) is None:
            shown = _q(name) if len(names) == 1 else f"{_q(name)} (target {_q(target or '')})"
            reason = (f"{what} {shown} is not allowed: the policy allows no {rule}"
                      if not allow.patterns else
                      f"{what} {shown} is not allowed: it matches none of "
                      f"{_listing(allow.patterns)}")
            return Decision(allowed=False, rule=f"{rule}.allow", reason=reason)
        return None

    def _check_max_tokens(self, max_tokens: int | None) -> Decision | None:
        limit = self.rules.max_tokens_per_call
        if limit is not None and max_tokens is not None and max_tokens > limit:
            return Decision(allowed=False, rule="max_tokens_per_call",
                            reason=f"max_tokens {max_tokens} exceeds the limit of "
                                   f"{limit} tokens per call")
        return None

    def _check_rates(self, usage: RateUsage) -> Decision | None:
        for scope, limits in self._rates:
            used = getattr(usage, scope)
            if used is None:
                continue
            limit = limits.calls_per_minute
            if limit is not None and used.calls >= limit:
                return Decision(allowed=False, rule=f"rate.calls_per_minute.{scope}",
                                scope=scope,
                                reason=f"{scope} has made {used.calls} calls in the current "
                                       f"minute; the limit is {limit} calls per minute")
            limit = limits.tokens_per_minute
            if limit is not None and used.tokens >= limit:
                return Decision(allowed=False, rule=f"rate.tokens_per_minute.{scope}",
                                scope=scope,
                                reason=f"{scope} has used {used.tokens} tokens in the current "
                                       f"minute; the limit is {limit} tokens per minute")
        return None

    # -- tools and output ---------------------------------------------------------------

    def evaluate_tool(self, tool_name: str) -> Decision:
        """Tools need permission: allowed only by a `tools_allow` pattern."""
        if self._tools_allow is None:
            return Decision(allowed=False, rule="default.deny_tools",
                            reason=f"tool {_q(tool_name)} is not allowed: the policy allows "
                                   f"no tools (tools_allow is not set)")
        pattern = self._tools_allow.first_match(tool_name)
        if pattern is None:
            reason = (f"tool {_q(tool_name)} is not allowed: tools_allow is empty"
                      if not self._tools_allow.patterns else
                      f"tool {_q(tool_name)} is not allowed: it matches none of "
                      f"{_listing(self._tools_allow.patterns)}")
            return Decision(allowed=False, rule="default.deny_tools", reason=reason)
        return Decision(allowed=True, rule="tools.allow",
                        reason=f"tool {_q(tool_name)} is allowed by pattern {_q(pattern)}")

    def check_output(self, text: str) -> Decision:
        """Deny model output that matches a `content.deny_output` pattern."""
        if self._deny_output:
            denied = _first_deny(self._deny_output, text, "output")
            if denied is not None:
                return denied
        return Decision(allowed=True, rule="default.allow_output",
                        reason="no content rule denies this output")

    # -- redaction ----------------------------------------------------------------------

    def redact(self, text: str) -> tuple[str, list[str]]:
        """`text` with the policy's `content.redact` kinds replaced (see `redact_text`)."""
        return redact_text(text, self._redact)


def _first_deny(patterns: tuple[tuple[str, Any], ...], text: str,
                where: Literal["input", "output"]) -> Decision | None:
    # UTF-8 once, not once per pattern (RE2 scans bytes; a lone surrogate becomes "?")
    data = text.encode("utf-8", "replace")
    for i, (source, regex) in enumerate(patterns):
        if regex.search(data) is not None:
            return Decision(allowed=False, rule=f"content.{where}.deny[{i}]",
                            reason=f"{where} text matches deny pattern {_q(source)} "
                                   f"(content.deny_{where}[{i}])")
    return None


def compile_policy(rules: PolicyRules) -> CompiledPolicy:
    """Validate and compile; raises `PolicyError` listing every `validate_rules` problem."""
    problems = validate_rules(rules)
    if problems:
        raise PolicyError(problems)
    return CompiledPolicy(rules)


# -- redaction ----------------------------------------------------------------------------
# Placeholders are inert: no pattern below can match "[", ":" or "]", and the words in
# a placeholder are too short or lack what each pattern needs. Passes run in a fixed
# order and repeat until nothing changes, so redaction is idempotent by construction.
# Each pattern only runs when a cheap necessary condition holds (an "@", enough digits,
# a long enough run of non-spaces, a keyword), so plain prose costs a few string scans.

_PLACEHOLDER = {kind: f"[REDACTED:{kind}]" for kind in REDACT_KINDS}

_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_MAX_PEM = 16384
# Every one of these is at least 15 characters without a space.
_KEY_PREFIXED = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:sk|rk|pk)[-_][A-Za-z0-9_-]{20,}"  # OpenAI sk-..., Anthropic sk-ant-..., Stripe
    r"|nx_[A-Za-z0-9_-]{16,}"  # Nexus API keys
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[A-Za-z0-9_-]{35}"  # Google
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r")")
_MIN_PREFIXED_KEY = 15
# Keep the scheme or the name, redact the value (group "v" or "w"). ASCII-only case
# folding, so that the keyword check on `text.lower()` is exact.
_KEY_CONTEXT = re.compile(
    r"(?<![A-Za-z])[Bb]earer[ \t]+(?=[A-Za-z._~+/-]*[0-9])(?P<v>[A-Za-z0-9._~+/-]{16,}=*)"
    r"|(?ai:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|passw(?:or)?d)"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?(?P<w>[A-Za-z0-9_~+/.=-]{8,})")
_CONTEXT_WORDS = ("bearer", "api", "access", "secret", "token", "passw")
_KEY_GENERIC = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
_MIN_GENERIC_KEY = 32

# Numeric patterns start with a character (class), then look behind it: the same as a
# look-behind first, but lets `re` skip quickly to candidate positions (2-3x faster).
# A maximal run of 13+ digits, single spaces or hyphens between them:
_CARD_RUN = re.compile(r"[0-9](?<![0-9].)(?:[ -]?[0-9]){12,}(?![0-9])")
_MIN_CARD_DIGITS = 13
# "+", a country code, perhaps "(area)", then digits each perhaps after " .-"; 8 to 17
# digits in all (checked by `_intl_phone`):
_PHONE_INTL = re.compile(r"\+(?<![A-Za-z0-9+].)[0-9]{1,4}(?:[ .-]?\([0-9]{1,4}\))?"
                         r"(?:[ .-]?[0-9]){5,13}(?![0-9])")
# "(555) 123-4567", "555-123-4567", "555.123.4567", "555 123 4567":
_PHONE_NANP = re.compile(r"[(0-9](?<![A-Za-z0-9+(.-].)"
                         r"(?:(?<=\()[0-9]{3}\)[ ]?|(?<=[0-9])[0-9]{2}[-. ])"
                         r"[0-9]{3}[-. ][0-9]{4}(?![0-9])")
_MIN_PHONE_DIGITS = 8


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _redact_card_run(m: re.Match[str]) -> str:
    """Within a run of digit groups, redact the spans that are card numbers.

    A card is one group of 13 to 19 digits, or consecutive groups joined by one kind
    of separator whose first group has 4 digits and the others 3 to 6 (4-4-4-4,
    4-6-5, 4-4-4-4-3...), 13 to 19 digits in all; either way it must pass the Luhn
    check. Longest spans first.
    """
    parts = re.split(r"([ -])", m.group())  # groups at even indexes, separators between
    groups, seps = parts[0::2], parts[1::2]
    out: list[str] = []
    i = 0
    while i < len(groups):
        end = _card_end(groups, seps, i)
        if end is None:
            out.append(groups[i])
            if i < len(seps):
                out.append(seps[i])
            i += 1
            continue
        out.append(_PLACEHOLDER["card"])
        if end < len(seps):
            out.append(seps[end])
        i = end + 1
    return "".join(out)


def _card_end(groups: list[str], seps: list[str], start: int) -> int | None:
    """The last group index of a card starting at group `start`, or None."""
    first = groups[start]
    if 13 <= len(first) <= 19 and _luhn_ok(first):
        return start
    if len(first) != 4:
        return None
    candidates: list[int] = []
    total = 4
    for j in range(start + 1, len(groups)):
        if not 3 <= len(groups[j]) <= 6 or seps[j - 1] != seps[start]:
            break
        total += len(groups[j])
        if total > 19:
            break
        if total >= 13:
            candidates.append(j)
    for j in reversed(candidates):
        if _luhn_ok("".join(groups[start:j + 1])):
            return j
    return None


_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = frozenset("0123456789")


def _looks_random(token: str) -> bool:
    """A long token that looks like a secret rather than a word, path or hash.

    Needs digits, upper and lower case (so hex hashes, UUIDs and snake_case are not
    secrets), few adjacent lowercase letters (camelCase identifiers and paths have
    many; random base62 about 18%) and some entropy (not `aB1aB1aB1...`).
    """
    chars = set(token)
    if not (chars & _DIGITS and chars & _UPPER and chars & _LOWER):
        return False
    lower_pairs = sum(1 for a, b in zip(token, token[1:]) if a in _LOWER and b in _LOWER)
    if lower_pairs > 0.4 * (len(token) - 1):
        return False
    n = len(token)
    entropy = -sum(k / n * math.log2(k / n) for k in Counter(token).values())
    return entropy >= 3.5


def _redact_pem(text: str) -> str:
    """PEM private key blocks, BEGIN to END (at most `_MAX_PEM` characters), found with
    `str.find` rather than a lazy regex, which would rescan after every lone BEGIN."""
    out: list[str] = []
    pos = 0
    for begin in _PEM_BEGIN.finditer(text):
        if begin.start() < pos:
            continue
        end = _PEM_END.search(text, begin.end(), begin.start() + _MAX_PEM)
        if end is None:
            continue
        out += (text[pos:begin.start()], _PLACEHOLDER["api_key"])
        pos = end.end()
    return "".join(out) + text[pos:] if out else text


def _intl_phone(m: re.Match[str]) -> str:
    digits = sum(ch in _DIGITS for ch in m.group())
    return _PLACEHOLDER["phone"] if digits >= _MIN_PHONE_DIGITS else m.group()


def _replace_value(m: re.Match[str]) -> str:
    group = "v" if m.group("v") is not None else "w"
    whole, base = m.group(), m.start()
    return whole[: m.start(group) - base] + _PLACEHOLDER["api_key"] + whole[m.end(group) - base:]


def _generic_key(m: re.Match[str]) -> str:
    return _PLACEHOLDER["api_key"] if _looks_random(m.group()) else m.group()


def _redact_once(text: str, kinds: frozenset[str]) -> tuple[str, set[str]]:
    """One round of every pass, in order: e-mail addresses first (a key-like local part
    goes with its address), then keys (they contain digit runs), cards, phones."""
    found: set[str] = set()

    def apply(kind: str, regex: re.Pattern[str] | None, repl: Any) -> None:
        nonlocal text
        new = regex.sub(repl, text) if regex is not None else repl(text)
        if new != text:
            text = new
            found.add(kind)

    if "email" in kinds and "@" in text:
        apply("email", _EMAIL, _PLACEHOLDER["email"])
    if "api_key" in kinds:
        if "-----BEGIN " in text:
            apply("api_key", None, _redact_pem)
        longest = max(map(len, text.split()), default=0)
        if longest >= _MIN_PREFIXED_KEY:
            apply("api_key", _KEY_PREFIXED, _PLACEHOLDER["api_key"])
        lowered = text.lower()
        if any(word in lowered for word in _CONTEXT_WORDS):
            apply("api_key", _KEY_CONTEXT, _replace_value)
        if longest >= _MIN_GENERIC_KEY:
            apply("api_key", _KEY_GENERIC, _generic_key)
    if "card" in kinds or "phone" in kinds:
        digits = sum(map(text.count, "0123456789"))
        if "card" in kinds and digits >= _MIN_CARD_DIGITS:
            apply("card", _CARD_RUN, _redact_card_run)
            digits = sum(map(text.count, "0123456789"))
        if "phone" in kinds and digits >= _MIN_PHONE_DIGITS:
            if "+" in text:
                apply("phone", _PHONE_INTL, _intl_phone)
            apply("phone", _PHONE_NANP, _PLACEHOLDER["phone"])
    return text, found


def redact_text(text: str, kinds: Iterable[str] = REDACT_KINDS) -> tuple[str, list[str]]:
    """Replace secrets of `kinds` by `[REDACTED:<kind>]`.

    Returns the redacted text and the kinds found (in `REDACT_KINDS` order, each
    once); never the secrets themselves. Idempotent: redacting the result again
    changes nothing (rounds repeat until one changes nothing).
    """
    wanted = frozenset((kinds,) if isinstance(kinds, str) else kinds)
    found: set[str] = set()
    for _ in range(16):  # in practice one round, two when something was redacted
        text, new = _redact_once(text, wanted)
        if not new:
            break
        found |= new
    return text, [kind for kind in REDACT_KINDS if kind in found]


def redact_kinds(text: str, kinds: Iterable[str]) -> str:
    """`redact_text` without the report: a redactor `(text, kinds) -> text` (as the
    provider service applies `Decision.redact` to messages for hosted targets)."""
    return redact_text(text, kinds)[0]
