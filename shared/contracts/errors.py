"""Domain errors: what a use case refuses, in its own words, whatever the caller.

The call lifecycle (and, next, the agent runner) raises these; the HTTP edge maps
each to problem+json in one place (`services/orchestrator/problems.py`), another
caller maps them to its own answers. They carry facts (rule, budget, field), never
HTTP statuses.
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every domain error; `detail` says what happened, for humans."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(NexusError):
    """A request a caller must fix; `errors` name each field (`field`, `message`)."""

    def __init__(self, detail: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []


class UnknownModel(NexusError):
    def __init__(self, model: str, known: tuple[str, ...]) -> None:
        super().__init__(f"model {model!r} is not served here; "
                         f"known: {', '.join(sorted(known)) or 'none'}")
        self.model = model
        self.known = known


class SessionClosed(NexusError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} is closed")
        self.session_id = session_id


class PolicyDenied(NexusError):
    """The session's policy refused the call (or its answer): `rule` decided."""

    def __init__(self, rule: str, reason: str, policy: str | None = None) -> None:
        super().__init__(reason)
        self.rule = rule
        self.policy = policy

    @property
    def rate_limited(self) -> bool:
        """Denied by a per-minute limit: worth retrying later."""
        return self.rule.startswith("rate.")


class PolicyInvalid(NexusError):
    """A stored policy that no longer compiles; `problems` name its fields."""

    def __init__(self, detail: str, policy: str, problems: list[str]) -> None:
        super().__init__(detail)
        self.policy = policy
        self.problems = problems


class BudgetDenied(NexusError):
    """A reservation the budget cannot cover; `budget` is `session`, `tenant` or
    `contention`."""

    def __init__(self, budget: str, reason: str) -> None:
        super().__init__(reason)
        self.budget = budget
        self.reason = reason


class ProviderUnavailable(NexusError):
    """No provider instance answered."""


class CallFailed(NexusError):
    """The call ended without an answer: `error` names why (the provider's kind, e.g.
    `UnknownModel`, `Cancelled`, `Overloaded`), `status` is the status it suggests."""

    def __init__(self, error: str, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.error = error
        self.status = status


class NotFound(NexusError):
    """No such thing for this tenant (another tenant's is not found either): `what`
    is its kind ("tool", "tool call", "secret", ...)."""

    def __init__(self, what: str, name: str) -> None:
        super().__init__(f"{what} {name!r} not found")
        self.what = what
        self.name = name


class Conflict(NexusError):
    """The thing changed meanwhile, or is not in a state that allows this."""


class InvalidEntity(NexusError):
    """Well-formed input that breaks a rule (a tool's schema, arguments failing it):
    `errors` name each field (`field`, `message`); `rule` the rule broken."""

    def __init__(self, detail: str, errors: list[dict[str, str]], rule: str) -> None:
        super().__init__(detail)
        self.errors = errors
        self.rule = rule


class NoNodeAvailable(NexusError):
    """No online, non-draining node can take the work now."""


class McpServerFailed(NexusError):
    """An MCP server did not answer usably (registration's `tools/list`): `reason` is
    the node's (`timeout`, `upstream_error`, `sandbox_error`, ...), `server` its name."""

    def __init__(self, server: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.server = server
        self.reason = reason


# -- model distribution (issue 14) ----------------------------------------------------


class PlacementRefused(NexusError):
    """A model cannot go to a node: `reason` is `node_offline`, `does_not_fit`,
    `unknown_node`, `no_runtime`, ...; `node` names the node (the 409 names both)."""

    def __init__(self, node: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.node = node
        self.reason = reason


# -- agents (definitions) -----------------------------------------------------------------


class AgentInvalid(InvalidEntity):
    """An agent definition (markdown + YAML front matter) that breaks a rule: `errors`
    name each problem's `field`, its `line` in the file and a `message` (a 422)."""

    def __init__(self, errors: list[dict]) -> None:
        detail = "; ".join(f"{e['field']} (line {e.get('line')}): {e['message']}" for e in errors)
        super().__init__(f"invalid agent definition: {detail}", errors, "agent.definition")
