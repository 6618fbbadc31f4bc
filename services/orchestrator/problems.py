"""RFC 9457 problem+json for every error the API returns.

Domain errors (`shared.contracts.errors`, raised by the use cases) are mapped here and
nowhere else (`problem_for`): a handler never builds their problems itself.
Validation errors list each offending field under `errors` (`field`, `message`);
unexpected exceptions become a 500 whose body says nothing about internals but gives
the `trace_id` to find the logs.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from shared.contracts import errors
from shared.infra.eventstore.store import database_unavailable
from shared.infra.messaging import messaging_unavailable
from shared.infra.tracing import current_ids

log = logging.getLogger("nexus.api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://nexus.dev/problems/"
UNAVAILABLE_RETRY_AFTER_S = 2  # Retry-After of a 503 while Postgres or NATS is away


class Problem(HTTPException):
    """Raise in a handler for a specific problem type (`type` is a short slug)."""

    def __init__(self, status: int, slug: str, detail: str, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.slug = slug
        self.extra_fields = extra


def _field_errors(extra: Any) -> list[dict[str, str]]:
    errors = []
    for item in extra if isinstance(extra, list) else []:
        if isinstance(item, dict):
            field = item.get("key") or "body"
            field = "body" if field == "data" else field  # Litestar's name for the whole body
            errors.append({"field": str(field), "message": str(item.get("message", ""))})
    return errors


def problem_response(request: Request, status: int, slug: str, detail: str,
                     **extra: Any) -> Response[dict[str, Any]]:
    trace_id, _ = current_ids()
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "trace_id": trace_id,
        **extra,
    }
    return Response(body, status_code=status, media_type=PROBLEM_JSON)


def http_exception_handler(request: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, Problem):
        response = problem_response(request, exc.status_code, exc.slug, exc.detail,
                                    **exc.extra_fields)
        response.headers.update(exc.headers or {})  # e.g. Retry-After
        return response
    if isinstance(exc, ValidationException):
        errors = _field_errors(exc.extra)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or exc.detail
        return problem_response(request, 400, "validation", detail, errors=errors)
    status = exc.status_code
    slug = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
            405: "method-not-allowed", 413: "body-too-large",
            415: "unsupported-media-type"}.get(status, "http-error")
    response = problem_response(request, status, slug, exc.detail)
    response.headers.update(exc.headers or {})  # e.g. a 405's Allow (RFC 9110)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="nexus"'
    return response


def _field_list(problems: list[str]) -> list[dict[str, str]]:
    return [{"field": p.split(":")[0], "message": p} for p in problems]


def problem_for(error: errors.NexusError) -> Problem:
    """The one mapping of domain errors to problems (status, type, extra members)."""
    match error:
        case errors.InvalidRequest():
            return Problem(400, "validation", error.detail, errors=error.errors)
        case errors.UnknownModel():
            return Problem(404, "unknown-model", error.detail,
                           errors=[{"field": "model", "message": "unknown model"}])
        case errors.SessionClosed():
            return Problem(409, "session-closed", error.detail)
        case errors.PolicyDenied():
            extra = {"policy": error.policy} if error.policy is not None else {}
            return Problem(429 if error.rate_limited else 403, "policy-denied", error.detail,
                           rule=error.rule, **extra)
        case errors.PolicyInvalid():
            return Problem(409, "policy-invalid", error.detail, policy=error.policy,
                           errors=_field_list(error.problems))
        case errors.BudgetDenied():
            return Problem(402, "budget-exceeded", error.reason, budget=error.budget)
        case errors.ProviderUnavailable():
            return Problem(503, "provider-unavailable", error.detail)
        case errors.CallFailed():
            slug = {"UnknownModel": "unknown-model", "Cancelled": "cancelled"}.get(
                error.error, "upstream-failed")
            status = error.status if 400 <= error.status < 600 else 502
            return Problem(status, slug, error.detail)
        case errors.NotFound():
            return Problem(404, "not-found", error.detail)
        case errors.Conflict():
            return Problem(409, "conflict", error.detail)
        case errors.InvalidEntity():
            return Problem(422, "invalid", error.detail, rule=error.rule, errors=error.errors)
        case errors.NoNodeAvailable():
            return Problem(503, "no-node", error.detail, headers={"Retry-After": "2"})
        case errors.PlacementRefused():
            return Problem(409, "placement-refused", error.detail, node=error.node,
                           reason=error.reason)
        case errors.McpServerFailed():
            return Problem(504 if error.reason == "timeout" else 502, "mcp-server-failed",
                           error.detail, server=error.server, reason=error.reason)
    return Problem(500, "internal", "internal error; see logs by trace_id")


def domain_error_handler(request: Request, exc: errors.NexusError) -> Response[dict[str, Any]]:
    return http_exception_handler(request, problem_for(exc))


_UNAVAILABLE = (  # what is away for a moment (a restart, a failover): 503, retry, no 500
    (database_unavailable, "database", "the database"),  # Postgres
    (messaging_unavailable, "messaging", "messaging"),  # NATS, or a request unanswered in time
)


def internal_error_handler(request: Request, exc: Exception) -> Response[dict[str, Any]]:
    for unavailable, what, subject in _UNAVAILABLE:
        if unavailable(exc):
            log.warning("%s unavailable: %s", what, exc, extra={"path": request.url.path})
            response = problem_response(request, 503, f"{what}-unavailable",
                                        f"{subject} is unavailable; retry after a moment")
            response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
            return response
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem_response(request, 500, "internal", "internal error; see logs by trace_id")


EXCEPTION_HANDLERS = {HTTPException: http_exception_handler,
                      errors.NexusError: domain_error_handler,
                      Exception: internal_error_handler}
