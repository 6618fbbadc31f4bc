"""The upstreams' HTTP/1.1 client (`shared.infra.upstreams.http`), against raw servers
over real sockets: every framing of a body, keep-alive reuse, bounded buffering, the
connection limit, timeouts, TLS, and what it refuses to send."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shared.infra.upstreams.http import BUFFER_HIGH, HTTPConnectionError, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server that runs `handler` for each connection, and counts them."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and its Content-Length body); its head is kept."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return await reader.readexactly(length)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1"
        finally:
            server.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body), *extra,
                         b"", body])


async def test_a_body_by_length_by_chunks_or_until_the_close_reads_whole() -> None:
    """Three framings of a body; the keep-alive ones share one connection."""
    server: RawServer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await server.request(reader) == b'{"n": 1}'
        writer.write(ok(b"by length"))
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nby \r\n6\r\nchunks\r\n0\r\n\r\n")
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close")
        await writer.drain()

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        bodies = []
        for _ in range(3):
            async with await pool.request("POST", "/chat", b'{"n": 1}', {}) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
        await pool.close()
    assert bodies == [b"by length", b"by chunks", b"until the close"]
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_a_reader_that_does_not_keep_up_stops_the_socket_being_read(tmp_path: Path) -> None:
    """An upstream sending far faster than the reader takes: the client stops reading
    its socket, so the server is left holding the rest (the process buffers a bounded
    amount), and everything arrives, in order, once the reader goes on."""
    total = 64 * BUFFER_HIGH
    payload = bytes(range(256)) * (total // 256)
    unsent: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(ok(payload))
        await asyncio.sleep(1.0)  # the reader has stopped by now
        unsent.append(writer.transport.get_write_buffer_size())
        await writer.drain()

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        async with await pool.request("POST", "/big", b"", {}) as resp:
            pieces = resp.chunks()
            received = [await anext(pieces)]
            while not unsent:
                await asyncio.sleep(0.05)  # reading nothing
            received += [piece async for piece in pieces]
        await pool.close()
    assert b"".join(received) == payload
    assert unsent[0] > total // 2  # the kernel's buffers hold a few MiB, not the rest


async def test_a_head_or_body_that_stops_coming_is_a_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        if body == b"head":
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url, read_timeout_s=0.3)
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", b"head", {})
        async with await pool.request("POST", "/", b"body", {}) as resp:
            with pytest.raises(TimeoutError):
                await resp.read()
        await pool.close()


async def test_at_most_max_connections_carry_requests_at_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.request(reader)
            await asyncio.sleep(0.05)
            writer.write(ok(body))

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url, max_connections=2)

        async def one(i: int) -> bytes:
            async with await pool.request("POST", "/", b"%d" % i, {}) as resp:
                return await resp.read()

        assert await asyncio.gather(*(one(i) for i in range(8))) == [b"%d" % i for i in range(8)]
        await pool.close()
    assert server.most_open == 2 and server.connections == 2


async def test_a_response_left_unread_closes_its_connection() -> None:
    """A reader that stops half-way (a client gone) leaves nothing on the connection that
    the next request could read as its own answer: the next one gets a new connection."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nfirst\r\n")
            if body == b"abandoned":
                await writer.drain()
                await asyncio.sleep(0.2)
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        async with await pool.request("POST", "/", b"abandoned", {}) as resp:
            assert await anext(resp.chunks()) == b"first"
        async with await pool.request("POST", "/", b"whole", {}) as resp:
            assert await resp.read() == b"firstsecond"
        await pool.close()
    assert server.connections == 2


async def test_a_reused_connection_closed_by_the_server_is_sent_again_once() -> None:
    """Keep-alive announced, then the next request read and the connection closed without
    an answer (llama-server after a streamed completion): that request is sent again on a
    new connection, not failed. One closed after a partial answer is a failure (it may
    have been acted on)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        if body == b"cut":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            return
        writer.write(ok(body, b"Keep-Alive: timeout=5"))
        await writer.drain()
        await server.request(reader)  # the next one: read, never answered

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        for i in range(3):
            async with await pool.request("POST", "/", b"%d" % i, {}) as resp:
                assert await resp.read() == b"%d" % i
        async with await pool.request("POST", "/", b"cut", {}) as resp:
            with pytest.raises(HTTPConnectionError):
                await resp.read()
        await pool.close()
    assert server.connections == 4
    assert len(server.requests) == 7  # 3 answered, 3 dropped unanswered and sent again, cut


async def test_what_is_not_http_or_not_there_is_a_connection_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        with pytest.raises(HTTPConnectionError) as caught:
            await pool.request("POST", "/", b"", {})
        assert caught.value.connected
        await pool.close()
    with pytest.raises(HTTPConnectionError) as refused:  # the server is gone
        await Pool(url).request("POST", "/", b"", {})
    assert not refused.value.connected


async def test_an_interim_response_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))
        await writer.drain()

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        async with await pool.request("POST", "/", b"", {}) as resp:
            assert (resp.status, await resp.read()) == (200, b"final")
        await pool.close()


async def test_credentials_in_the_url_are_basic_auth_and_no_header_can_inject_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(ok(b""))

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url.replace("http://", "http://us%40er:p%3Ass@"))
        async with await pool.request("POST", "/", b"", {}) as resp:
            await resp.read()
        async with await pool.request("POST", "/", b"", {"authorization": "Bearer own"}) as resp:
            await resp.read()
        with pytest.raises(ValueError) as refused:
            await pool.request("POST", "/", b"", {"X-Key": "sk-secret\r\nX-Injected: 1"})
        assert "sk-secret" not in str(refused.value)
        await pool.close()
    assert b"Authorization: Basic dXNAZXI6cDpzcw==\r\n" in server.requests[0]  # us@er:p:ss
    assert b"Basic" not in server.requests[1] and b"authorization: Bearer own" in server.requests[1]
    assert len(server.requests) == 2  # the refused one was never sent


def _self_signed(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nexus test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client = ssl.create_default_context(cafile=str(tmp / "cert.pem"))
    return server, client


async def test_https_checks_the_upstreams_certificate(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(ok(b"over tls"))
        await writer.drain()

    server_tls, trusting = _self_signed(tmp_path)
    server = RawServer(handler, tls=server_tls)
    async with server.running() as url:
        pool = Pool(url, tls=trusting)
        async with await pool.request("POST", "/", b"", {}) as resp:
            assert await resp.read() == b"over tls"
        await pool.close()
        with pytest.raises(HTTPConnectionError) as untrusted:  # the system's trust store
            await Pool(url).request("POST", "/", b"", {})
        assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\n" + b"X-Many: %s\r\n" % (b"v" * 1000) * 100,  # many headers
    b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * (4 << 20),  # one that never ends
], ids=["many", "endless"])
async def test_a_response_head_without_bounds_is_refused(head: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(2)

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url, read_timeout_s=1.5)
        with pytest.raises(HTTPConnectionError, match="head over"):
            await pool.request("POST", "/", b"", {})
        await pool.close()


@pytest.mark.parametrize("later", [False, True], ids=["same-read", "while-idle"])
async def test_bytes_after_the_answer_retire_the_connection(later: bool) -> None:
    """A server that writes more after its answer (a parting 408), in the same read or
    while the connection is idle: the bytes are never read as the next request's answer."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        writer.write(ok(body))
        if later:
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await server.request(reader)
            writer.write(ok(b"late"))

    server = RawServer(handler)
    async with server.running() as url:
        pool = Pool(url)
        for body in (b"first", b"second"):
            async with await pool.request("POST", "/", body, {}) as resp:
                assert (resp.status, await resp.read()) == (200, body)
            await asyncio.sleep(0.2 if later else 0)
        await pool.close()
    assert server.connections == 2
