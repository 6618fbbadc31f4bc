"""Tools: what a tool is (`ToolSpec`), the builtin catalogue, and the pure decision on a
call. No I/O: the orchestrator's `services/orchestrator/tools.py` applies it.

A tool is a name, a description, a JSON Schema for its arguments (`parameters`), a
`kind` (`builtin`: one of the node's builtins, `http`: an endpoint the tenant declared,
`mcp`: a tool of a registered MCP server), its **permissions** (`network`: "none" or an
allowlist of "host" / "host:port"; `filesystem`: the session workspace "none", "ro" or
"rw", nothing else), its **limits** (`ToolLimits`: timeout, memory, CPU seconds, output
bytes, processes), whether a human must approve each call (`needs_approval`) and its
`effect` (`read_only`, `idempotent`, `side_effecting`: whether a step may run again
after a crash). Secrets are referenced by *name* (HTTP headers), never by value.

Names: a tenant's own tools match `TOOL_NAME` (`^[a-z][a-z0-9_-]{0,63}$`); the builtin
names (`python`, `shell`, `http_fetch`, `files.read`, `files.write`, `files.list`) and
the `mcp.` prefix (`mcp.<server>.<tool>`, the tools of registered MCP servers) are
reserved.

Schemas are checked with `jsonschema_rs` with the linear-time regex engine (a hostile
`pattern` cannot stall a process: look-arounds and back-references are refused when
the tool is defined) and never fetch a remote `$ref`.

`decide_tool_call(spec, policy, arguments)` decides, first denial wins:

1. `tool.arguments`: the arguments fail the tool's schema (each failing field named by
   its JSON pointer under `arguments`, e.g. `arguments/code`);
2. the session policy's `evaluate_tool` (`default.deny_tools` unless a `tools_allow`
   pattern matches; a session without a policy allows no tool);
3. `tool.needs_approval`: the call waits for a human (`needs_approval`);
4. otherwise allowed, by the policy's `tools.allow` rule.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any, Literal
from urllib.parse import urlsplit

import jsonschema_rs
import msgspec

from shared.contracts.messages import ToolLimits
from shared.domain.policy import CompiledPolicy

TOOL_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
MCP_PREFIX = "mcp."
KINDS = ("builtin", "http", "mcp")
EFFECTS = ("read_only", "idempotent", "side_effecting")
FILESYSTEM = ("none", "ro", "rw")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MAX_SCHEMA_BYTES = 64 * 1024
SECRET_NAME = r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$"
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")

Kind = Literal["builtin", "http", "mcp"]
Effect = Literal["read_only", "idempotent", "side_effecting"]
Filesystem = Literal["none", "ro", "rw"]
Verdict = Literal["allowed", "denied", "needs_approval"]


class Permissions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a call may reach: hosts ("none" or an allowlist) and the session workspace."""

    network: Literal["none"] | tuple[str, ...] = "none"
    filesystem: Filesystem = "none"

    @property
    def hosts(self) -> tuple[str, ...]:
        return () if self.network == "none" else tuple(self.network)


class HttpTool(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An HTTP tool's endpoint: `{arg}` placeholders in the URL's path and query are
    filled from the arguments (URL-encoded, by the node); the other arguments go as the
    query (GET, DELETE) or a JSON body. `headers` map a header to the *name* of a tenant
    secret."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url_template: str
    headers: dict[str, str] = {}


class McpTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where an MCP tool lives: its server (registered by the tenant) and its own name."""

    server: str
    tool: str  # the name the server listed
    transport: Literal["http", "stdio"] = "http"
    url: str | None = None
    command: tuple[str, ...] = ()
    headers: dict[str, str] = {}  # header -> the name of a tenant secret


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tool as the registry holds it (`ToolDefined.spec`)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})
    kind: Kind = "builtin"
    builtin: str | None = None  # kind builtin: which builtin this tool instantiates
    permissions: Permissions = Permissions()
    limits: ToolLimits = ToolLimits()
    needs_approval: bool = False
    effect: Effect = "side_effecting"
    http: HttpTool | None = None
    mcp: McpTarget | None = None
    node_labels: dict[str, str] = {}  # runs only on nodes carrying these labels

    @property
    def target(self) -> str:
        """What the node runs: the builtin's name, the URL template, the MCP tool."""
        if self.kind == "builtin":
            return self.builtin or self.name
        if self.kind == "http":
            return self.http.url_template if self.http else ""
        return self.mcp.tool if self.mcp else ""

    @property
    def secret_names(self) -> tuple[str, ...]:
        headers = (self.http.headers if self.http else
                   self.mcp.headers if self.mcp else {})
        return tuple(sorted(set(headers.values())))


class ToolError(ValueError):
    """A definition or arguments that do not hold; `errors` name each field."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class ToolVerdict(msgspec.Struct, frozen=True, kw_only=True):
    verdict: Verdict
    rule: str
    reason: str
    errors: tuple[dict[str, str], ...] = ()  # tool.arguments: each failing field

    @property
    def allowed(self) -> bool:
        return self.verdict == "allowed"


# -- the builtin catalogue --------------------------------------------------------------

_PATH = {"type": "string", "minLength": 1, "maxLength": 1024,
         "description": "a path inside the session workspace"}

BUILTINS: dict[str, ToolSpec] = {spec.name: spec for spec in (
    ToolSpec(name="python", description=(
        "Run Python code in the sandbox; answers stdout, stderr, the exit status and, "
        "when the code sets a variable `result` that JSON can hold, that value."),
        parameters={"type": "object", "required": ["code"], "additionalProperties": False,
                    "properties": {"code": {"type": "string", "maxLength": 1_000_000}}},
        permissions=Permissions(filesystem="rw"), effect="side_effecting"),
    ToolSpec(name="shell", description="Run a shell command line in the sandbox (/bin/sh -c).",
             parameters={"type": "object", "required": ["command"], "additionalProperties": False,
                         "properties": {"command": {"type": "string", "minLength": 1,
                                                    "maxLength": 100_000}}},
             permissions=Permissions(filesystem="rw"), effect="side_effecting"),
    ToolSpec(name="http_fetch", description=(
        "GET or POST a URL of an allowed host (size and time capped); the builtin allows "
        "no host: define a tool of kind builtin `http_fetch` with a network allowlist."),
        parameters={"type": "object", "required": ["url"], "additionalProperties": False,
                    "properties": {
                        "url": {"type": "string", "minLength": 1, "maxLength": 8192,
                                "pattern": "^https?://"},
                        "method": {"type": "string", "enum": ["GET", "POST"], "default": "GET"},
                        "headers": {"type": "object", "maxProperties": 64,
                                    "additionalProperties": {"type": "string", "maxLength": 8192}},
                        "body": {"type": "string", "maxLength": 1_000_000}}},
        permissions=Permissions(), effect="side_effecting"),
    ToolSpec(name="files.read", description="Read a file of the session workspace.",
             parameters={"type": "object", "required": ["path"], "additionalProperties": False,
                         "properties": {"path": _PATH}},
             permissions=Permissions(filesystem="ro"), effect="read_only"),
    ToolSpec(name="files.write", description="Write (create or replace) a file of the session workspace.",
             parameters={"type": "object", "required": ["path", "content"],
                         "additionalProperties": False,
                         "properties": {"path": _PATH, "content": {"type": "string",
                                                                   "maxLength": 10_000_000}}},
             permissions=Permissions(filesystem="rw"), effect="idempotent"),
    ToolSpec(name="files.list", description="List the files of the session workspace (under `path`).",
             parameters={"type": "object", "additionalProperties": False,
                         "properties": {"path": {**_PATH, "minLength": 0}}},
             permissions=Permissions(filesystem="ro"), effect="read_only"),
)}
BUILTIN_NAMES = tuple(BUILTINS)
_NEEDS_FS = {"files.read": ("ro", "rw"), "files.list": ("ro", "rw"), "files.write": ("rw",)}


def builtin_spec(name: str) -> ToolSpec:
    """A builtin as a tool of its own: kind builtin, instantiating itself."""
    return msgspec.structs.replace(BUILTINS[name], builtin=name)


def is_reserved(name: str) -> bool:
    return name in BUILTINS or name.startswith(MCP_PREFIX)


def mcp_tool_name(server: str, tool: str) -> str:
    return f"{MCP_PREFIX}{server}.{tool}"


# -- schemas ------------------------------------------------------------------------------

def _pointer(path: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: bytes) -> Any:
    return jsonschema_rs.validator_for(
        msgspec.json.decode(schema_json), offline=True, validate_formats=False,
        pattern_options=jsonschema_rs.RegexOptions(size_limit=1 << 20, dfa_size_limit=1 << 20))


def schema_problems(schema: object, field: str = "parameters") -> list[dict[str, str]]:
    """What is wrong with a tool's parameter schema (empty: a usable JSON Schema of an
    object). Refuses what could stall or reach out: patterns that are not linear-time
    regexes, remote `$ref`s, schemas over `MAX_SCHEMA_BYTES`."""
    if not isinstance(schema, dict):
        return [{"field": field, "message": "must be a JSON Schema object"}]
    raw = msgspec.json.encode(schema)
    if len(raw) > MAX_SCHEMA_BYTES:
        return [{"field": field, "message": f"larger than {MAX_SCHEMA_BYTES} bytes"}]
    if schema.get("type", "object") != "object":
        return [{"field": f"{field}/type", "message": "tool arguments are an object: type must be \"object\""}]
    try:
        jsonschema_rs.meta.validate(schema)
        _validator(raw)
    except jsonschema_rs.ValidationError as exc:
        where = _pointer(getattr(exc, "instance_path", ()) or ())
        message = str(exc).split("\n", 1)[0]
        return [{"field": f"{field}{where}", "message": f"not a valid JSON Schema: {message}"}]
    except Exception as exc:  # noqa: BLE001 - a schema the validator cannot build
        return [{"field": field, "message": f"not a usable JSON Schema: {str(exc).splitlines()[0][:300]}"}]
    return []


def argument_problems(schema: dict[str, Any], arguments: object,
                      field: str = "arguments") -> list[dict[str, str]]:
    """Each way `arguments` fail `schema`, the field named by its JSON pointer."""
    validator = _validator(msgspec.json.encode(schema))
    problems = []
    for error in validator.iter_errors(arguments):
        where = f"{field}{_pointer(error.instance_path)}"
        kind = type(error.kind).__name__
        missing = getattr(error.kind, "property", None)
        unexpected = getattr(error.kind, "unexpected", None)
        if kind == "Required" and isinstance(missing, str):
            where = f"{where}/{missing}"
        elif kind == "AdditionalProperties" and unexpected:
            where = f"{where}/{unexpected[0]}"
        problems.append({"field": where, "message": error.message[:500]})
        if len(problems) >= 20:
            break
    return problems


# -- definitions --------------------------------------------------------------------------

def _host_problems(hosts: tuple[str, ...], field: str) -> list[dict[str, str]]:
    problems = []
    if len(hosts) > 64:
        problems.append({"field": field, "message": "at most 64 hosts"})
    for i, host in enumerate(hosts):
        if not _HOST.match(host):
            problems.append({"field": f"{field}/{i}",
                             "message": f"{host[:100]!r} is not a host or host:port"})
        elif ":" in host and not host.endswith("]") and not 0 < int(host.rsplit(":", 1)[1]) < 65536:
            problems.append({"field": f"{field}/{i}", "message": "port out of range"})
    return problems


def url_template_fields(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def http_host(url: str) -> str:
    """`host[:port]` of a URL (the port only when given)."""
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1]


def validate_spec(spec: ToolSpec) -> ToolSpec:
    """A tenant's definition, checked (and completed: a builtin-kind tool without its own
    parameters takes the builtin's). Raises `ToolError` naming each field."""
    problems: list[dict[str, str]] = []
    if not re.match(TOOL_NAME, spec.name):
        problems.append({"field": "name", "message": f"must match {TOOL_NAME}"})
    elif is_reserved(spec.name):
        problems.append({"field": "name", "message": f"{spec.name!r} is reserved (a builtin)"})
    if len(spec.description) > 4096:
        problems.append({"field": "description", "message": "at most 4096 characters"})
    problems += _host_problems(spec.permissions.hosts, "permissions/network")
    if spec.kind == "mcp":
        problems.append({"field": "kind", "message": "MCP tools come from a registered MCP "
                         "server (POST /v1/mcp-servers), not from a definition"})
    if spec.kind == "builtin":
        if spec.builtin not in BUILTINS:
            problems.append({"field": "builtin", "message": "one of " + ", ".join(BUILTIN_NAMES)})
        else:
            needed = _NEEDS_FS.get(spec.builtin)
            if needed and spec.permissions.filesystem not in needed:
                problems.append({"field": "permissions/filesystem",
                                 "message": f"{spec.builtin} needs {' or '.join(needed)}"})
        if spec.http is not None:
            problems.append({"field": "http", "message": "only for kind http"})
    if spec.kind == "http":
        if spec.http is None:
            problems.append({"field": "http", "message": "kind http needs http.url_template"})
        else:
            problems += _http_problems(spec.http)
        if spec.builtin is not None:
            problems.append({"field": "builtin", "message": "only for kind builtin"})
    if spec.mcp is not None:
        problems.append({"field": "mcp", "message": "set by MCP server registration only"})
    problems += schema_problems(spec.parameters)
    if problems:
        raise ToolError(problems)
    if spec.kind == "builtin" and spec.parameters == {"type": "object"}:
        spec = msgspec.structs.replace(spec, parameters=BUILTINS[spec.builtin].parameters)  # type: ignore[index]
    return spec


def _http_problems(http: HttpTool) -> list[dict[str, str]]:
    problems = []
    template = http.url_template
    try:
        names = url_template_fields(template)
    except ValueError:
        return [{"field": "http/url_template", "message": "unbalanced { }"}]
    parts = urlsplit(template.replace("{", "").replace("}", ""))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        problems.append({"field": "http/url_template", "message": "must be an http(s) URL"})
    if "{" in urlsplit(template).netloc or "@" in urlsplit(template).netloc:
        problems.append({"field": "http/url_template",
                         "message": "the host is fixed: no placeholder or credentials in it"})
    if len(template) > 2048:
        problems.append({"field": "http/url_template", "message": "at most 2048 characters"})
    for name in names:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", name):
            problems.append({"field": "http/url_template", "message": f"bad placeholder {{{name}}}"})
    for header, secret in http.headers.items():
        if not re.match(HEADER_NAME, header):
            problems.append({"field": f"http/headers/{header[:64]}", "message": "not a header name"})
        if not re.match(SECRET_NAME, secret):
            problems.append({"field": f"http/headers/{header[:64]}",
                             "message": f"the name of a secret, matching {SECRET_NAME}"})
    return problems


def exec_network(spec: ToolSpec) -> tuple[str, ...]:
    """The hosts a call may reach: the permission's allowlist, and for an HTTP tool its
    own endpoint (declaring it is the permission), for an MCP server over HTTP its URL."""
    hosts = list(spec.permissions.hosts)
    if spec.kind == "http" and spec.http is not None:
        hosts.append(http_host(spec.http.url_template))
    if spec.kind == "mcp" and spec.mcp is not None and spec.mcp.url:
        hosts.append(http_host(spec.mcp.url))
    return tuple(dict.fromkeys(hosts))


# -- the decision -------------------------------------------------------------------------

def decide_tool_call(spec: ToolSpec, policy: CompiledPolicy | None,
                     arguments: object) -> ToolVerdict:
    """The verdict on one call (see the module docstring for the order)."""
    problems = (argument_problems(spec.parameters, arguments)
                if isinstance(arguments, dict) else
                [{"field": "arguments", "message": "must be a JSON object"}])
    if not problems and spec.kind == "builtin" and spec.builtin in BUILTINS \
            and spec.parameters != BUILTINS[spec.builtin].parameters:
        problems = argument_problems(BUILTINS[spec.builtin].parameters, arguments)
    if problems:
        return ToolVerdict(verdict="denied", rule="tool.arguments",
                           reason="; ".join(f"{p['field']}: {p['message']}" for p in problems)[:2000],
                           errors=tuple(problems))
    if policy is None:
        return ToolVerdict(verdict="denied", rule="default.deny_tools",
                           reason=f"tool {spec.name!r} is not allowed: the session has no policy "
                                  "(tools need a policy whose tools_allow matches them)")
    decision = policy.evaluate_tool(spec.name)
    if not decision.allowed:
        return ToolVerdict(verdict="denied", rule=decision.rule, reason=decision.reason)
    if spec.needs_approval:
        return ToolVerdict(verdict="needs_approval", rule="tool.needs_approval",
                           reason=f"tool {spec.name!r} needs a human's approval for each call")
    return ToolVerdict(verdict="allowed", rule=decision.rule, reason=decision.reason)


def decode_spec(raw: object) -> ToolSpec:
    """A stored spec (`ToolDefined.spec`) back as a `ToolSpec`."""
    return msgspec.convert(raw, ToolSpec)
