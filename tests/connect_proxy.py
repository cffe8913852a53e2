"""A small real HTTP CONNECT proxy for the outbound tests, on 127.0.0.1.

It answers `CONNECT host:port HTTP/1.1` by opening a TCP connection to the target and then
relays bytes both ways, never looking inside (the TLS session is the guest's host and the
upstream's). Names in `hosts` resolve to the address given, the way a proxy's own resolver
would answer for names the test machine does not know. Every request line it receives is
kept in `requests`, so a test sees what went through it and what did not.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

HEAD_LIMIT = 16 * 1024
"""Bytes of request head the proxy reads before it gives up on a client."""


@dataclass
class ConnectProxy:
    port: int
    hosts: dict[str, str]
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _relay(source: socket.socket, sink: socket.socket) -> None:
    """Copy `source` to `sink` until either side closes."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    proxy: ConnectProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data or len(head) > HEAD_LIMIT:
                return
            head += data
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        self.proxy.requests.append(line)
        method, _, rest = line.partition(" ")
        target = rest.partition(" ")[0]
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or not port.isdigit():
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            return
        try:
            upstream = socket.create_connection((self.proxy.hosts.get(host, host), int(port)), 5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        with upstream:
            upstream.settimeout(None)
            client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            back = threading.Thread(target=_relay, args=(upstream, client), daemon=True)
            back.start()
            _relay(client, upstream)
            back.join()


@contextlib.contextmanager
def connect_proxy(hosts: dict[str, str] | None = None) -> Iterator[ConnectProxy]:
    """Run a CONNECT proxy on a free 127.0.0.1 port until the block ends."""
    proxy = ConnectProxy(0, dict(hosts or {}))
    handler = type("Handler", (_Handler,), {"proxy": proxy})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
