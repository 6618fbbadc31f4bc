"""Agents: what an agent is (`AgentDefinition`) and how its markdown file is read
(`parse_agent_markdown`). Pure: no I/O; `services/orchestrator/agents.py` (AgentService)
checks what needs the world (the tool registry, the routing table) and records it.

An agent is a markdown file with YAML front matter; the body is the system prompt:

    ---
    name: research
    description: Finds things out on the web and cites its sources.
    model: inherit            # a model or route, `auto`, `skill:<name>`, or an alias
    tools: [http_fetch]       # or the comma-separated form: "http_fetch, files.read"
    max_steps: 8
    max_cost_usd: 0.50
    approval: [http_fetch]    # tools whose every call waits for a human yes
    temperature: 0.2
    skills: [general]         # what it is good at: picks it for a run that names no agent
    ---
    You are a careful researcher. ...

**Subagent files written for coding agents load unchanged** (`name`, `description`,
`tools`, `model` front matter + prompt body):

- `model`: `inherit` (or no `model`) runs on the model the run or session asks for, else
  the route `default` (`AgentDefinition.model` is None). `sonnet`, `opus`, `haiku` (the
  coding agents' aliases) are kept as written and resolved by the orchestrator against
  its routing table when the agent is defined: a model or route of that exact name
  (an operator maps an alias by naming a route `sonnet`), else the one served model
  whose name contains it (`claude-sonnet-4-5`); when none (or several) does, the agent
  runs as `inherit` (`route` None), so the file still loads unchanged. `auto` and
  `skill:<name>` are accepted as written (routing decides per call). Anything else must
  be a model or route the routing table serves: otherwise a 422 naming `model` and its
  line.
- `tools`: the coding agents' tool names map to the Nexus builtins
  (`CODING_AGENT_TOOLS`: `Read` -> `files.read`, `Write`/`Edit`/`MultiEdit` ->
  `files.write`, `Glob`/`LS` -> `files.list`, `Bash`/`Grep` -> `shell`, `WebFetch` ->
  `http_fetch`), their MCP names `mcp__<server>__<tool>` to `mcp.<server>.<tool>`; the
  coding agents' own client-side tools with no Nexus counterpart (`TodoWrite`, `Task`,
  `WebSearch`, ...: `CODING_AGENT_ONLY`) are left out and listed in
  `AgentDefinition.ignored_tools`. No `tools` at all means the agent calls no tool.
- `skills`: names of skills (`skills/*.toml`, a tenant's own) the agent is good at,
  the same list form; a run that names no agent (or `auto`) gets the agent whose
  skills fit the task best (`adaptive_routing.select_agent`). A name that is no skill
  is left out when choosing.
- front matter keys the coding agents know and Nexus does not use (`color`,
  `permissionMode`, ...: `IGNORED_KEYS`) are ignored; any other unknown key is a 422
  naming it (a typo such as `max_step` never passes silently).

Bounds (no input can stall a process): the whole file at most `MAX_MARKDOWN_BYTES`,
the front matter `MAX_FRONT_MATTER_BYTES`, YAML anchors and aliases refused (no
"billion laughs"), nesting at most `MAX_DEPTH` levels, only the safe YAML types.

Every problem names the field and its line in the file (1-based, the `---` line being
line 1): `parse_agent_markdown` raises `AgentInvalid` (`shared.contracts.errors`, a 422
problem+json with `errors: [{field, line, message}]`) listing all it found.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
import yaml

from shared.contracts.errors import AgentInvalid

AGENT_NAME = r"^[a-z][a-z0-9_-]{0,63}$"
_AGENT_NAME = re.compile(AGENT_NAME)
# a tool name as the registry spells it: builtins, a tenant's own, `mcp.<server>.<tool>`
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,190}$")
_MCP_CODING = re.compile(r"^mcp__([a-z][a-z0-9_-]{0,63})__([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")
_SKILL = re.compile(r"^skill:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_MODEL = re.compile(r"^[A-Za-z0-9._:/@+-]{1,200}$")

MAX_MARKDOWN_BYTES = 256 * 1024
MAX_FRONT_MATTER_BYTES = 16 * 1024
MAX_DEPTH = 8
MAX_TOOLS = 64
MAX_DESCRIPTION = 4096
MAX_STEPS_LIMIT = 1000
DEFAULT_MAX_STEPS = 20
MAX_COST_LIMIT_USD = 1_000_000.0

INHERIT = "inherit"
AUTO = "auto"
MODEL_ALIASES = ("sonnet", "opus", "haiku")  # the coding agents' aliases

CODING_AGENT_TOOLS: dict[str, str] = {
    "Read": "files.read",
    "Write": "files.write",
    "Edit": "files.write",
    "MultiEdit": "files.write",
    "NotebookEdit": "files.write",
    "Glob": "files.list",
    "LS": "files.list",
    "Grep": "shell",
    "Bash": "shell",
    "WebFetch": "http_fetch",
}
CODING_AGENT_ONLY = frozenset({"TodoWrite", "Task", "WebSearch", "NotebookRead",
                               "ExitPlanMode", "BashOutput", "KillBash", "KillShell",
                               "SlashCommand", "Skill", "AskUserQuestion"})
KNOWN_KEYS = ("name", "description", "model", "tools", "max_steps", "max_cost_usd",
              "approval", "temperature", "skills")
IGNORED_KEYS = frozenset({"color", "permissionMode", "hooks", "mcpServers",
                          "disallowedTools", "argument-hint", "allowed-tools", "version",
                          "author", "tags"})


class AgentDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """An agent as defined (the parsed front matter and prompt).

    - `name`, `description`, `system_prompt` (the markdown body);
    - `model`: as written (`None` = `inherit`: the run's or session's model, else the
      route `default`); `route`: what a run asks the call path for (set by the
      orchestrator when it validates: an alias resolved to the model or route serving
      it; `auto` / `skill:<name>` as written; `None` = inherit). Runs use
      `effective_model(requested)`;
    - `tools`: registry names, in order, deduplicated (coding-agent names mapped);
      `ignored_tools`: coding-agent-only tools left out;
    - `max_steps` (1..1000, default 20), `max_cost_usd` (None: only the session's
      budget bounds it), `approval` (a subset of `tools`: each of their calls waits for a
      human), `temperature` (0..2, None: the model's default);
    - `skills`: the skills it is good at (how a run that names no agent picks it);
    - `version` (the stream version of its `AgentDefined`, >= 1 once recorded) and
      `source` (`tenant`: the tenant's own; `system`: shipped in `agents/`, visible to
      every tenant unless the tenant defines its own of that name).
    """

    name: str
    description: str = ""
    model: str | None = None
    route: str | None = None
    tools: tuple[str, ...] = ()
    ignored_tools: tuple[str, ...] = ()
    max_steps: int = DEFAULT_MAX_STEPS
    max_cost_usd: float | None = None
    approval: tuple[str, ...] = ()
    temperature: float | None = None
    system_prompt: str = ""
    version: int = 0
    source: str = "tenant"
    skills: tuple[str, ...] = ()

    def effective_model(self, requested: str | None = None, default: str = "default") -> str:
        """The model/route a run's LLM call names: the agent's own, else what the run
        (or session) asked for, else `default`."""
        return self.route or requested or default

    def needs_approval(self, tool: str) -> bool:
        return tool in self.approval


def decode_definition(raw: dict[str, Any] | bytes) -> AgentDefinition:
    """An `AgentDefinition` from its JSON form (as `AgentDefined.definition` keeps it)."""
    if isinstance(raw, bytes):
        return msgspec.json.decode(raw, type=AgentDefinition)
    return msgspec.convert(raw, AgentDefinition)


def model_kind(model: str | None) -> str:
    """`inherit`, `auto`, `skill`, `alias` (sonnet/opus/haiku) or `name` (a model or
    route the routing table must serve)."""
    if model is None or model == INHERIT:
        return "inherit"
    if model == AUTO:
        return "auto"
    if model.startswith("skill:"):
        return "skill"
    if model in MODEL_ALIASES:
        return "alias"
    return "name"


def resolve_alias(alias: str, served: list[str] | tuple[str, ...]) -> str | None:
    """The served model or route an alias names: the exact name, else the only served
    name containing it (`sonnet` -> `claude-sonnet-4-5`); None when none or several."""
    if alias in served:
        return alias
    matches = sorted({m for m in served if alias in m.lower()})
    return matches[0] if len(matches) == 1 else None


# -- parsing ------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader without anchors or aliases and with a nesting bound."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused("YAML anchors and aliases are not allowed", event.start_mark.line)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark.line)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _split(text: str) -> tuple[str, str, int]:
    """(front matter, body, the body's first line). The file must open with `---`."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n").rstrip() != "---":
        raise AgentInvalid([{"field": "front_matter", "line": 1,
                             "message": "an agent file opens with a '---' line, then YAML "
                                        "front matter, then '---' and the prompt"}])
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n").rstrip() in ("---", "..."):
            return "".join(lines[1:i]), "".join(lines[i + 1:]), i + 2
    raise AgentInvalid([{"field": "front_matter", "line": len(lines),
                         "message": "the front matter is not closed by a '---' line"}])


def _compose(front: str) -> yaml.Node | None:
    loader = _BoundedLoader(front)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _names(value: Any, field: str, line: int, errors: list[dict[str, Any]]) -> list[str]:
    """A YAML list of names or the comma-separated string form."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list):
        items = value
    else:
        errors.append({"field": field, "line": line,
                       "message": "a list of tool names, or a comma-separated string"})
        return []
    out = []
    for item in items:
        if not isinstance(item, str):
            errors.append({"field": field, "line": line, "message": f"{item!r} is not a tool name"})
        else:
            out.append(item.strip())
    if len(out) > MAX_TOOLS:
        errors.append({"field": field, "line": line, "message": f"at most {MAX_TOOLS} tools"})
        return []
    return out


def _map_tools(names: list[str], field: str, line: int,
               errors: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(registry names, ignored coding-agent-only names)."""
    tools: list[str] = []
    ignored: list[str] = []
    for name in names:
        mcp = _MCP_CODING.match(name)
        if name in CODING_AGENT_TOOLS:
            name = CODING_AGENT_TOOLS[name]
        elif mcp:
            name = f"mcp.{mcp.group(1)}.{mcp.group(2)}"
        elif name in CODING_AGENT_ONLY:
            ignored.append(name)
            continue
        elif not _TOOL_NAME.match(name):
            errors.append({"field": field, "line": line, "message": f"{name!r} is not a tool name"})
            continue
        if name not in tools:
            tools.append(name)
    return tools, ignored


def _number(value: Any, field: str, line: int, errors: list[dict[str, Any]], *,
            integer: bool, low: float, high: float, low_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        errors.append({"field": field, "line": line,
                       "message": "an integer" if integer else "a number"})
        return None
    if math.isnan(value) or (value <= low if low_open else value < low) or value > high:
        bound = f"more than {low}" if low_open else f"at least {low}"
        errors.append({"field": field, "line": line,
                       "message": f"{value} is out of range: {bound} and at most {high}"})
        return None
    return value


def parse_agent_markdown(markdown: str | bytes) -> tuple[AgentDefinition, dict[str, int]]:
    """The definition in an agent file, and the line of each front matter key (for the
    orchestrator's own checks: unknown tools, a model no route serves). Raises
    `AgentInvalid` listing every problem with its field and line."""
    if isinstance(markdown, bytes):
        if len(markdown) > MAX_MARKDOWN_BYTES:
            raise AgentInvalid([{"field": "markdown", "line": 1,
                                 "message": f"larger than {MAX_MARKDOWN_BYTES} bytes"}])
        try:
            markdown = markdown.decode("utf-8")
        except UnicodeDecodeError:
            raise AgentInvalid([{"field": "markdown", "line": 1,
                                 "message": "not UTF-8 text"}]) from None
    if len(markdown.encode("utf-8", "surrogatepass")) > MAX_MARKDOWN_BYTES:
        raise AgentInvalid([{"field": "markdown", "line": 1,
                             "message": f"larger than {MAX_MARKDOWN_BYTES} bytes"}])
    text = markdown.removeprefix("\ufeff")
    if "\x00" in text:
        raise AgentInvalid([{"field": "markdown", "line": text[:text.index("\x00")].count("\n") + 1,
                             "message": "contains a NUL character"}])
    front, body, body_line = _split(text)
    if len(front.encode("utf-8", "surrogatepass")) > MAX_FRONT_MATTER_BYTES:
        raise AgentInvalid([{"field": "front_matter", "line": 2,
                             "message": f"front matter larger than {MAX_FRONT_MATTER_BYTES} bytes"}])
    try:
        node = _compose(front)
    except _Refused as exc:
        raise AgentInvalid([{"field": "front_matter", "line": exc.line + 2,
                             "message": exc.message}]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.context_mark or exc.problem_mark  # where the broken construct began
        line = (mark.line + 2) if mark is not None else 2
        raise AgentInvalid([{"field": "front_matter", "line": line,
                             "message": f"malformed YAML: {exc.problem or exc.context}"}]) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise AgentInvalid([{"field": "front_matter", "line": 2,
                             "message": f"malformed YAML: {type(exc).__name__}"}]) from None
    if not isinstance(node, yaml.MappingNode):
        line = node.start_mark.line + 2 if node is not None else 2
        raise AgentInvalid([{"field": "front_matter", "line": line,
                             "message": "the front matter must be a mapping of keys to values"}])
    errors: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    constructor = yaml.SafeLoader("")
    try:
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 2
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                errors.append({"field": "front_matter", "line": line, "message": "keys are names"})
                continue
            if key in lines:
                errors.append({"field": key, "line": line, "message": "given twice"})
                continue
            lines[key] = line
            if key in IGNORED_KEYS:
                continue
            if key not in KNOWN_KEYS:
                errors.append({"field": key, "line": line,
                               "message": f"unknown field; known: {', '.join(KNOWN_KEYS)}"})
                continue
            try:
                values[key] = constructor.construct_object(value_node, deep=True)
            except yaml.YAMLError as exc:
                errors.append({"field": key, "line": line, "message": f"unreadable value: {exc}"})
    finally:
        constructor.dispose()

    def at(key: str) -> int:
        return lines.get(key, 2)

    name = values.get("name")
    if name is None:
        errors.append({"field": "name", "line": 2, "message": "required"})
    elif not isinstance(name, str) or not _AGENT_NAME.match(name):
        errors.append({"field": "name", "line": at("name"),
                       "message": f"must match {AGENT_NAME} (lowercase letters, digits, '-', '_')"})
    description = values.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        errors.append({"field": "description", "line": at("description"), "message": "text"})
        description = ""
    elif len(description) > MAX_DESCRIPTION:
        errors.append({"field": "description", "line": at("description"),
                       "message": f"at most {MAX_DESCRIPTION} characters"})
    model = values.get("model")
    if model is not None:
        if not isinstance(model, str) or not (_MODEL.match(model) or _SKILL.match(model)):
            errors.append({"field": "model", "line": at("model"),
                           "message": "a model or route name, 'inherit', 'auto' or 'skill:<name>'"})
            model = None
        elif model.startswith("skill:") and not _SKILL.match(model):
            errors.append({"field": "model", "line": at("model"), "message": "'skill:<name>'"})
    if model == INHERIT:
        model = None
    tools, ignored = _map_tools(_names(values.get("tools"), "tools", at("tools"), errors),
                                "tools", at("tools"), errors)
    approval, _ = _map_tools(_names(values.get("approval"), "approval", at("approval"), errors),
                             "approval", at("approval"), errors)
    for tool in approval:
        if tool not in tools:
            errors.append({"field": "approval", "line": at("approval"),
                           "message": f"{tool!r} is not one of the agent's tools"})
    skills = list(dict.fromkeys(_names(values.get("skills"), "skills", at("skills"), errors)))
    for skill in skills:
        if not _SKILL.match(f"skill:{skill}"):
            errors.append({"field": "skills", "line": at("skills"),
                           "message": f"{skill!r} is not a skill name"})
    max_steps = DEFAULT_MAX_STEPS
    if values.get("max_steps") is not None:
        max_steps = _number(values["max_steps"], "max_steps", at("max_steps"), errors,
                            integer=True, low=1, high=MAX_STEPS_LIMIT) or DEFAULT_MAX_STEPS
    max_cost = None
    if values.get("max_cost_usd") is not None:
        max_cost = _number(values["max_cost_usd"], "max_cost_usd", at("max_cost_usd"), errors,
                           integer=False, low=0, high=MAX_COST_LIMIT_USD, low_open=True)
    temperature = None
    if values.get("temperature") is not None:
        temperature = _number(values["temperature"], "temperature", at("temperature"), errors,
                              integer=False, low=0, high=2)
    prompt = body.strip("\r\n")
    if not prompt.strip():
        errors.append({"field": "system_prompt", "line": body_line,
                       "message": "the prompt (the markdown after the front matter) is empty"})
    if errors:
        raise AgentInvalid(errors)
    model_name = model if isinstance(model, str) else None
    kind = model_kind(model_name)
    definition = AgentDefinition(
        name=name, description=description.strip(), model=model_name,
        route=model_name if kind in ("auto", "skill", "name") else None,
        tools=tuple(tools), ignored_tools=tuple(ignored), max_steps=int(max_steps),
        max_cost_usd=float(max_cost) if max_cost is not None else None,
        approval=tuple(approval),
        temperature=float(temperature) if temperature is not None else None,
        system_prompt=prompt, skills=tuple(skills))
    lines.setdefault("system_prompt", body_line)
    return definition, lines
