"""Every process logs in to NATS as itself, and a node may speak only for itself.

`nexus up`'s NATS config comes from `shared.infra.nats_auth`: the services
(`orchestrator`, `provider`) with full rights, and one user `node-<id>` per node that
may publish only under `nexus.node.<id>.`, subscribe to its own subjects, the node
ping and inboxes, and answer the requests it received. These tests run a real
nats-server with that config and real clients; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from shared.contracts import subjects
from shared.infra import EmbeddedNats
from shared.infra.nats_auth import (
    CredentialsError,
    NatsCredentials,
    NatsUser,
    authorization_config,
    dev_credentials,
    load_credentials,
    load_or_create_credentials,
    node_inbox_prefix,
)
from shared.contracts.messages import Heartbeat, NodeStatusChange
from shared.infra.messaging import Bus, subscriptions_held
from shared.domain.nodes import load_or_create_node_id
from tests.support import wait_until

NODE_A = uuid.uuid4().hex
NODE_B = uuid.uuid4().hex


@dataclass(frozen=True)
class Secured:
    nats: EmbeddedNats
    credentials: NatsCredentials


def secured_nats(data_dir: Path, **options: object) -> Secured:
    credentials = dev_credentials(data_dir, [NODE_A, NODE_B])
    server = EmbeddedNats(data_dir, extra_config=authorization_config(credentials, **options))
    server.start()
    return Secured(server, credentials)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """NATS configured exactly as `nexus up` configures it, with two nodes."""
    s = secured_nats(tmp_path_factory.mktemp("secured") / "nats")
    yield s
    s.nats.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """The optional settings: private inboxes per node, streamed replies."""
    s = secured_nats(tmp_path_factory.mktemp("strict") / "nats",
                     private_inboxes=True, max_responses=-1, response_ttl_s=600)
    yield s
    s.nats.stop()


@dataclass
class Login:
    """A real nats-py connection and the errors the server reported to it."""

    nc: NatsClient
    errors: list[Exception]

    def violated(self, operation: str, subject: str) -> bool:
        # nats-py lowercases the server's -ERR text
        needle = f'permissions violation for {operation} to "{subject.lower()}"'
        return any(needle in str(e) for e in self.errors)


Connect = Callable[..., Awaitable[Login]]


@pytest.fixture
async def login() -> AsyncIterator[Connect]:
    opened: list[Login] = []

    async def connect(server: Secured, user: NatsUser, **options: object) -> Login:
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc = await nats.connect(server.nats.url, user=user.name, password=user.password,
                                error_cb=on_error, allow_reconnect=False, connect_timeout=5,
                                **options)
        opened.append(conn := Login(nc, errors))
        return conn

    yield connect
    for conn in opened:
        await conn.nc.close()


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def heartbeat(node_id: str, seq: int = 1) -> Heartbeat:
    return Heartbeat(node_id=node_id, seq=seq, sent_at=time.time(), cpu_pct=12.5, memory_pct=40.0)


async def publish_until_received(login: Login, subject: str, received: list[Msg],
                                 receiver: NatsClient) -> None:
    """Publish `subject` from `login` until `received` has a message, at most 30 times,
    0.5 s apart: core NATS delivers at most once, and what the tests assert is who may
    send what. The first message used to be lost now and then (in CI, and in 1 of 20 to
    70 fresh servers here) because the receiver's SUB had not reached the server yet
    (nats-py's flush overtakes a queued SUB); since `collect` waits for
    `subscriptions_held`, 120 of 120 first messages arrived (40 runs of this file)."""
    for _ in range(30):
        await login.nc.publish(subject, b"{}")
        await login.nc.flush()
        try:
            await eventually(lambda: received, f"{subject} to arrive", timeout=0.5)
            return
        except AssertionError:
            continue
    raise AssertionError(f"{subject} never arrived: receiver connected {receiver.is_connected}; "
                         f"sender connected {login.nc.is_connected}, errors {login.errors}")


async def collect(nc: NatsClient, subject: str) -> list[Msg]:
    """Subscribe (server has it when this returns); messages land in the returned list."""
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=on_msg)
    await subscriptions_held(nc)
    return got


# -- publishing: only as itself ------------------------------------------------------

async def test_a_node_publishes_its_own_heartbeat_and_the_orchestrator_receives_it(
        secured: Secured, login: Connect) -> None:
    orchestrator = await login(secured, secured.credentials.service("orchestrator"))
    node_a = await login(secured, secured.credentials.node(NODE_A))
    received = await collect(orchestrator.nc, subjects.NODE_HEARTBEAT_ALL)

    await node_a.nc.publish(subjects.node_status(NODE_A), b"{}")
    await publish_until_received(node_a, subjects.node_heartbeat(NODE_A), received,
                                 orchestrator.nc)
    await orchestrator.nc.flush()
    assert {m.subject for m in received} == {subjects.node_heartbeat(NODE_A)}
    assert node_a.errors == []


async def test_a_node_cannot_publish_heartbeats_registrations_or_status_as_another_node(
        secured: Secured, login: Connect) -> None:
    orchestrator = await login(secured, secured.credentials.service("orchestrator"))
    node_a = await login(secured, secured.credentials.node(NODE_A))
    received = await collect(orchestrator.nc, f"{subjects.NODE_PREFIX}.>")
    forged = [subjects.node_heartbeat(NODE_B), subjects.node_register(NODE_B),
              subjects.node_status(NODE_B), f"{subjects.NODE_PREFIX}.{NODE_B}.reply"]

    for subject in forged:
        await node_a.nc.publish(subject, b'{"node_id": "%s"}' % NODE_B.encode())
    # Then an allowed message: the server keeps A's order, so once the orchestrator
    # has it, it would have had any forged one that got through.
    await publish_until_received(node_a, subjects.node_heartbeat(NODE_A), received,
                                 orchestrator.nc)
    await orchestrator.nc.flush()
    assert {m.subject for m in received} == {subjects.node_heartbeat(NODE_A)}
    await eventually(lambda: all(node_a.violated("publish", s) for s in forged),
                     "A to be told each forged publish was refused")
    assert node_a.nc.is_connected  # refused, not disconnected


async def test_a_node_cannot_subscribe_to_another_nodes_subjects(
        secured: Secured, login: Connect) -> None:
    orchestrator = await login(secured, secured.credentials.service("orchestrator"))
    node_a = await login(secured, secured.credentials.node(NODE_A))
    node_b = await login(secured, secured.credentials.node(NODE_B))
    infer_b = f"{subjects.NODE_PREFIX}.{NODE_B}.infer"
    spying = [await node_a.nc.subscribe(infer_b),
              await node_a.nc.subscribe(f"{subjects.NODE_PREFIX}.{NODE_B}.>"),
              await node_a.nc.subscribe(f"{subjects.NODE_PREFIX}.>")]
    await subscriptions_held(node_a.nc)

    async def answer_as_b(msg: Msg) -> None:
        await msg.respond(b"from B")

    await node_b.nc.subscribe(infer_b, cb=answer_as_b)
    await subscriptions_held(node_b.nc)

    reply = await orchestrator.nc.request(infer_b, b"for B only", timeout=5)

    assert reply.data == b"from B"
    await node_a.nc.flush()
    assert [sub.pending_msgs for sub in spying] == [0, 0, 0]  # A never saw B's request
    await eventually(lambda: all(node_a.violated("subscription", s.subject) for s in spying),
                     "A to be told its subscriptions were refused")


async def test_a_node_answers_requests_it_received_but_no_other_inbox(
        secured: Secured, login: Connect) -> None:
    orchestrator = await login(secured, secured.credentials.service("orchestrator"))
    node_a = await login(secured, secured.credentials.node(NODE_A))
    infer_a = f"{subjects.NODE_PREFIX}.{NODE_A}.infer"

    async def answer(msg: Msg) -> None:
        await msg.respond(b"from A")

    await node_a.nc.subscribe(infer_a, cb=answer)
    await node_a.nc.subscribe(subjects.PING_NODE, queue=subjects.QUEUE_NODE, cb=answer)
    await subscriptions_held(node_a.nc)
    forged_inbox = orchestrator.nc.new_inbox()
    forged = await orchestrator.nc.subscribe(forged_inbox)
    await subscriptions_held(orchestrator.nc)

    await node_a.nc.publish(forged_inbox, b"unsolicited")  # asked nothing on it: refused
    await node_a.nc.flush()
    assert (await orchestrator.nc.request(infer_a, b"hi", timeout=5)).data == b"from A"
    assert (await orchestrator.nc.request(subjects.PING_NODE, b"{}", timeout=5)).data == b"from A"

    assert forged.pending_msgs == 0  # A's forged publish came first: it would be here
    await eventually(lambda: node_a.violated("publish", forged_inbox),
                     "A to be told its unsolicited inbox publish was refused")


async def test_a_node_answers_each_request_once(secured: Secured, login: Connect) -> None:
    """`allow_responses: true` is one reply within 2 minutes; streaming needs `max_responses`."""
    orchestrator = await login(secured, secured.credentials.service("orchestrator"))
    node_a = await login(secured, secured.credentials.node(NODE_A))
    infer_a = f"{subjects.NODE_PREFIX}.{NODE_A}.infer"

    async def answer_twice(msg: Msg) -> None:
        await msg.respond(b"first")
        await msg.respond(b"second")

    await node_a.nc.subscribe(infer_a, cb=answer_twice)
    await subscriptions_held(node_a.nc)
    inbox = orchestrator.nc.new_inbox()
    replies = await collect(orchestrator.nc, inbox)

    await orchestrator.nc.publish(infer_a, b"hi", reply=inbox)

    await eventually(lambda: node_a.violated("publish", inbox), "the second reply to be refused")
    await orchestrator.nc.flush()
    assert [m.data for m in replies] == [b"first"]


async def test_a_node_has_no_jetstream_api(secured: Secured, login: Connect) -> None:
    node_a = await login(secured, secured.credentials.node(NODE_A))
    with pytest.raises(nats.errors.TimeoutError):  # the request is dropped, not answered
        await node_a.nc.jetstream(timeout=0.5).account_info()
    await eventually(lambda: node_a.violated("publish", "$JS.API.INFO"),
                     "A to be told the JetStream API is not for it")


# -- logging in ----------------------------------------------------------------------

async def test_a_wrong_or_missing_password_is_rejected_without_echoing_it(
        secured: Secured) -> None:
    wrong = "Wrong-password-" + uuid.uuid4().hex
    for user, password in (("orchestrator", wrong), (f"node-{NODE_A}", wrong),
                           (f"node-{NODE_A}", secured.credentials.node(NODE_B).password),
                           (None, None)):
        with pytest.raises(nats.errors.Error, match="Authorization Violation") as refused:
            await nats.connect(secured.nats.url, user=user, password=password,
                               allow_reconnect=False, connect_timeout=5)
        assert wrong not in str(refused.value)
    server_log = secured.nats.log_path.read_text()
    assert "authentication error" in server_log
    for secret in [wrong, *(u.password for u in secured.credentials.users())]:
        assert secret not in server_log


async def test_services_manage_streams_and_node_heartbeats_land_in_the_heartbeat_stream(
        secured: Secured) -> None:
    creds = secured.credentials
    orchestrator = await Bus.connect(secured.nats.url, "orchestrator", user="orchestrator",
                                     password=creds.service("orchestrator").password)
    provider = await Bus.connect(secured.nats.url, "provider", user="provider",
                                 password=creds.service("provider").password)
    node_a = await Bus.connect(secured.nats.url, "node", user=creds.node(NODE_A).name,
                               password=creds.node(NODE_A).password)
    try:
        await orchestrator.ensure_streams()  # creates
        await provider.ensure_streams()      # updates in place
        followed: list[Heartbeat] = []

        async def on_heartbeat(hb: Heartbeat, msg: Msg) -> None:
            followed.append(hb)

        # what the orchestrator's NodeService does: an ordered consumer on the stream
        await orchestrator.subscribe_stream(subjects.NODE_HEARTBEAT_ALL, Heartbeat, on_heartbeat)

        await node_a.publish(subjects.node_heartbeat(NODE_B), heartbeat(NODE_B), traced=False)
        await node_a.publish(subjects.node_heartbeat(NODE_A), heartbeat(NODE_A, 7), traced=False)
        await node_a.publish(subjects.node_status(NODE_A),
                             NodeStatusChange(node_id=NODE_A, status="draining"))
        await node_a.nc.flush()

        await eventually(lambda: followed, "the orchestrator to follow A's heartbeat")
        assert [(hb.node_id, hb.seq) for hb in followed] == [(NODE_A, 7)]
        stored = await orchestrator.js.get_last_msg(subjects.HEARTBEATS_STREAM.name,
                                                    subjects.node_heartbeat(NODE_A))
        assert stored.subject == subjects.node_heartbeat(NODE_A)
        with pytest.raises(NotFoundError):
            await orchestrator.js.get_last_msg(subjects.HEARTBEATS_STREAM.name,
                                               subjects.node_heartbeat(NODE_B))
    finally:
        for bus in (node_a, provider, orchestrator):
            await bus.close()


# -- the stricter options: private inboxes, streamed replies --------------------------

async def test_with_private_inboxes_a_node_reads_only_its_own_replies(
        strict: Secured, login: Connect) -> None:
    orchestrator = await login(strict, strict.credentials.service("orchestrator"))
    node_a = await login(strict, strict.credentials.node(NODE_A),
                         inbox_prefix=node_inbox_prefix(NODE_A))
    node_b = await login(strict, strict.credentials.node(NODE_B),
                         inbox_prefix=node_inbox_prefix(NODE_B))

    async def ack(msg: Msg) -> None:
        await msg.respond(b"ack")

    await orchestrator.nc.subscribe(subjects.NODE_REGISTER_ALL, cb=ack)
    await subscriptions_held(orchestrator.nc)
    snoop = await node_a.nc.subscribe("_INBOX.>")
    await subscriptions_held(node_a.nc)

    # B registers (request/reply through its own inbox): A cannot see the answer
    for node_id, node in ((NODE_B, node_b), (NODE_A, node_a)):
        reply = await node.nc.request(subjects.node_register(node_id), b"{}", timeout=5)
        assert reply.data == b"ack"

    assert snoop.pending_msgs == 0
    await eventually(lambda: node_a.violated("subscription", "_INBOX.>"),
                     "A to be told it may not read every inbox")


async def test_with_max_responses_a_node_streams_a_reply(strict: Secured, login: Connect) -> None:
    orchestrator = await login(strict, strict.credentials.service("orchestrator"))
    node_a = await login(strict, strict.credentials.node(NODE_A),
                         inbox_prefix=node_inbox_prefix(NODE_A))
    infer_a = f"{subjects.NODE_PREFIX}.{NODE_A}.infer"

    async def stream(msg: Msg) -> None:
        for i in range(5):
            await msg.respond(b"chunk %d" % i)

    await node_a.nc.subscribe(infer_a, cb=stream)
    await subscriptions_held(node_a.nc)
    inbox = orchestrator.nc.new_inbox()
    chunks = await collect(orchestrator.nc, inbox)

    await orchestrator.nc.publish(infer_a, b"hi", reply=inbox)

    await eventually(lambda: len(chunks) == 5, "all five chunks")
    assert [m.data for m in chunks] == [b"chunk %d" % i for i in range(5)]
    assert node_a.errors == []


# -- the credentials file ------------------------------------------------------------

def test_credentials_are_kept_private_and_stable(tmp_path: Path, secured: Secured) -> None:
    path = tmp_path / "nats" / "credentials.json"
    first = load_or_create_credentials(path, node_ids=[NODE_A])
    mtime = path.stat().st_mtime_ns

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_credentials(path, node_ids=[NODE_A]) == first
    assert path.stat().st_mtime_ns == mtime  # nothing new: not rewritten
    assert load_credentials(path) == first
    assert sorted(first.services) == ["orchestrator", "provider"]
    assert first.node(NODE_A).name == f"node-{NODE_A}"
    passwords = [u.password for u in first.users()]
    assert len(set(passwords)) == 3 and all(len(p) >= 43 for p in passwords)

    more = load_or_create_credentials(path, node_ids=[NODE_B])
    assert more.node(NODE_A) == first.node(NODE_A)
    assert more.service("provider") == first.service("provider")
    assert more.node(NODE_B).password not in passwords

    path.chmod(0o644)  # loosened by hand: tightened again on the next load
    load_or_create_credentials(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(secured.nats.config_path.stat().st_mode) == 0o600  # nats.conf too

    shown = " ".join([repr(more), str(more), *(f"{u!r} {u}" for u in more.users())])
    assert f"node-{NODE_B}" in shown
    assert not any(u.password in shown for u in more.users())


def test_a_damaged_credentials_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text('{"services": {"orchestrator": "short"}}')
    with pytest.raises(CredentialsError, match="orchestrator") as refused:
        load_or_create_credentials(path)
    assert "short" not in str(refused.value)

    path.write_text('{"services": {"orchestrator": "SeCrEt-but-broken-json')
    with pytest.raises(CredentialsError, match="malformed") as refused:
        load_or_create_credentials(path)
    assert "SeCrEt" not in str(refused.value)


def test_names_that_could_escape_a_subject_or_the_config_are_refused(tmp_path: Path) -> None:
    for bad in ("a.b", "*", ">", 'x" }', "", "a" * 65):
        with pytest.raises(ValueError):
            load_or_create_credentials(tmp_path / "c.json", node_ids=[bad])


# -- `nexus up` ------------------------------------------------------------------------

@pytest.mark.slow
def test_nexus_up_gives_each_service_its_own_nats_login(tmp_path: Path) -> None:
    from tests.test_nexus_up import Up

    up = Up(tmp_path / "nexus").start()  # every service answers a ping
    try:
        node_id = load_or_create_node_id(up.data_dir / "node")

        def node_online() -> bool:
            nodes = httpx.get(f"{up.api}/v1/nodes", timeout=5, headers=up.headers).json()["nodes"]
            return [(n["node_id"], n["status"]) for n in nodes] == [(node_id, "online")]

        wait_until(node_online, 30, 0.2, "the node to register under its own login")

        monitor = f"http://127.0.0.1:{up.env['NEXUS_NATS_MONITOR_PORT']}"
        conns = httpx.get(f"{monitor}/connz?auth=true", timeout=5).json()["connections"]
        users = {c["name"]: c.get("authorized_user") for c in conns}
        # `nexus up` imports the shipped models into the store in the background, under
        # the control plane's login, while the services start; it may still be running
        assert users.pop("nexus-cli", "orchestrator") == "orchestrator"
        assert users == {"nexus-orchestrator": "orchestrator", "nexus-provider": "provider",
                         "nexus-node": f"node-{node_id}"}

        async def anonymous() -> None:
            await nats.connect(up.state()["nats_url"], allow_reconnect=False, connect_timeout=5)

        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(anonymous())

        credentials = up.data_dir / "nats" / "credentials.json"
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        passwords = [*json.loads(credentials.read_text())["services"].values(),
                     *json.loads(credentials.read_text())["nodes"].values()]
        assert len(passwords) == 3
    finally:
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    written = [up.output(), *(p.read_text(errors="replace")
                              for p in (up.data_dir / "logs").glob("*.log")),
               (up.data_dir / "nats" / "nats.log").read_text(errors="replace")]
    assert not any(pw in text for pw in passwords for text in written)


# -- the session workspaces (JetStream Object Store) -----------------------------------

async def test_a_node_uses_the_workspace_buckets_but_no_other_stream_nor_another_nodes_name(
        strict: Secured, login: Connect) -> None:
    """Exactly as under `nexus up`: the services create the buckets, a node puts, gets,
    lists and deletes objects in them through its private inbox, and still cannot
    manage them, read another stream or publish as another node."""
    from shared.infra.workspace import WorkspaceStore

    creds = strict.credentials
    orchestrator = await Bus.connect(strict.nats.url, "orchestrator", user="orchestrator",
                                     password=creds.service("orchestrator").password)
    node_a = await login(strict, creds.node(NODE_A), inbox_prefix=node_inbox_prefix(NODE_A))
    try:
        await orchestrator.ensure_streams()  # the buckets too
        received = await collect(orchestrator.nc, f"{subjects.NODE_PREFIX}.>")
        store = WorkspaceStore(node_a.nc.jetstream(timeout=2), quota_bytes=2**20, timeout_s=5)
        await store.write("acme", "s1", "dir/a.txt", b"x" * 300_000)  # chunked: 3 messages
        assert (await store.read("acme", "s1", "dir/a.txt"))[0] == b"x" * 300_000
        await store.write("acme", "s1", "dir/a.txt", b"small")  # the old blob is deleted
        assert list(await store.manifest("acme", "s1")) == ["dir/a.txt"]
        ref = await store.put_output("acme", "s1", "call-1", b"y" * 1000)
        assert await store.get_output(ref) == b"y" * 1000
        assert node_a.errors == []

        js = node_a.nc.jetstream(timeout=0.5)
        refused = [f"$JS.API.STREAM.DELETE.{subjects.WORKSPACE_BUCKET.stream}",
                   f"$JS.API.STREAM.UPDATE.{subjects.WORKSPACE_BUCKET.stream}",
                   f"$JS.API.STREAM.INFO.{subjects.HEARTBEATS_STREAM.name}"]
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(subjects.WORKSPACE_BUCKET.stream)
        with pytest.raises(nats.errors.TimeoutError):
            await js.stream_info(subjects.HEARTBEATS_STREAM.name)
        await node_a.nc.publish(f"$JS.API.STREAM.UPDATE.{subjects.WORKSPACE_BUCKET.stream}", b"{}")
        await node_a.nc.publish(subjects.node_heartbeat(NODE_B), b"{}")  # as another node
        await publish_until_received(node_a, subjects.node_heartbeat(NODE_A), received,
                                     orchestrator.nc)
        await orchestrator.nc.flush()
        assert {m.subject for m in received} == {subjects.node_heartbeat(NODE_A)}
        await eventually(lambda: all(node_a.violated("publish", s) for s in
                                     [*refused, subjects.node_heartbeat(NODE_B)]),
                         "A to be told each refused publish was refused")
        info = await orchestrator.js.stream_info(subjects.WORKSPACE_BUCKET.stream)
        assert info.config.max_bytes == subjects.WORKSPACE_BUCKET.max_bytes  # unchanged
    finally:
        await orchestrator.close()
