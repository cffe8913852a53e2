"""HTTP edge cases a hostile client sends on purpose, against the real supervisor: raw bytes on
a loopback socket, because httpx will not send them.

- HTTP/1.0 with `Transfer-Encoding: chunked`: RFC 9112 §6.1 says its framing is faulty and
  the connection must close after the response; it is refused (400) and closed.
- Whitespace padding in the head counts against `max_head_bytes` like any other byte.
- An absolute-form target (RFC 9112 §3.2.2) is routed by its path, its authority in place
  of Host.
"""

from __future__ import annotations

import trio
from conftest import Workspace

from supervisor.server import ServerConfig

ANSWER_S = 5.0
"""A response, or the server closing the connection, must come within this."""
HELLO = b"hello from wasm\n"
"""What tenants/demo/hello.wat answers."""


async def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send `request` on a new connection; the bytes received before the server went quiet
    or closed, and whether it closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    closed = False
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(ANSWER_S):
            while data := await stream.receive_some(65536):
                received += data
            closed = True
    return received, closed


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_http10_chunked_request_is_refused_and_closed(
    workspace: Workspace, start_supervisor
) -> None:
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    request = (
        b"POST /t/hello HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    response, closed = await exchange(running.app.port, request)
    assert status_of(response) == 400
    assert b"connection: close" in response.lower()
    assert closed, "the connection stayed open after an HTTP/1.0 chunked request"


async def test_whitespace_padding_counts_against_max_head_bytes(
    workspace: Workspace, start_supervisor
) -> None:
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    limit = ServerConfig().max_head_bytes
    padding = b" " * (limit // 4)
    padded = b"X-Pad:" + padding + b"a" + padding + b"\r\n"
    for framing in (b"", b"Content-Length: 0\r\n"):  # the fast head parser, then h11
        head = b"GET /t/hello HTTP/1.1\r\nHost: x\r\n" + framing + padded * 3 + b"\r\n"
        assert len(head) > limit
        response, closed = await exchange(running.app.port, head)
        assert status_of(response) == 431, response[:200]
        assert closed


async def test_absolute_form_target_is_routed_by_its_path_and_authority(
    workspace: Workspace, start_supervisor
) -> None:
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    workspace.add_tenant("acme", {"/hello": "hello.wat"}, policy='hosts = ["acme.test"]\n')
    running = await start_supervisor()
    port = running.app.port
    for target in (b"http://127.0.0.1:%d/t/hello" % port, b"HTTP://acme.test/hello?x=1"):
        request = b"GET %s HTTP/1.1\r\nHost: elsewhere.test\r\nConnection: close\r\n\r\n"
        response, _ = await exchange(port, request % target)
        assert status_of(response) == 200, response[:300]
        assert response.endswith(HELLO)
    # RFC 9110 §4.2.1, §4.2.4: an http URI without a host, or with userinfo, is refused.
    for target in (b"http:///t/hello", b"http://user@acme.test/hello"):
        response, _ = await exchange(port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
        assert status_of(response) == 400
