"""The API contract: text refused at the edge, and what the OpenAPI document declares
beyond what the handlers' msgspec types already give it.

* `reject_unstorable_text` (a `before_request` hook): a NUL character, the one text
  Postgres cannot store, in a path parameter, query parameter, header or anywhere in a
  JSON body is a 400 problem naming the field, before any handler runs (never a 500).
* `complete_openapi` finishes the generated document once, when the app is built: every
  operation declares each error status it can answer (as `application/problem+json`
  with the `ProblemOut` schema), input objects that refuse unknown members say so
  (`additionalProperties: false`), policy rules are described by their msgspec type
  (`PolicyRules`), streaming answers declare `text/event-stream`, and links chain create
  operations to the reads of what they created (Schemathesis' stateful phase follows them).
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
import re

from litestar import Litestar, Request, Response
from litestar._openapi.plugin import OpenAPIPlugin

from shared.domain.policy import PolicyRules
from services.orchestrator import schemas
from services.orchestrator.problems import PROBLEM_JSON, Problem

NUL = "\x00"
NO_NUL = "^[^\\u0000]*$"  # declared on every text input without a pattern of its own
_TYPED = re.compile(r":[a-z]+}")  # `{session_id:str}` -> `{session_id}`
ALLOW: dict[str, list[str]] = {}  # path template -> methods, filled from the document


def _nul_at(value: Any, path: str) -> str | None:
    """The dotted path of the first string (or key) holding a NUL, or None."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if NUL in str(key):
                return inner
            if (found := _nul_at(item, inner)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _nul_at(item, f"{path}[{i}]")) is not None:
                return found
    return None


def _no_nul(schema: Any) -> None:
    """Declare the NUL refusal on every text schema of an input without a pattern."""
    if isinstance(schema, list):
        for item in schema:
            _no_nul(item)
    elif isinstance(schema, dict):
        if schema.get("type") == "string" and not {"pattern", "enum", "const", "format"} & set(schema):
            schema["pattern"] = NO_NUL
        for value in schema.values():
            _no_nul(value)


def _refuse(field: str) -> Problem:
    message = "contains a NUL character (U+0000), which is not accepted in text"
    return Problem(400, "validation", f"{field}: {message}",
                   errors=[{"field": field, "message": message}])


async def reject_unstorable_text(request: Request) -> Response | None:
    if request.method == "OPTIONS":  # Allow: exactly the methods the document lists
        allowed = ALLOW.get(_TYPED.sub("}", request.scope.get("path_template", "")))
        if allowed:
            return Response(None, status_code=204, headers={"Allow": ", ".join(allowed)})
    # Each part is searched for a NUL in its raw form first (the decoded path, the query
    # string where a NUL can only come escaped, the header bytes): only a part that
    # holds one is parsed to name the field, so a request without any builds nothing.
    scope = request.scope
    if NUL in scope.get("path", ""):
        for name, value in request.path_params.items():
            if isinstance(value, str) and NUL in value:
                raise _refuse(name)
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in request.query_params.multi_items():
            if NUL in name or NUL in value:
                raise _refuse(name.replace(NUL, "\\0"))
    if any(b"\x00" in value for _, value in scope.get("headers", ())):
        for name, value in request.headers.items():
            if NUL in value:
                raise _refuse(name)
    if request.method in ("POST", "PUT", "PATCH"):
        body = await request.body()  # cached: the handler decodes the same bytes
        if b"\\u0000" in body:  # a JSON body can only carry a NUL escaped
            try:
                decoded = msgspec.json.decode(body)
            except msgspec.DecodeError:
                return  # not JSON: the handler's decoding answers the 400
            if (found := _nul_at(decoded, "")) is not None:
                raise _refuse(found or "body")


# -- the OpenAPI document -----------------------------------------------------------------

PROBLEM_REF = {"$ref": "#/components/schemas/ProblemOut"}
DESCRIPTIONS = {
    400: "The request is malformed: the problem names each field (`errors`)",
    401: "No API key, or an invalid or revoked one",
    402: "A budget the call is charged to is exhausted (`budget`)",
    403: "The key may not do this (an admin or the platform key is needed), or the policy "
         "denies it (`rule`)",
    404: "No such resource for this tenant (another tenant's is not found either)",
    409: "A conflict: the session is closed or changing, or a request with this "
         "Idempotency-Key is still running (retry after `Retry-After`)",
    413: "The body is larger than NEXUS_MAX_BODY_BYTES",
    422: "This Idempotency-Key was used before with another request, or the input breaks a "
         "rule (a tool definition, arguments failing the tool's schema): `rule`, `errors`",
    429: "A rate limit of the policy (`rule`); retry later",
    502: "The model's upstream failed and no fallback answered",
    503: "A dependency (provider, Postgres, NATS) is unavailable; retry after `Retry-After`",
    504: "The model's upstream did not answer in time",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "string"}}}
HEADERS = {401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
           409: RETRY_AFTER, 429: RETRY_AFTER, 503: RETRY_AFTER}
CHAT = {402, 403, 404, 409, 422, 429, 502, 503, 504}
# statuses beyond the common ones (400, 401, 503; 404 with an id in the path; 413 with a body)
EXTRA: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/keys"): {403, 422},
    ("get", "/v1/keys"): {403},
    ("delete", "/v1/keys/{key_id}"): {403},
    ("post", "/v1/policies"): {403, 409, 422},
    ("delete", "/v1/nodes/{node_id}"): {403},
    ("post", "/v1/nodes/{node_id}/drain"): {403, 409},  # operator drain (issue 15)
    ("post", "/v1/nodes/{node_id}/undrain"): {403, 409},
    ("put", "/v1/tenants/{tenant}/budget"): {403, 409, 422},
    ("post", "/v1/sessions"): {422},
    ("post", "/v1/sessions/{session_id}/close"): {409},
    ("post", "/v1/chat/completions"): CHAT,
    ("post", "/v1/sessions/{session_id}/messages"): CHAT,
    ("post", "/v1/tools"): {403, 409, 422},
    ("post", "/v1/sessions/{session_id}/tools/{name}/invoke"): {403, 409, 422, 429},
    ("post", "/v1/sessions/{session_id}/tool-calls/{call_id}/approval"): {403, 409, 422},
    ("put", "/v1/secrets/{name}"): {403, 409},
    ("get", "/v1/secrets"): {403},
    ("delete", "/v1/secrets/{name}"): {403},
    ("post", "/v1/mcp-servers"): {409, 422, 502, 504},
    ("delete", "/v1/mcp-servers/{name}"): {409},
    ("post", "/v1/agents"): {403, 409, 422},
    # model distribution (issue 14): the platform's; 409 names the node and the reason
    ("get", "/v1/models/available"): {403},
    ("post", "/v1/models/distribute"): {403, 404, 409},
    ("get", "/v1/nodes/{node_id}/models"): {403},
    ("post", "/v1/nodes/{node_id}/models/pull"): {403, 409},
    ("delete", "/v1/nodes/{node_id}/models/{model}"): {403, 409},
    ("get", "/v1/tasks"): {403},
    ("get", "/v1/tasks/{task_id}"): {403},
    ("delete", "/v1/tasks/{task_id}"): {403},
    ("get", "/v1/tasks/{task_id}/stream"): {403},
    # skills and adaptive routing (issue 13)
    ("post", "/v1/skills"): {403, 409, 422},
    ("post", "/v1/calls/{call_id}/feedback"): {409},
    ("post", "/v1/replays"): {403},
    # agent runs (issue 12: RUNS)
    ("post", "/v1/sessions/{session_id}/runs"): {409, 422},
    ("post", "/v1/runs/{run_id}/cancel"): {409},
    ("post", "/v1/runs/{run_id}/approvals"): {403, 409},
}
OWNED_IDS = ("{session_id}", "{key_id}", "{node_id}", "{name}", "{call_id}", "{task_id}", "{model}",
             "{run_id}")
PUBLIC = ("/health", "/schema")
# bodies a handler reads itself (several media types): declared here
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/agents"): {"required": True, "description": "the agent file (markdown with "
                             "YAML front matter), or JSON {markdown}", "content": {
        "text/markdown": {"schema": {"type": "string", "minLength": 1,
                                     "maxLength": schemas.AGENT_MARKDOWN_MAX}},
        "application/json": {"schema": {"$ref": "#/components/schemas/AgentIn"}}}},
}
STREAMING = {("post", "/v1/chat/completions"), ("post", "/v1/sessions/{session_id}/messages")}
OPTIONAL_BODY = {("post", "/v1/sessions/{session_id}/close")}  # `data: ... | None = None`
# each event's data: a JSON object (the OpenAI stream ends with the text `[DONE]`)
SSE_DATA = {"/v1/chat/completions": {"anyOf": [{"type": "object"}, {"type": "string"}]},
            "/v1/sessions/{session_id}/messages": {"type": "object"}}
# create operation -> the reads of what it created (response field -> path parameter)
LINKS: dict[tuple[str, str, str], list[tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/sessions", "201"): [
        (m, p, {"session_id": "$response.body#/session_id"}) for m, p in (
            ("get", "/v1/sessions/{session_id}"), ("post", "/v1/sessions/{session_id}/close"),
            ("get", "/v1/sessions/{session_id}/events"),
            ("get", "/v1/sessions/{session_id}/messages"),
            ("post", "/v1/sessions/{session_id}/messages"),
            ("get", "/v1/sessions/{session_id}/budget"),
            ("get", "/v1/sessions/{session_id}/runs"), ("post", "/v1/sessions/{session_id}/runs"))],
    ("post", "/v1/keys", "201"): [("delete", "/v1/keys/{key_id}",
                                   {"key_id": "$response.body#/key_id"})],
    ("post", "/v1/chat/completions", "200"): [
        ("get", "/v1/sessions/{session_id}", {"session_id": "$response.header.X-Nexus-Session"}),
        ("get", "/v1/sessions/{session_id}/messages",
         {"session_id": "$response.header.X-Nexus-Session"}),
        *[(m, p, {"call_id": "$response.header.X-Nexus-Call-Id"}) for m, p in (
            ("get", "/v1/calls/{call_id}/explain"), ("post", "/v1/calls/{call_id}/feedback"))]],
    # what a create made, read back by its name or id (the stateful phase chains these)
    **{("post", f"/v1/{kind}", "201"): [("get", f"/v1/{kind}/{{name}}",
                                        {"name": "$response.body#/name"})]
       for kind in ("tools", "agents", "skills")},
    ("put", "/v1/secrets/{name}", "200"): [("delete", "/v1/secrets/{name}",
                                            {"name": "$response.body#/name"})],
    ("post", "/v1/sessions/{session_id}/runs", "202"): [
        *[(m, p, {"run_id": "$response.body#/run_id"}) for m, p in (
            ("get", "/v1/runs/{run_id}"), ("get", "/v1/runs/{run_id}/stream"),
            ("post", "/v1/runs/{run_id}/cancel"), ("post", "/v1/runs/{run_id}/approvals"))],
        ("get", "/v1/sessions/{session_id}/runs", {"session_id": "$response.body#/session_id"})],
    **{("post", "/v1/sessions/{session_id}/tools/{name}/invoke", status): [
        (m, "/v1/sessions/{session_id}/tool-calls/{call_id}" + tail,
         {"session_id": "$response.body#/session_id", "call_id": "$response.body#/tool_call_id"})
        for m, tail in (("get", ""), ("post", "/approval"))] for status in ("200", "202")},
    ("post", "/v1/nodes/{node_id}/models/pull", "202"): [
        (m, p, {"task_id": "$response.body#/task_id"}) for m, p in (
            ("get", "/v1/tasks/{task_id}"), ("get", "/v1/tasks/{task_id}/stream"),
            ("delete", "/v1/tasks/{task_id}"))],
    ("post", "/v1/mcp-servers", "201"): [(m, "/v1/mcp-servers/{name}",
                                          {"name": "$response.body#/name"})
                                         for m in ("get", "delete")],
    ("get", "/v1/nodes", "200"): [("get", "/v1/nodes/{node_id}",
                                   {"node_id": "$response.body#/nodes/0/node_id"}),
                                  ("get", "/v1/nodes/{node_id}/models",
                                   {"node_id": "$response.body#/nodes/0/node_id"})],
    ("post", "/v1/models/distribute", "202"): [
        (m, p, {"task_id": "$response.body#/task_ids/0"}) for m, p in (
            ("get", "/v1/tasks/{task_id}"), ("get", "/v1/tasks/{task_id}/stream"),
            ("delete", "/v1/tasks/{task_id}"))],
}
# values that pass the checks a schema cannot say (a system agent, the default route, a
# builtin tool), so generated requests reach what exists and the links above fire
EXAMPLES = {("RunIn", "agent"): "research", ("ChatCompletionIn", "model"): "default"}
PATH_EXAMPLES = {("post", "/v1/sessions/{session_id}/tools/{name}/invoke", "name"): "python"}
CHAT_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
                   "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                  "created": {"type": "integer"}, "model": {"type": "string"},
                                  "choices": {"type": "array", "items": {"type": "object"}},
                                  "usage": {"type": "object"}}}


def statuses(method: str, path: str, op: dict[str, Any]) -> set[int]:
    if path.startswith(PUBLIC):
        return set()
    found = {400, 401, 503} | EXTRA.get((method, path), set())
    if any(p in path for p in OWNED_IDS):
        found.add(404)
    if "requestBody" in op:
        found.add(413)
    return found


def _strict_inputs() -> list[str]:
    """Names of the input types that refuse unknown members."""
    types = [t for _, t in inspect.getmembers(schemas, inspect.isclass)
             if issubclass(t, msgspec.Struct) and t.__module__ == schemas.__name__]
    return [t.__name__ for t in types if t.__struct_config__.forbid_unknown_fields]


def complete_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = msgspec.json.schema_components(
        [schemas.ProblemOut, schemas.SessionReply, PolicyRules, schemas.AgentIn],
        ref_template="#/components/schemas/{name}")
    for name, schema in defs.items():
        components.setdefault(name, schema)
    for name in _strict_inputs():
        if name in components:
            components[name]["additionalProperties"] = False
    for name in [*_strict_inputs(), "PolicyRules", "ContentRules", "RateLimits"]:
        _no_nul(components.get(name))
    if "McpServerIn" in components:  # `headers`: what msgspec checks of keys and values
        components["McpServerIn"]["properties"]["headers"].update(
            propertyNames={"pattern": schemas.HEADER_NAME}, maxProperties=32,
            additionalProperties={"type": "string", "pattern": schemas.SECRET_NAME})
    for (schema, prop), value in EXAMPLES.items():
        if prop in components.get(schema, {}).get("properties", {}):
            components[schema]["properties"][prop]["examples"] = [value]
    rules_ref = {"$ref": "#/components/schemas/PolicyRules"}
    if "PolicyIn" in components:
        components["PolicyIn"]["properties"]["rules"] = rules_ref
    if "SessionCreate" in components:
        components["SessionCreate"]["properties"]["policy_rules"] = {
            "oneOf": [rules_ref, {"type": "null"}]}
    op_ids = {(m, p): op.get("operationId") for p, item in doc["paths"].items()
              for m, op in item.items() if isinstance(op, dict)}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            ALLOW.setdefault(path, ["OPTIONS"]).insert(-1, method.upper())
            for parameter in op.get("parameters", []):
                _no_nul(parameter.get("schema"))
                if (example := PATH_EXAMPLES.get((method, path, parameter.get("name")))):
                    parameter.setdefault("schema", {})["examples"] = [example]
            if (method, path) in BODIES:
                op["requestBody"] = BODIES[(method, path)]
            for status in sorted(statuses(method, path, op)):
                responses[str(status)] = {
                    "description": DESCRIPTIONS[status],
                    "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}},
                    **({"headers": HEADERS[status]} if status in HEADERS else {})}
            if (method, path) in OPTIONAL_BODY and "requestBody" in op:
                op["requestBody"]["required"] = False
            if (method, path) in STREAMING:
                ok = responses["200"]
                ok["content"] = {"application/json": {"schema": CHAT_COMPLETION
                                 if path == "/v1/chat/completions"
                                 else {"$ref": "#/components/schemas/SessionReply"}},
                                 "text/event-stream": {"schema": SSE_DATA[path]}}
            for (m, p, status), targets in LINKS.items():
                if (m, p) == (method, path) and status in responses:
                    responses[status]["links"] = {
                        op_ids[(tm, tp)]: {"operationId": op_ids[(tm, tp)], "parameters": params}
                        for tm, tp, params in targets if op_ids.get((tm, tp))}
    return doc


def with_contract(app: Litestar) -> Litestar:
    """Complete the app's OpenAPI document (built now, once; served as completed)."""
    complete_openapi(app.plugins.get(OpenAPIPlugin).provide_openapi_schema())
    return app
