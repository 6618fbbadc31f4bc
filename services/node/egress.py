"""Egress for sandboxed tools: an allowlist matcher and the proxy that enforces it.

A sandbox never gets the host network. When a tool's permission lists hosts, the node
runs one `EgressProxy` for that call on a unix socket bound into the sandbox (a forwarder
inside listens on 127.0.0.1 and sets HTTP_PROXY/HTTPS_PROXY). The proxy speaks HTTP
CONNECT (any TCP, TLS included) and plain HTTP in absolute form; it refuses every
host:port the allowlist does not name, and always the node's own NATS, Postgres and
metrics endpoints. Names are resolved here, once, and the address checked is the
address connected to (no DNS rebinding between check and connect).

Allowlist entries: "host" (ports 80 and 443), "host:port", "*.example.com" (any
subdomain, ports 80 and 443) or "*.example.com:port", "[::1]:8080" for IPv6 literals.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("nexus.node.egress")

DEFAULT_PORTS = (80, 443)
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
# Always refused on loopback/private/link-local addresses, whatever the allowlist says:
# NATS, its monitor, Postgres (system and embedded), the services' metrics.
ALWAYS_DENIED_PORTS = frozenset({4222, 6222, 8222, 5432, 55432, 9464, 9465})


def _norm_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def parse_entry(entry: str) -> tuple[str, int | None]:
    """("host", port or None) of an allowlist entry; ValueError when malformed."""
    entry = entry.strip()
    if not entry:
        raise ValueError("empty allowlist entry")
    if entry.startswith("["):                                   # [v6] or [v6]:port
        end = entry.find("]")
        if end < 0:
            raise ValueError(f"bad allowlist entry {entry!r}")
        host, rest = entry[1:end], entry[end + 1:]
        port = int(rest[1:]) if rest.startswith(":") else None
    elif entry.count(":") == 1:
        host, p = entry.split(":")
        port = int(p)
    else:
        host, port = entry, None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad port in allowlist entry {entry!r}")
    host = _norm_host(host)
    if not host or any(c in host for c in "/ @?#"):
        raise ValueError(f"bad host in allowlist entry {entry!r}")
    return host, port


def host_allowed(allowlist: Iterable[str], host: str, port: int) -> bool:
    """Whether `host:port` is named by the allowlist (pure; no DNS)."""
    host = _norm_host(host)
    for entry in allowlist:
        try:
            pattern, want = parse_entry(entry)
        except ValueError:
            continue
        if want is None and port not in DEFAULT_PORTS or want is not None and port != want:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def _local_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


class Denied(Exception):
    pass


class EgressProxy:
    """One call's proxy on a unix socket: `await start()`, `await close()`.

    `denied` are "host:port" endpoints refused whatever the allowlist (the node's NATS,
    Postgres, metrics): refused by port on every local address, and on the addresses
    their host names resolve to.
    """

    def __init__(self, socket_path: Path, allowlist: Iterable[str],
                 denied: Iterable[str] = ()) -> None:
        self.socket_path = Path(socket_path)
        self.allowlist = tuple(allowlist)
        self._denied = [parse_entry(d) for d in denied]
        self._denied_ports = ALWAYS_DENIED_PORTS | {p for _, p in self._denied if p}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.refused: list[str] = []      # "host:port why", for the call's report

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o666)   # the sandbox's uid connects through its bind

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def resolve_checked(self, host: str, port: int) -> str:
        """The address to connect to for host:port, or `Denied` (allowlist, node endpoint).

        Usable without `start()`: the node's `http_fetch` checks its URLs with it.
        """
        if not host_allowed(self.allowlist, host, port):
            raise Denied("not in the allowlist")
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError) as e:
            raise Denied(f"cannot resolve: {type(e).__name__}") from None
        addrs = [info[4][0] for info in infos]
        denied_ips: set[str] = set()
        for dhost, dport in self._denied:
            if dport == port:
                with contextlib.suppress(OSError):
                    for info in await loop.getaddrinfo(dhost, dport, type=socket.SOCK_STREAM):
                        denied_ips.add(info[4][0])
        for a in addrs:
            ip = ipaddress.ip_address(a.split("%")[0])
            if a in denied_ips or (port in self._denied_ports and _local_ip(ip)):
                raise Denied("a node endpoint (NATS, Postgres, metrics)")
        return addrs[0]


    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        if len(head) > HEAD_LIMIT:
            return await self._refuse(writer, 431, "request head too large", "-")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        if method.upper() == "CONNECT":
            host, _, p = target.rpartition(":")
            host, port, rest = _norm_host(host), int(p), b""
        else:
            if not target.lower().startswith("http://"):
                return await self._refuse(writer, 400, "only CONNECT or absolute http:// URLs",
                                          target[:100])
            authority, slash, path = target[7:].partition("/")
            authority = authority.rpartition("@")[2]
            if authority.startswith("["):
                h, _, p = authority[1:].partition("]")
                port = int(p[1:]) if p.startswith(":") else 80
                host = h
            elif ":" in authority:
                host, p = authority.split(":", 1)
                port = int(p)
            else:
                host, port = authority, 80
            host = _norm_host(host)
            headers = [ln for ln in lines[1:] if ln and not ln.lower().startswith(
                ("proxy-", "connection:", "keep-alive:"))]
            rest = (f"{method} {slash}{path} {version}\r\n" + "\r\n".join(headers)
                    + "\r\nConnection: close\r\n\r\n").encode("latin-1")
        try:
            addr = await self.resolve_checked(host, port)
        except Denied as e:
            return await self._refuse(writer, 403, f"egress to {host}:{port} refused: {e}",
                                      f"{host}:{port}")
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(addr, port), CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError) as e:
            return await self._refuse(writer, 502, f"cannot connect to {host}:{port}: "
                                      f"{type(e).__name__}", None)
        try:
            if method.upper() == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
            else:
                up_w.write(rest)
            await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        finally:
            up_w.close()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, why: str,
                      target: str | None) -> None:
        if target is not None and status == 403:
            self.refused.append(why)
            log.info("egress refused", extra={"target": target, "reason": why})
        body = (why + "\n").encode()
        writer.write(f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        with contextlib.suppress(OSError):
            await writer.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await asyncio.wait_for(src.read(65536), IDLE_TIMEOUT_S)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    finally:
        with contextlib.suppress(OSError):
            if dst.can_write_eof():
                dst.write_eof()
