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
  glob patterns (`fnmatch`: `*`, `?`, `[seq]`, `[!seq]`) matched against the whole
  name, case-insensitively. An `*_allow` of `None` means "any" for models and
  providers; for tools it means "none" (tools need permission, see below). An empty
  list allows nothing.
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
  apply to the request (no API key, no session): its limits are skipped.
- `content.deny_input` / `content.deny_output`: regular expressions (Python `re`,
  searched anywhere in the text; `(?i)` for case-insensitive). Input rules see the
  request's text before any redaction. Checked when compiling: a pattern must compile,
  and nested unbounded repetition such as `(a+)+` is refused because it can take
  exponential time. A leading `.*` is dropped when compiling (it never changes
  whether a pattern occurs, but makes a search quadratic in the text).
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
1. `providers.deny`, then `providers.allow`
2. `models.deny`, then `models.allow`  (a deny pattern wins over an allow pattern)
3. `max_tokens_per_call`
4. the tools the request offers, in order: `default.deny_tools` for the first not allowed
5. `content.input.deny[i]`, the first matching pattern in declared order
6. rate limits: tenant, then key, then session; within a scope calls before tokens
   (`rate.calls_per_minute.<scope>`, `rate.tokens_per_minute.<scope>`)
7. otherwise `default.allow_chat`

Permanent denials (who, what, how much, which content) come before rate limits, so a
request that can never succeed is not told to retry later.

An allowed chat decision carries the caller's obligations: `redact` (the kinds to
redact with `CompiledPolicy.redact` before the text leaves; empty unless
`facts.hosted`) and `max_tokens` (the cap to send when the request gave none).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec

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


class ChatRequestFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy needs to know about one chat call."""

    model: str
    provider: str
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


class Decision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    allowed: bool
    rule: str  # stable rule id, e.g. "models.deny", "rate.calls_per_minute.session"
    reason: str  # for humans
    scope: Scope | None = None  # rate-limit decisions only
    redact: tuple[RedactKind, ...] = ()  # allowed chat: kinds to redact before sending
    max_tokens: int | None = None  # allowed chat: cap to send when the request set none


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
            _check_strings(name, value, MAX_GLOB_LENGTH, problems, None)
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


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regex: {exc}"
    if _has_nested_unbounded_repeat(pattern):
        return ("nested unbounded repetition (like '(a+)+') can take exponential time; "
                "rewrite it so that no repeated group itself repeats without bound")
    return None


def _has_nested_unbounded_repeat(pattern: str) -> bool:
    """True when an unbounded repeat sits inside another one, e.g. `(a+)+`, `(\\w*\\s)*`.

    Conservative: some such patterns are harmless, but the ones that backtrack
    exponentially all have this shape (overlapping alternations aside).
    """
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as p  # type: ignore[attr-defined]

        tree = p.parse(pattern)
    except Exception:  # noqa: BLE001 - internals moved: skip the check, never fail on it
        return False

    def walk(items: Any, inside: bool) -> bool:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                unbounded = av[1] == c.MAXREPEAT
                if (unbounded and inside) or walk(av[2], inside or unbounded):
                    return True
            elif op is getattr(c, "POSSESSIVE_REPEAT", None) or op is getattr(
                    c, "ATOMIC_GROUP", None):
                body = av[2] if op is getattr(c, "POSSESSIVE_REPEAT", None) else av
                if walk(body, False):  # no backtracking into it
                    return True
            elif op is c.SUBPATTERN:
                if walk(av[3], inside):
                    return True
            elif op is c.BRANCH:
                if any(walk(branch, inside) for branch in av[1]):
                    return True
            elif op in (c.ASSERT, c.ASSERT_NOT):
                if walk(av[1], inside):
                    return True
            elif op is c.GROUPREF_EXISTS:
                if walk(av[1], inside) or (av[2] is not None and walk(av[2], inside)):
                    return True
        return False

    return walk(tree, False)


_LEADING_DOT_STAR = re.compile(r"^((?:\(\?[aiLmsux]+\))*)((?:\.\*\??(?![+?*{]))+)")


def _search_form(pattern: str) -> str:
    """`pattern` without a leading `.*` (same matches for `search`, linear time)."""
    return _LEADING_DOT_STAR.sub(r"\1", pattern, count=1)


# -- compiled policy ----------------------------------------------------------------------


class _Globs:
    """Glob patterns compiled into one case-insensitive regex; reports which matched."""

    __slots__ = ("patterns", "_regex")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = tuple(patterns)
        alternatives = "|".join(f"(?P<g{i}>{fnmatch.translate(p)})"
                                for i, p in enumerate(self.patterns))
        self._regex = re.compile(alternatives, re.IGNORECASE) if self.patterns else None

    def first_match(self, name: str) -> str | None:
        """The first pattern, in declared order, that matches `name`."""
        if self._regex is None:
            return None
        m = self._regex.match(name)
        return None if m is None else self.patterns[int(m.lastgroup[1:])]  # type: ignore[index]


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
        self._deny_input = tuple((p, re.compile(_search_form(p)))
                                 for p in rules.content.deny_input)
        self._deny_output = tuple((p, re.compile(_search_form(p)))
                                  for p in rules.content.deny_output)
        self._rates: tuple[tuple[Scope, RateLimits], ...] = tuple(
            (scope, limits) for scope in SCOPES
            if (limits := getattr(rules, f"rate_per_{scope}")) is not None
            and (limits.calls_per_minute is not None or limits.tokens_per_minute is not None))
        #: scopes with a declared limit, the only ones whose usage the caller must count
        self.rate_scopes: tuple[Scope, ...] = tuple(scope for scope, _ in self._rates)
        self._redact = tuple(dict.fromkeys(rules.content.redact))

    # -- chat ---------------------------------------------------------------------------

    def evaluate_chat(self, facts: ChatRequestFacts, usage: RateUsage) -> Decision:
        """Allow or deny one chat call; the first denying rule decides (module docs)."""
        denied = (self._check_name("provider", "providers", facts.provider,
                                   self._providers_deny, self._providers_allow)
                  or self._check_name("model", "models", facts.model,
                                      self._models_deny, self._models_allow)
                  or self._check_max_tokens(facts.max_tokens))
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
        return Decision(allowed=True, rule="default.allow_chat",
                        reason=f"no rule denies model {_q(facts.model)} "
                               f"from provider {_q(facts.provider)}",
                        redact=self._redact if facts.hosted else (), max_tokens=cap)

    @staticmethod
    def _check_name(what: str, rule: str, name: str, deny: _Globs,
                    allow: _Globs | None) -> Decision | None:
        pattern = deny.first_match(name)
        if pattern is not None:
            return Decision(allowed=False, rule=f"{rule}.deny",
                            reason=f"{what} {_q(name)} is denied by pattern {_q(pattern)}")
        if allow is not None and allow.first_match(name) is None:
            reason = (f"{what} {_q(name)} is not allowed: the policy allows no {rule}"
                      if not allow.patterns else
                      f"{what} {_q(name)} is not allowed: it matches none of "
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


def _first_deny(patterns: tuple[tuple[str, re.Pattern[str]], ...], text: str,
                where: Literal["input", "output"]) -> Decision | None:
    for i, (source, regex) in enumerate(patterns):
        if regex.search(text) is not None:
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
