"""The node's tool executor: `nexus.node.<id>.tool`.

The orchestrator has decided the call (policy, schema, approval); the node runs it and
answers on the request's reply subject with frames (shared.infra.streaming): `Started`,
`Keepalive` while it runs, then one `ToolDone` or `Failed` whose `error` names the
reason:

    invalid_arguments  the arguments or the request are unusable (named in `detail`)
    overloaded         the node already runs NEXUS_NODE_TOOL_CONCURRENCY calls (429)
    timeout, memory, cpu, output, killed
                       the sandbox stopped the tool at that limit
    sandbox_error      the sandbox could not run it
    network_denied     a destination outside the allowlist, or a node endpoint
    upstream_error     an HTTP or MCP server failed (refused, broken, garbage)
    not_found          files.read of a file the workspace does not have
    permission         files.write without filesystem "rw", files.* without a workspace
    quota              the session's workspace would exceed NEXUS_WORKSPACE_QUOTA_MB;
                       nothing of the call was kept
    workspace_unavailable  the workspace store (JetStream) did not answer
    cancelled          the caller went away

What runs (`request.kind`, `request.target`):

- builtin `python` {code}: the code runs in the sandbox under `sandbox.python`; it may
  assign `result = ...` (any JSON value), sent as `ToolDone.result`. `output` is its
  stdout, then its stderr after a `[stderr]` line.
- builtin `shell` {command}: `/bin/sh -c command` in the sandbox; `exit_code`, output.
- builtin `http_fetch` {url, method: GET|POST, headers?, body?}: from the node, to
  hosts in `request.network` only, never the node's NATS/Postgres/metrics; each
  redirect is checked again; body capped at `max_output_bytes`, time at `timeout_s`.
- builtin `files.read` {path} / `files.write` {path, content} / `files.list` {path?}:
  the session workspace (shared.infra.workspace), paths relative, no `..`.
- kind `http` (a tenant's HTTP tool): `request.http` {method, url template, headers};
  `{param}` in the url is filled from the arguments (URL-encoded), the rest go as a
  JSON body (as the query for GET/DELETE). Only the url's host is reachable; header
  values (secrets) are never logged nor repeated in output or errors.
- kind `mcp`: services.node.mcp_client.

Workspace: with filesystem "ro"/"rw" the session's files are synced into a fresh private
directory the sandbox sees as its workspace; after an "rw" call that ran to its end
(a `ToolDone`, a non-zero exit included) the changes are committed back. A call the
sandbox stopped keeps nothing.

Output above the cap is truncated (`truncated`, a last line saying so) and, up to
NEXUS_TOOL_OUTPUT_STORE_MB, kept whole in the object store (`output_ref`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import msgspec
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.node import egress
from shared.infra.workspace import Manifest, WorkspaceError, WorkspaceStore, clean_path
from shared.contracts.frames import Failed, ToolDone
from shared.contracts.messages import ToolExecRequest, ToolLimits
from shared.infra.messaging import Bus
from shared.infra.metrics import ToolMetrics
from shared.infra.settings import Settings
from shared.infra.streaming import ConsumerLost, StreamSender
from shared.infra.tracing import tracer

log = logging.getLogger("nexus.node.tools")

BUILTINS = ("python", "shell", "http_fetch", "files.read", "files.write", "files.list")
MAX_REDIRECTS = 5
RESULT_MARK = "\x1enexus-result:"  # the python wrapper's last stderr line: MARK<token>:<json>

# Runs as `python -c WRAPPER <token>`, the tool's code on stdin. Everything the code
# prints goes where it would; `result`, if assigned, goes JSON-encoded on the last line
# of stderr after a per-call token (the node strips it; a tool forging it can only
# forge its own result).
WRAPPER = r"""
import sys
_mark = "\x1enexus-result:" + sys.argv[1] + ":"
_code = sys.stdin.read()
_ns = {"__name__": "__main__", "__builtins__": __builtins__}
_status = 0
try:
    exec(compile(_code, "<tool>", "exec"), _ns)
except SystemExit as _e:
    _status = _e.code if isinstance(_e.code, int) else (0 if _e.code is None else 1)
    if not isinstance(_e.code, (int, type(None))):
        print(_e.code, file=sys.stderr)
except BaseException:
    import traceback
    traceback.print_exc()
    _status = 1
if "result" in _ns:
    import json  # only then: importing it costs a trivial call ~10 ms
    try:
        _out = json.dumps({"result": _ns["result"]}, allow_nan=False)
    except (TypeError, ValueError) as _e:
        _out = json.dumps({"error": "result is not JSON: " + str(_e)[:200]})
    sys.stdout.flush()
    sys.stderr.write("\n" + _mark + _out + "\n")
sys.stdout.flush()
sys.stderr.flush()
sys.exit(_status)
"""

_STATUS = {"invalid_arguments": 422, "overloaded": 429, "timeout": 504, "memory": 422,
           "cpu": 422, "output": 422, "killed": 422, "sandbox_error": 500,
           "network_denied": 403, "upstream_error": 502, "not_found": 404, "permission": 403,
           "quota": 413, "workspace_unavailable": 503, "cancelled": 499}


def failed(reason: str, detail: str) -> Failed:
    return Failed(error=reason, detail=detail[:500], status=_STATUS.get(reason, 500))


class ToolFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _arg(arguments: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = arguments.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = {str: "a string", dict: "an object", int: "an integer"}.get(kind, kind.__name__)
        raise ToolFailure("invalid_arguments", f"{name}: must be {want}")
    return value


def _cut(data: bytes, limit: int) -> bytes:
    """At most `limit` bytes of `data`, not splitting a UTF-8 character."""
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with each secret header value, and each long word of one (the token of
    "Bearer <token>"), replaced by `***`."""
    words = {w for s in secrets for w in s.split() if len(w) >= 8}
    for secret in sorted({*(s for s in secrets if len(s) >= 4), *words}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass
class Captured:
    """A tool's whole output as captured, before the call's cap."""

    text: bytes
    produced: int  # bytes the tool produced (more than `text` when the capture was capped)


class ToolRunner:
    """Answers `ToolExecRequest`s on this node's tool subject."""

    def __init__(self, node_id: str, bus: Bus, sandbox: Any, workspace: WorkspaceStore,
                 work_dir: Path, *, max_concurrency: int = 4,
                 output_store_bytes: int = 16 * 1024 * 1024,
                 denied_endpoints: tuple[str, ...] = (), metrics: ToolMetrics | None = None) -> None:
        self.node_id = node_id
        self.bus = bus
        self.sandbox = sandbox
        self.workspace = workspace
        self.work_dir = Path(work_dir)
        self.max_concurrency = max(1, max_concurrency)
        self.output_store_bytes = output_store_bytes
        self.denied_endpoints = denied_endpoints
        self.metrics = metrics or ToolMetrics()
        self.active = 0
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=True)

    async def close(self) -> None:
        await self._http.aclose()

    # -- the subject handler ---------------------------------------------------------

    async def on_tool(self, request: ToolExecRequest, msg: Msg) -> None:
        if not msg.reply:
            return
        label = request.target if request.kind == "builtin" else request.kind
        async with StreamSender(self.bus, msg.reply) as sender:
            if self.active >= self.max_concurrency:
                self.metrics.calls.add(1, {"gen_ai.tool.name": label, "outcome": "overloaded"})
                await sender.fail(failed("overloaded", (
                    f"node {self.node_id} already runs {self.active} tool calls "
                    f"(NEXUS_NODE_TOOL_CONCURRENCY={self.max_concurrency})")))
                return
            self.active += 1
            started = time.monotonic()
            try:
                with tracer("nexus.node").start_as_current_span(
                        f"execute_tool {request.tool}", kind=SpanKind.INTERNAL, attributes={
                            "gen_ai.operation.name": "execute_tool",
                            "gen_ai.tool.name": request.tool,
                            "gen_ai.tool.call.id": request.tool_call_id,
                            "nexus.tool.kind": request.kind,
                            "nexus.node.id": self.node_id}) as span:
                    outcome = await self._cancellable(request, sender)
                    if isinstance(outcome, Failed):
                        span.set_status(Status(StatusCode.ERROR, outcome.error))
                        span.set_attribute("error.type", outcome.error)
            finally:
                self.active -= 1
            result = ("error" if outcome.is_error else "ok") if isinstance(outcome, ToolDone) \
                else outcome.error
            self.metrics.calls.add(1, {"gen_ai.tool.name": label, "outcome": result})
            self.metrics.duration.record(time.monotonic() - started,
                                         {"gen_ai.tool.name": label, "outcome": result})
            log.info("tool call %s", result, extra={
                "tool": request.tool, "tool_call_id": request.tool_call_id, "kind": request.kind,
                "session_id": request.session_id, "tenant": request.tenant,
                "duration_ms": round((time.monotonic() - started) * 1000, 1)})
            if isinstance(outcome, Failed):
                await sender.fail(outcome)
            else:
                await sender.done(outcome)  # type: ignore[arg-type]  # any final frame

    async def _cancellable(self, request: ToolExecRequest, sender: StreamSender) -> ToolDone | Failed:
        try:
            return await sender.cancellable(self.execute(request))
        except ConsumerLost:
            return failed("cancelled", "the caller cancelled the tool call")

    async def execute(self, request: ToolExecRequest) -> ToolDone | Failed:
        """Run one call to its end: a ToolDone, or a Failed naming why."""
        try:
            done = await self._dispatch(request)
        except ToolFailure as exc:
            return failed(exc.reason, exc.detail)
        except WorkspaceError as exc:
            return failed(exc.reason, exc.detail)
        return msgspec.structs.replace(done, node=self.node_id) if isinstance(done, ToolDone) else done

    async def _dispatch(self, request: ToolExecRequest) -> ToolDone | Failed:
        args = request.arguments
        if request.kind == "mcp":
            from services.node import mcp_client  # the MCP SDK loads on first use

            return await mcp_client.execute(request, self.sandbox)
        if request.kind == "http":
            return await self._http_tool(request)
        target = request.target
        if target == "python":
            code = _arg(args, "code", str)
            token = uuid.uuid4().hex
            return await self._sandboxed(request, [*self.sandbox.python, "-c", WRAPPER, token],
                                         stdin=code.encode(), result_token=token)
        if target == "shell":
            command = _arg(args, "command", str)
            return await self._sandboxed(request, ["/bin/sh", "-c", command])
        if target == "http_fetch":
            return await self._http_fetch(request)
        if target in ("files.read", "files.write", "files.list"):
            return await self._files(request, target)
        raise ToolFailure("invalid_arguments", f"target: no builtin tool {target!r} "
                                               f"(builtins: {', '.join(BUILTINS)})")

    # -- the sandbox -------------------------------------------------------------------

    def _capture_limits(self, limits: ToolLimits) -> ToolLimits:
        """The call's limits with output captured up to the object-store bound."""
        keep = max(limits.max_output_bytes, min(self.output_store_bytes, 64 * 1024 * 1024))
        return msgspec.structs.replace(limits, max_output_bytes=keep)

    async def _sandboxed(self, request: ToolExecRequest, argv: list[str], *,
                         stdin: bytes | None = None, result_token: str | None = None) -> ToolDone | Failed:
        call_dir = self.work_dir / "calls" / uuid.uuid4().hex
        workspace: Path | None = None
        base: Manifest = {}
        lock = (self.workspace.lock(request.tenant, request.session_id)
                if request.filesystem != "none" else contextlib.nullcontext())
        try:
            async with lock:
                if request.filesystem != "none":
                    workspace = call_dir / "workspace"
                    workspace.mkdir(parents=True, mode=0o700)
                    base = await self.workspace.sync_in(request.tenant, request.session_id,
                                                        workspace)
                self.metrics.sandbox_starts.add(1, {"gen_ai.tool.name": request.target})
                try:
                    result = await self.sandbox.run(
                        argv, limits=self._capture_limits(request.limits), workspace=workspace,
                        writable=request.filesystem == "rw", network=tuple(request.network),
                        stdin=stdin)
                except Exception as exc:  # noqa: BLE001 - named in the answer
                    log.warning("sandbox failed: %s", type(exc).__name__,
                                extra={"tool_call_id": request.tool_call_id})
                    return failed("sandbox_error", f"the sandbox could not run the tool: "
                                                   f"{type(exc).__name__}: {str(exc)[:200]}")
                if result.outcome not in ("ok", "exit"):
                    return failed(result.outcome, self._stopped(result, request.limits))
                kept = ""
                refused = tuple(getattr(result, "egress_refused", ()) or ())
                if refused:
                    kept += f"\n[network: {'; '.join(refused[:5])}]"
                if request.filesystem == "rw" and workspace is not None:
                    synced = await self.workspace.sync_out(request.tenant, request.session_id,
                                                           workspace, base)
                    if synced.skipped:
                        kept += (f"\n[workspace: not kept (not regular files): "
                                f"{', '.join(synced.skipped[:10])}]")
            return await self._sandbox_done(request, result, result_token, kept)
        finally:
            if request.filesystem != "none":
                self.workspace.release(request.tenant, request.session_id)
            if call_dir.exists():
                await asyncio.to_thread(shutil.rmtree, call_dir, True)

    @staticmethod
    def _stopped(result: Any, limits: ToolLimits) -> str:
        what = {"timeout": f"ran past its timeout of {limits.timeout_s:g}s",
                "memory": f"exceeded its memory limit of {limits.memory_mb} MB",
                "cpu": f"used more than {limits.cpu_s:g} CPU seconds",
                "output": "produced more output than the node keeps and was stopped",
                "killed": "was killed"}.get(result.outcome, result.outcome)
        detail = f"the tool {what}"
        if getattr(result, "detail", ""):
            detail += f" ({result.detail})"
        return detail

    async def _sandbox_done(self, request: ToolExecRequest, result: Any,
                            token: str | None, note: str) -> ToolDone:
        stdout, stderr = bytes(result.stdout), bytes(result.stderr)
        value: Any = None
        if token is not None:
            mark = f"{RESULT_MARK}{token}:".encode()
            at = stderr.rfind(mark)
            if at >= 0:
                line = stderr[at + len(mark):].split(b"\n", 1)[0]
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    value = parsed.get("result") if "result" in parsed else parsed
                stderr = stderr[:at].removesuffix(b"\n")
        text = stdout
        if stderr:
            text += (b"" if not text or text.endswith(b"\n") else b"\n") + b"[stderr]\n" + stderr
        produced = max(int(result.output_bytes), len(text))
        done = await self._capped(request, Captured(text, produced), note=note)
        return msgspec.structs.replace(
            done, is_error=result.exit_code != 0, exit_code=result.exit_code, result=value,
            duration_ms=round(float(result.duration_ms), 3), cpu_s=float(result.cpu_s),
            peak_memory_mb=float(result.peak_memory_mb))

    async def _capped(self, request: ToolExecRequest, captured: Captured, *, note: str = "",
                      secrets: tuple[str, ...] = ()) -> ToolDone:
        """The ToolDone's output fields: the text within the cap, the whole elsewhere."""
        cap = request.limits.max_output_bytes
        text = captured.text
        if secrets:
            text = _scrub(text.decode("utf-8", "replace"), secrets).encode()
        truncated = captured.produced > cap or len(text) > cap
        ref = None
        if truncated:
            with contextlib.suppress(WorkspaceError):  # the output stands without its ref
                ref = await self.workspace.put_output(request.tenant, request.session_id,
                                                      request.tool_call_id, text)
            shown = f"\n[output truncated: {captured.produced} bytes, the first shown"
            shown += f"; whole output: {ref}]" if ref else "]"
            if captured.produced > len(text):
                shown = shown.replace("whole output", f"first {len(text)} bytes")
            tail = shown.encode()
            output = _cut(text, max(0, cap - len(tail))) + tail
            output = _cut(output, cap)
        else:
            output = text
        out = output.decode("utf-8", "replace") + note
        return ToolDone(is_error=False, output=out, output_bytes=captured.produced,
                        truncated=truncated, output_ref=ref)

    # -- HTTP (http_fetch and a tenant's HTTP tools) ------------------------------------

    async def _http_fetch(self, request: ToolExecRequest) -> ToolDone:
        args = request.arguments
        url = _arg(args, "url", str)
        method = (_arg(args, "method", str, required=False) or "GET").upper()
        if method not in ("GET", "POST"):
            raise ToolFailure("invalid_arguments", "method: must be GET or POST")
        headers = _arg(args, "headers", dict, required=False) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ToolFailure("invalid_arguments", "headers: must map names to strings")
        body = _arg(args, "body", str, required=False)
        return await self._fetch(request, method, url, headers,
                                 body.encode() if body is not None else None,
                                 tuple(request.network), secrets=())

    async def _http_tool(self, request: ToolExecRequest) -> ToolDone:
        spec = request.http or {}
        method = str(spec.get("method", "GET")).upper()
        template = spec.get("url")
        headers = spec.get("headers") or {}
        if not isinstance(template, str) or not isinstance(headers, dict):
            raise ToolFailure("invalid_arguments", "http: needs a url template and headers")
        headers = {str(k): str(v) for k, v in headers.items()}
        secrets = tuple(headers.values())
        rest = dict(request.arguments)
        url = template
        for name in list(rest):
            token = "{" + name + "}"
            if token in url:
                value = rest.pop(name)
                url = url.replace(token, quote(value if isinstance(value, str)
                                               else json.dumps(value), safe=""))
        if "{" in urlsplit(url).path:
            raise ToolFailure("invalid_arguments", "url: a `{parameter}` has no argument")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ToolFailure("invalid_arguments", "http: the url is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        body = None
        if method in ("GET", "DELETE", "HEAD"):
            if rest:
                query = urlencode({k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in rest.items()})
                url = urlunsplit(parts._replace(query=f"{parts.query}&{query}".lstrip("&")))
        else:
            body = json.dumps(rest).encode()
            headers.setdefault("Content-Type", "application/json")
        return await self._fetch(request, method, url, headers, body, (f"{host}:{port}",),
                                 secrets=secrets)

    async def _fetch(self, request: ToolExecRequest, method: str, url: str,
                     headers: dict[str, str], body: bytes | None, network: tuple[str, ...], *,
                     secrets: tuple[str, ...]) -> ToolDone:
        limits = request.limits
        started = time.monotonic()
        keep = max(limits.max_output_bytes, self.output_store_bytes)
        checker = egress.EgressProxy(self.work_dir / "unused.sock", network,
                                     denied=self.denied_endpoints)
        try:
            async with asyncio.timeout(limits.timeout_s):
                for hop in range(MAX_REDIRECTS + 1):
                    parts = urlsplit(url)
                    if parts.scheme not in ("http", "https") or not parts.hostname:
                        raise ToolFailure("invalid_arguments", "url: must be an http(s) URL")
                    try:
                        port = parts.port or (443 if parts.scheme == "https" else 80)
                    except ValueError:
                        raise ToolFailure("invalid_arguments", "url: bad port") from None
                    host = parts.hostname
                    try:
                        address = await checker.resolve_checked(host, port)
                    except egress.Denied as exc:
                        raise ToolFailure("network_denied",
                                          f"url: {host}:{port} refused: {exc}") from None
                    pinned = f"[{address}]" if ":" in address else address
                    direct = urlunsplit(parts._replace(netloc=f"{pinned}:{port}"))
                    sent = {**headers, "Host": parts.netloc.rpartition("@")[2]}
                    async with self._http.stream(method, direct, headers=sent, content=body,
                                                 extensions={"sni_hostname": host}) as resp:
                        if resp.is_redirect and "location" in resp.headers:
                            if hop == MAX_REDIRECTS:
                                raise ToolFailure("upstream_error",
                                                  f"more than {MAX_REDIRECTS} redirects")
                            url = urljoin(url, resp.headers["location"])
                            if resp.status_code in (301, 302, 303) and method != "GET":
                                method, body = "GET", None
                            continue
                        data = bytearray()
                        produced = 0
                        async for chunk in resp.aiter_bytes():
                            produced += len(chunk)
                            if len(data) < keep:
                                data += chunk[:keep - len(data)]
                        status = resp.status_code
                        content_type = resp.headers.get("content-type", "")
                        break
        except TimeoutError:
            raise ToolFailure("timeout", f"the request did not finish within "
                                         f"{limits.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ToolFailure("upstream_error",
                              f"{method} {urlsplit(url).hostname}: {type(exc).__name__}") from None
        done = await self._capped(request, Captured(bytes(data), produced), secrets=secrets)
        value: dict[str, Any] = {"status": status, "content_type": content_type}
        if "json" in content_type and not done.truncated:
            with contextlib.suppress(ValueError):
                value["json"] = json.loads(_scrub(bytes(data).decode("utf-8", "replace"),
                                                  secrets))
        return msgspec.structs.replace(done, is_error=status >= 400, exit_code=None, result=value,
                                       duration_ms=round((time.monotonic() - started) * 1000, 3))

    # -- the session workspace ----------------------------------------------------------

    async def _files(self, request: ToolExecRequest, target: str) -> ToolDone:
        args = request.arguments
        tenant, session = request.tenant, request.session_id
        if request.filesystem == "none":
            raise ToolFailure("permission", f"{target} needs the session workspace "
                                            "(filesystem \"ro\" or \"rw\")")
        started = time.monotonic()
        try:
            async with self.workspace.lock(tenant, session):
                if target == "files.read":
                    data, entry = await self.workspace.read(tenant, session,
                                                            _arg(args, "path", str))
                    done = await self._capped(request, Captured(data, entry.size))
                    value: Any = {"path": clean_path(args["path"]), "size": entry.size}
                elif target == "files.write":
                    if request.filesystem != "rw":
                        raise ToolFailure("permission",
                                          "files.write needs filesystem \"rw\"")
                    path = clean_path(_arg(args, "path", str))
                    data = _arg(args, "content", str).encode()
                    await self.workspace.write(tenant, session, path, data)
                    done = ToolDone(is_error=False, output=f"wrote {len(data)} bytes to {path}")
                    value = {"path": path, "size": len(data)}
                else:
                    prefix = clean_path(_arg(args, "path", str, required=False) or "",
                                        allow_root=True)
                    files = await self.workspace.manifest(tenant, session)
                    listed = sorted((p, e.size) for p, e in files.items()
                                    if not prefix or p == prefix or p.startswith(prefix + "/"))
                    text = "".join(f"{size}\t{p}\n" for p, size in listed).encode()
                    done = await self._capped(request, Captured(text, len(text)))
                    value = [{"path": p, "size": size} for p, size in listed[:1000]]
        finally:
            self.workspace.release(tenant, session)
        return msgspec.structs.replace(done, result=value, exit_code=0,
                                       duration_ms=round((time.monotonic() - started) * 1000, 3))


def tool_runner(node_id: str, bus: Bus, settings: Settings) -> ToolRunner:
    """The node's runner, wired from settings. A sandbox that cannot be set up (no
    bubblewrap) is logged and every sandboxed call answers `sandbox_error` with why;
    the node still serves inference and the other tools."""
    from services.node import sandbox as sandboxes

    denied = sandboxes.node_endpoints()  # NATS, Postgres, metrics: never reachable
    sandbox: Any
    try:
        sandbox = sandboxes.Sandbox(settings.node_dir / "sandbox", denied=denied)
    except Exception as exc:  # noqa: BLE001 - reported on every call that needs it
        log.error("no tool sandbox on this node: %s", exc)
        sandbox = Unavailable(f"{type(exc).__name__}: {exc}")
    workspace = WorkspaceStore(bus.js, quota_bytes=int(settings.workspace_quota_mb * 2**20),
                               timeout_s=max(5.0, settings.request_timeout_s * 6))
    return ToolRunner(node_id, bus, sandbox, workspace, settings.node_dir / "tools",
                      max_concurrency=settings.node_tool_concurrency,
                      output_store_bytes=int(settings.tool_output_store_mb * 2**20),
                      denied_endpoints=denied)


class Unavailable:
    """Stands for a sandbox that could not be set up: every run says why."""

    python = ("python3",)

    def __init__(self, why: str) -> None:
        self.why = why

    async def run(self, argv: list[str], **kwargs: Any) -> Any:
        raise RuntimeError(f"no sandbox on this node ({self.why[:200]})")
