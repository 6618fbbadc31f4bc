"""A node runs tool calls: `nexus.node.<id>.tool`, answered as a frame stream.

A real node process (real NATS, real sandbox, the workspace in a real JetStream Object
Store) and a real local HTTP server; the tests speak to the node exactly as the
orchestrator does, with `StreamReceiver` and `ToolExecRequest`. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from shared.contracts import subjects
from shared.contracts.frames import Failed, ToolDone
from shared.contracts.messages import ToolExecRequest, ToolLimits
from shared.domain.nodes import load_or_create_node_id
from shared.infra.messaging import Bus, NoResponders, RequestTimeout
from shared.infra.streaming import StreamReceiver
from tests.conftest import Infra
from tests.support import ServiceProc, service_env, wait_until

QUOTA_MB = 1
CONCURRENCY = 2
SECRET = "Sup3r-secret-token-value"


class Node:
    def __init__(self, infra: Infra, tmp: Path) -> None:
        self.dir = tmp / "node"
        self.node_id = load_or_create_node_id(self.dir)
        self.env = service_env(infra.nats_url, "", NEXUS_NODE_DATA_DIR=str(self.dir),
                               NEXUS_NODE_TOOL_CONCURRENCY=str(CONCURRENCY),
                               NEXUS_WORKSPACE_QUOTA_MB=str(QUOTA_MB),
                               NEXUS_INSTANCE_ID="node-tools-test")
        self.env.pop("DATABASE_URL")
        self.log = tmp / "node.log"
        self.proc = ServiceProc("node", self.env, self.log)

    def start(self) -> Node:
        self.proc = ServiceProc("node", self.env, self.log).start()
        return self


class Site:
    """A local HTTP server: `/hello` answers text, `/echo` repeats the
    Authorization header it received (`/echo-token` its token), `/to?p=PORT` redirects to another local port."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/to":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{url.query[2:]}/hello")
                    self.end_headers()
                    return
                auth = self.headers.get("Authorization", "")
                body = (auth if url.path == "/echo" else
                        "token=" + auth.split()[-1] if url.path == "/echo-token" else
                        json.dumps({"path": url.path, "query": url.query}))
                self.send_response(200 if url.path != "/missing" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def allow(self) -> tuple[str, ...]:
        return (f"127.0.0.1:{self.port}",)


@pytest.fixture(scope="module")
def node(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(infra, tmp_path_factory.mktemp("node-tools")).start()
    yield n
    if n.proc.proc is not None and n.proc.proc.poll() is None:
        n.proc.stop()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    yield s
    s.server.shutdown()


@pytest.fixture
async def bus(infra: Infra) -> AsyncIterator[Bus]:
    b = await Bus.connect(infra.nats_url, "test-node-tools")
    yield b
    await b.close()


def request(target: str, arguments: dict | None = None, *, session: str, tenant: str = "acme",
            filesystem: str = "none", network: tuple[str, ...] = (), kind: str = "builtin",
            limits: ToolLimits | None = None, **more: object) -> ToolExecRequest:
    return ToolExecRequest(tool_call_id=uuid.uuid4().hex, tenant=tenant, session_id=session,
                           tool=target, kind=kind, target=target, arguments=arguments or {},
                           limits=limits or ToolLimits(timeout_s=20), network=network,
                           filesystem=filesystem, **more)


async def call(bus: Bus, node: Node, req: ToolExecRequest, *, idle_timeout_s: float = 10.0
               ) -> ToolDone | Failed:
    async with StreamReceiver(bus, subjects.node_tool(node.node_id), req,
                              first_frame_timeout_s=15, idle_timeout_s=idle_timeout_s) as rx:
        async for frame in rx.frames():
            assert isinstance(frame, (ToolDone, Failed)), frame
            return frame
    raise AssertionError("the stream ended without a final frame")


async def ready(bus: Bus, node: Node) -> None:
    """Until the node answers on its tool subject."""
    for _ in range(300):
        try:
            await call(bus, node, request("files.list", session="probe", filesystem="ro"))
            return
        except (NoResponders, RequestTimeout):
            await asyncio.sleep(0.1)
    raise AssertionError(f"the node never answered:\n{node.log.read_text()[-3000:]}")


def session() -> str:
    return uuid.uuid4().hex


async def test_python_answers_its_stdout_and_a_json_result(bus: Bus, node: Node) -> None:
    await ready(bus, node)
    done = await call(bus, node, request("python", {"code": (
        "import sys\nprint('hello from the sandbox')\nprint('careful', file=sys.stderr)\n"
        "result = {'sum': sum(range(10)), 'items': ['a', None, 1.5]}\n")}, session=session()))

    assert isinstance(done, ToolDone), done
    assert (done.is_error, done.exit_code) == (False, 0)
    assert done.result == {"sum": 45, "items": ["a", None, 1.5]}
    assert done.output == "hello from the sandbox\n[stderr]\ncareful\n"  # the result line is not output
    assert done.node == node.node_id and done.duration_ms > 0 and not done.truncated

    failing = await call(bus, node, request("python", {"code": "result = 1\nraise ValueError('no')"},
                                           session=session()))
    assert isinstance(failing, ToolDone) and failing.is_error and failing.exit_code == 1
    assert "ValueError: no" in failing.output and failing.result == 1

    unjson = await call(bus, node, request("python", {"code": "result = object()"},
                                          session=session()))
    assert isinstance(unjson, ToolDone) and "not JSON" in unjson.result["error"]


async def test_shell_reports_its_exit_code_and_bad_arguments_are_named(bus: Bus, node: Node) -> None:
    await ready(bus, node)
    done = await call(bus, node, request("shell", {"command": "echo out; echo err >&2; exit 3"},
                                        session=session()))
    assert isinstance(done, ToolDone), done
    assert (done.is_error, done.exit_code, done.output) == (True, 3, "out\n[stderr]\nerr\n")

    for target, args, field in (("shell", {"command": 42}, "command"), ("python", {}, "code"),
                                ("nonesuch", {}, "target")):
        bad = await call(bus, node, request(target, args, session=session()))
        assert isinstance(bad, Failed) and bad.error == "invalid_arguments", bad
        assert bad.detail.startswith(f"{field}:")


async def test_files_written_in_one_call_are_read_in_the_next(bus: Bus, node: Node) -> None:
    await ready(bus, node)
    sid = session()
    wrote = await call(bus, node, request("files.write", {"path": "notes/a.txt", "content": "alpha"},
                                         session=sid, filesystem="rw"))
    assert isinstance(wrote, ToolDone) and wrote.result == {"path": "notes/a.txt", "size": 5}

    code = ("import os\ntext = open('notes/a.txt').read()\nopen('b.txt', 'w').write(text.upper())\n"
            "result = sorted(os.listdir('.'))\n")
    ran = await call(bus, node, request("python", {"code": code}, session=sid, filesystem="rw"))
    assert isinstance(ran, ToolDone) and ran.result == ["b.txt", "notes"], ran

    listed = await call(bus, node, request("files.list", session=sid, filesystem="ro"))
    assert isinstance(listed, ToolDone)
    assert listed.result == [{"path": "b.txt", "size": 5}, {"path": "notes/a.txt", "size": 5}]
    read = await call(bus, node, request("files.read", {"path": "./b.txt"}, session=sid,
                                        filesystem="ro"))
    assert isinstance(read, ToolDone) and read.output == "ALPHA"

    # a read-only call changes nothing; deletions by an rw call are kept
    await call(bus, node, request("shell", {"command": "rm -f b.txt; echo x > c.txt"},
                                  session=sid, filesystem="ro"))
    await call(bus, node, request("shell", {"command": "rm notes/a.txt"}, session=sid,
                                  filesystem="rw"))
    listed = await call(bus, node, request("files.list", session=sid, filesystem="ro"))
    assert [f["path"] for f in listed.result] == ["b.txt"]
    other = await call(bus, node, request("files.list", session=session(), filesystem="ro"))
    assert other.result == []  # another session sees none of it

    for args, fs, reason in (({"path": "../x", "content": ""}, "rw", "invalid_arguments"),
                             ({"path": "/etc/passwd", "content": ""}, "rw", "invalid_arguments"),
                             ({"path": "x", "content": ""}, "ro", "permission"),
                             ({"path": "x", "content": ""}, "none", "permission")):
        refused = await call(bus, node, request("files.write", args, session=sid, filesystem=fs))
        assert isinstance(refused, Failed) and refused.error == reason, (args, fs, refused)
    missing = await call(bus, node, request("files.read", {"path": "nope"}, session=sid,
                                           filesystem="ro"))
    assert isinstance(missing, Failed) and missing.error == "not_found"


async def test_http_fetch_reaches_allowed_hosts_only(bus: Bus, node: Node, site: Site,
                                                     infra: Infra) -> None:
    await ready(bus, node)
    sid = session()
    url = f"http://127.0.0.1:{site.port}/hello?x=1"
    ok = await call(bus, node, request("http_fetch", {"url": url}, session=sid, network=site.allow))
    assert isinstance(ok, ToolDone) and not ok.is_error, ok
    assert json.loads(ok.output) == {"path": "/hello", "query": "x=1"}
    assert ok.result["status"] == 200 and ok.result["json"]["path"] == "/hello"

    not_listed = await call(bus, node, request("http_fetch", {"url": url}, session=sid,
                                              network=("example.com",)))
    nats_port = urlsplit(infra.nats_url).port
    nats = await call(bus, node, request("http_fetch", {"url": f"http://127.0.0.1:{nats_port}/"},
                                        session=sid, network=(f"127.0.0.1:{nats_port}",)))
    other = Site()  # a second local server, not on the list: a redirect there is refused
    try:
        redirected = await call(bus, node, request(
            "http_fetch", {"url": f"http://127.0.0.1:{site.port}/to?p={other.port}"},
            session=sid, network=site.allow))
        both = await call(bus, node, request(
            "http_fetch", {"url": f"http://127.0.0.1:{site.port}/to?p={other.port}"},
            session=sid, network=(*site.allow, *other.allow)))
    finally:
        other.server.shutdown()
    for refused in (not_listed, nats, redirected):
        assert isinstance(refused, Failed) and refused.error == "network_denied", refused
    assert "node endpoint" in nats.detail
    assert isinstance(both, ToolDone) and json.loads(both.output)["path"] == "/hello"

    missing = await call(bus, node, request("http_fetch", {"url": f"http://127.0.0.1:{site.port}/missing"},
                                           session=sid, network=site.allow))
    assert isinstance(missing, ToolDone) and missing.is_error and missing.result["status"] == 404


async def test_an_http_tool_fills_its_url_and_never_repeats_its_secret(bus: Bus, node: Node,
                                                                      site: Site) -> None:
    await ready(bus, node)
    spec = {"method": "GET", "url": f"http://127.0.0.1:{site.port}/items/{{id}}",
            "headers": {"Authorization": f"Bearer {SECRET}"}}
    done = await call(bus, node, request("lookup", {"id": "a b/c", "q": "x"}, kind="http",
                                        session=session(), http=spec))
    assert isinstance(done, ToolDone) and not done.is_error, done
    assert done.result["json"] == {"path": "/items/a%20b%2Fc", "query": "q=x"}

    echo = await call(bus, node, request("echo", {}, kind="http", session=session(),
                                        http={**spec, "url": f"http://127.0.0.1:{site.port}/echo"}))
    assert isinstance(echo, ToolDone) and echo.output == "***"  # the server echoed it
    token = await call(bus, node, request("echo", {}, kind="http", session=session(), http={
        **spec, "url": f"http://127.0.0.1:{site.port}/echo-token"}))
    assert isinstance(token, ToolDone) and token.output == "token=***"  # the token alone too
    elsewhere = await call(bus, node, request("x", {}, kind="http", session=session(), http={
        **spec, "url": f"http://127.0.0.1:{site.port}/to?p=1"}))
    assert isinstance(elsewhere, Failed) and elsewhere.error == "network_denied"
    assert SECRET not in node.log.read_text()


async def test_output_above_the_cap_is_truncated_and_kept_whole_in_the_object_store(
        bus: Bus, node: Node) -> None:
    await ready(bus, node)
    code = "for i in range(2000):\n    print(f'line {i:05d}')\n"
    done = await call(bus, node, request("python", {"code": code}, session=session(),
                                        limits=ToolLimits(timeout_s=20, max_output_bytes=1024)))
    assert isinstance(done, ToolDone), done
    whole = "".join(f"line {i:05d}\n" for i in range(2000))
    assert done.truncated and done.output_bytes == len(whole)
    assert len(done.output.encode()) <= 1024 and done.output.startswith("line 00000\n")
    assert "[output truncated" in done.output and done.output_ref
    store = await bus.js.object_store(subjects.parse_output_ref(done.output_ref)[0])
    kept = await store.get(subjects.parse_output_ref(done.output_ref)[1])
    assert kept.data.decode() == whole


async def test_the_session_quota_refuses_a_call_and_keeps_nothing_of_it(bus: Bus, node: Node) -> None:
    await ready(bus, node)
    sid = session()
    small = await call(bus, node, request("shell", {"command": "head -c 1000 /dev/zero > small"},
                                         session=sid, filesystem="rw"))
    assert isinstance(small, ToolDone) and not small.is_error, small
    big = (f"head -c 1000 /dev/zero > second; head -c {QUOTA_MB * 2**20} /dev/zero > big; "
           "rm small")
    over = await call(bus, node, request("shell", {"command": big}, session=sid, filesystem="rw"))
    assert isinstance(over, Failed) and over.error == "quota", over
    assert f"quota of {QUOTA_MB} MiB" in over.detail

    listed = await call(bus, node, request("files.list", session=sid, filesystem="ro"))
    assert listed.result == [{"path": "small", "size": 1000}]  # none of the refused call
    too_big = await call(bus, node, request("files.write", {"path": "w", "content": "x" * 2**20},
                                           session=sid, filesystem="rw"))
    assert isinstance(too_big, Failed) and too_big.error == "quota"


async def test_calls_beyond_the_nodes_concurrency_are_refused_not_queued(bus: Bus, node: Node) -> None:
    await ready(bus, node)
    sleeping = [asyncio.create_task(call(bus, node, request("shell", {"command": "sleep 30"},
                                                             session=session())))
                for _ in range(CONCURRENCY)]
    await asyncio.sleep(0.5)  # both requests are out before the first probe
    try:
        for _ in range(200):  # until both run (each answers Started at once; wait for overload)
            refused = await call(bus, node, request("shell", {"command": "true"}, session=session()))
            if isinstance(refused, Failed):
                break
            await asyncio.sleep(0.05)
        assert isinstance(refused, Failed) and refused.error == "overloaded", refused
        assert refused.status == 429 and "NEXUS_NODE_TOOL_CONCURRENCY=2" in refused.detail
    finally:
        for task in sleeping:  # the receivers cancel: the node stops the sleeps
            task.cancel()
        await asyncio.gather(*sleeping, return_exceptions=True)
    wait_until(lambda: "tool call cancelled" in node.log.read_text(), 20, 0.1,
               "the node to stop the cancelled calls")
    done = await call(bus, node, request("shell", {"command": "echo free"}, session=session()))
    assert isinstance(done, ToolDone) and done.output == "free\n"


async def test_a_node_killed_mid_call_ends_the_stream_and_its_workspace_survives(
        bus: Bus, node: Node) -> None:
    await ready(bus, node)
    sid = session()
    kept = await call(bus, node, request("files.write", {"path": "kept.txt", "content": "still here"},
                                        session=sid, filesystem="rw"))
    assert isinstance(kept, ToolDone)
    sleeping = asyncio.create_task(call(bus, node, request(
        "shell", {"command": "echo started > lost.txt; sleep 60"}, session=sid, filesystem="rw"),
        idle_timeout_s=5))
    await asyncio.sleep(1.0)  # the call is running
    node.proc.kill()  # SIGKILL

    with pytest.raises(RequestTimeout, match="stream stalled"):
        await asyncio.wait_for(sleeping, 60)  # the idle timeout ends it; never a hang

    node.start()
    await ready(bus, node)
    read = await call(bus, node, request("files.read", {"path": "kept.txt"}, session=sid,
                                        filesystem="ro"))
    assert isinstance(read, ToolDone) and read.output == "still here"
    listed = await call(bus, node, request("files.list", session=sid, filesystem="ro"))
    assert [f["path"] for f in listed.result] == ["kept.txt"]  # the killed call kept nothing
