"""The HTTP server, over real loopback sockets: httpx for ordinary requests, raw bytes where the
wire matters. Timeouts run on trio's autojump clock, so they cost no real time."""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from supervisor import server as server_module
from supervisor.errors import BodyTooLarge
from supervisor.server import (
    FIRST_REQUEST_GRACE_S,
    IDLE_SWEEP_S,
    Request,
    RequestBody,
    Response,
    ServerConfig,
    bound_port,
    open_listeners,
    serve,
)

TEXT = (b"content-type", b"text/plain")
LIMIT = 1000  # the body limit the echo handler reads with
TEST_DEADLINE_S = 60  # a server that never answers fails the test instead of hanging it


async def echo(request: Request, body: RequestBody) -> Response:
    """Answers with the request as the handler saw it, body included."""
    data = await body.read(LIMIT)
    seen = asdict(request) | {"body": data.decode("latin-1")}
    return Response(200, [(b"content-type", b"application/json")], json.dumps(seen).encode())


async def hello(request: Request, body: RequestBody) -> Response:
    """Never reads the body."""
    return Response(200, [TEXT], f"hello {request.path}".encode())


@asynccontextmanager
async def running(handler, config: ServerConfig | None = None) -> AsyncIterator[Server]:
    listeners = await open_listeners("127.0.0.1", 0)
    shutdown = trio.Event()
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            config = config or ServerConfig()
            await nursery.start(partial(serve, handler, listeners, config, shutdown=shutdown))
            yield Server(bound_port(listeners), shutdown)
            shutdown.set()


@dataclass
class Server:
    port: int
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connect(self, source: str | None = None) -> Raw:
        """A connection from 127.0.0.1, or from `source` (another loopback address)."""
        if source is None:
            return Raw(await trio.open_tcp_stream("127.0.0.1", self.port))
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", self.port))
        return Raw(trio.SocketStream(sock))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Raw:
    """A client that writes bytes and parses responses itself (pipelining, HTTP/1.0...)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, *, head_only: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        status = int(status_line.split(" ")[1])
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(status, headers, body)

    async def closed_by_server(self) -> bool:
        """True once the server closed its side with nothing more to read."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
        return not data and not self.buffer

    async def close(self) -> None:
        await self.stream.aclose()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError(f"server closed; unparsed: {self.buffer!r}")
        self.buffer += data


def get(path: str = "/", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: example.test", *headers, "", ""]
    return "\r\n".join(lines).encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: example.test", *headers, "", ""]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.insert(2, f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode() + body


# --- ordinary requests ------------------------------------------------------------------


async def test_handler_sees_the_request_and_response_carries_server_headers():
    async with running(echo) as server, httpx.AsyncClient() as client:
        response = await client.get(f"{server.url}/demo/hello?x=1&y", headers={"X-Thing": "A b"})
    seen = response.json()
    assert response.status_code == 200
    assert seen["method"] == "GET"
    assert seen["target"] == "/demo/hello?x=1&y"
    assert (seen["path"], seen["query"], seen["has_query"]) == ("/demo/hello", "x=1&y", True)
    assert seen["http_version"] == "1.1"
    assert ["x-thing", "A b"] in seen["headers"]
    assert seen["host"] == f"127.0.0.1:{server.port}"
    assert (seen["client_addr"], seen["server_port"]) == ("127.0.0.1", server.port)
    assert re.fullmatch(r"[0-9a-f]{16}", seen["request_id"])
    assert response.headers["x-request-id"] == seen["request_id"]
    assert response.headers["server"] == "wasm-supervisor"
    assert response.headers["content-length"] == str(len(response.content))


async def test_query_absent_or_empty():
    async with running(echo) as server, httpx.AsyncClient() as client:
        bare = (await client.get(f"{server.url}/a")).json()
        empty = (await client.get(f"{server.url}/a?")).json()
    assert (bare["path"], bare["query"], bare["has_query"]) == ("/a", "", False)
    assert (empty["path"], empty["query"], empty["has_query"]) == ("/a", "", True)


@pytest.mark.parametrize(
    ("target", "path", "query", "host"),
    [
        ("http://a.test:8080/x/y?q=1", "/x/y", "q=1", "a.test:8080"),
        ("HTTPS://A.test", "/", "", "A.test"),
        ("http://a.test?q", "/", "q", "a.test"),
    ],
)
async def test_absolute_form_target_gives_its_path_and_its_authority_as_host(
    target: str, path: str, query: str, host: str
):
    """RFC 9112 §3.2.2: the target's authority replaces Host, for routing and for the guest."""
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(f"GET {target} HTTP/1.1\r\nHost: other.test\r\n\r\n".encode())
        seen = json.loads((await raw.reply()).body)
        await raw.close()
    assert (seen["path"], seen["query"], seen["host"]) == (path, query, host)
    assert ["host", host] in seen["headers"]


async def test_request_ids_differ():
    async with running(hello) as server, httpx.AsyncClient() as client:
        ids = {(await client.get(server.url)).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_post_body_is_read():
    async with running(echo) as server, httpx.AsyncClient() as client:
        response = await client.post(f"{server.url}/p", content=b"payload")
    assert response.json()["body"] == "payload"


# --- connection reuse -------------------------------------------------------------------


async def test_keep_alive_serves_requests_one_after_another():
    async with running(hello) as server:
        raw = await server.connect()
        for path in ("/one", "/two", "/three"):
            await raw.send(get(path))
            reply = await raw.reply()
            assert (reply.status, reply.body) == (200, f"hello {path}".encode())
            assert "connection" not in reply.headers
        await raw.close()


async def test_pipelined_requests_are_answered_in_order():
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(get("/1") + post("/2", b"two") + get("/3"))
        replies = [await raw.reply() for _ in range(3)]
        await raw.close()
    seen = [json.loads(reply.body) for reply in replies]
    assert [(s["path"], s["body"]) for s in seen] == [("/1", ""), ("/2", "two"), ("/3", "")]


async def test_pipelined_heads_of_both_parsers_are_answered_in_order_then_a_bad_one_closes():
    # Plain GETs take the fast head parser; a body, a `Content-Length: 0` and a bare-LF head
    # take h11's: the bytes after each must reach the next request whichever parser read it.
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(
            get("/1")
            + post("/2", b"two")
            + get("/3", "Content-Length: 0")
            + b"GET /4 HTTP/1.1\nHost: x\n\n"
            + get("/5")
            + b"NOT A REQUEST\r\n\r\n"
        )
        replies = [await raw.reply() for _ in range(6)]
        assert await raw.closed_by_server()
        await raw.close()
    seen = [json.loads(reply.body) for reply in replies[:5]]
    assert [(s["path"], s["body"]) for s in seen] == [
        ("/1", ""),
        ("/2", "two"),
        ("/3", ""),
        ("/4", ""),
        ("/5", ""),
    ]
    assert replies[5].status == 400


async def test_http10_closes_after_the_response():
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(get("/old", version="1.0"))
        reply = await raw.reply()
        assert json.loads(reply.body)["http_version"] == "1.0"
        assert reply.headers["connection"] == "close"
        assert await raw.closed_by_server()
        await raw.close()


async def test_http10_keep_alive_when_asked():
    async with running(hello) as server:
        raw = await server.connect()
        for path in ("/a", "/b"):
            await raw.send(get(path, "Connection: Keep-Alive", version="1.0"))
            reply = await raw.reply()
            assert (reply.status, reply.body) == (200, f"hello {path}".encode())
            assert reply.headers["connection"] == "keep-alive"
        await raw.send(get("/c", version="1.0"))
        assert (await raw.reply()).headers["connection"] == "close"
        assert await raw.closed_by_server()
        await raw.close()


async def test_connection_close_from_client_is_honoured():
    async with running(hello) as server:
        raw = await server.connect()
        await raw.send(get("/", "Connection: close"))
        assert (await raw.reply()).headers["connection"] == "close"
        assert await raw.closed_by_server()
        await raw.close()


async def test_connection_close_from_handler_is_honoured():
    async def closing(request: Request, body: RequestBody) -> Response:
        return Response(200, [(b"Connection", b"close")], b"bye")

    async with running(closing) as server:
        raw = await server.connect()
        await raw.send(get("/"))
        reply = await raw.reply()
        assert (reply.body, reply.headers["connection"]) == (b"bye", "close")
        assert await raw.closed_by_server()
        await raw.close()


# --- bodies -----------------------------------------------------------------------------


async def test_chunked_body_is_read_across_writes():
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(post("/c", b"", "Transfer-Encoding: chunked"))
        for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"):
            await raw.send(piece)
        reply = await raw.reply()
        await raw.close()
    assert json.loads(reply.body)["body"] == "hello world"


async def test_expect_100_continue_is_sent_when_the_handler_reads():
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(post("/e", b"", "Content-Length: 4", "Expect: 100-continue"))
        assert (await raw.reply()).status == 100
        await raw.send(b"data")
        reply = await raw.reply()
        assert (reply.status, json.loads(reply.body)["body"]) == (200, "data")
        await raw.close()


async def test_expect_100_continue_is_not_sent_when_the_handler_does_not_read():
    async with running(hello) as server:
        raw = await server.connect()
        await raw.send(post("/e", b"", "Content-Length: 4", "Expect: 100-continue"))
        reply = await raw.reply()
        # The client never sent its body and may still do so: the connection cannot be reused.
        assert (reply.status, reply.headers["connection"]) == (200, "close")
        assert await raw.closed_by_server()
        await raw.close()


async def test_small_unread_body_is_discarded_and_the_connection_kept():
    async with running(hello) as server:
        raw = await server.connect()
        await raw.send(post("/ignored", b"x" * 5000) + get("/next"))
        first, second = await raw.reply(), await raw.reply()
        await raw.close()
    assert "connection" not in first.headers
    assert second.body == b"hello /next"


async def test_large_unread_body_closes_the_connection():
    async with running(hello) as server, httpx.AsyncClient() as client:
        response = await client.post(f"{server.url}/big", content=b"x" * 1_000_000)
    assert response.status_code == 200
    assert response.headers["connection"] == "close"


async def test_content_length_over_the_limit_is_refused_before_reading():
    read_started = False

    async def limited(request: Request, body: RequestBody) -> Response:
        nonlocal read_started
        try:
            await body.read(10)
        except BodyTooLarge:
            read_started = True
            raise
        return Response(200, [], b"unexpected")

    async with running(limited) as server:
        raw = await server.connect()
        await raw.send(post("/p", b"", "Content-Length: 5000", "Expect: 100-continue"))
        reply = await raw.reply()  # no 100 Continue first: the body is refused unsent
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert read_started
        await raw.close()


async def test_large_body_over_the_limit_gets_413_not_a_reset():
    async with running(echo) as server, httpx.AsyncClient() as client:
        response = await client.post(f"{server.url}/big", content=b"x" * 2_000_000)
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["x-request-id"])


async def test_body_over_the_limit_is_refused_without_resetting_the_upload():
    async with running(echo) as server:
        raw = await server.connect()
        # The server answers before it has read all this. Closing with bytes unread would
        # send a RST, which can destroy the 413 in flight and fails the client's next send.
        await raw.send(post("/", b"", "Content-Length: 2000000") + b"x" * 100_000)
        reply = await raw.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        await raw.send(b"x" * 10_000)  # a client notices the answer only after some more
        assert await raw.closed_by_server()
        await raw.close()


async def test_chunked_body_over_the_limit_is_refused_as_it_streams():
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 400  # the third chunk passes LIMIT

    async with running(echo) as server, httpx.AsyncClient() as client:
        response = await client.post(f"{server.url}/c", content=chunks())
    assert response.status_code == 413


async def test_small_body_over_the_limit_keeps_the_connection():
    async with running(echo) as server:
        raw = await server.connect()
        await raw.send(post("/p", b"z" * (LIMIT + 1)) + get("/after"))
        refused, after = await raw.reply(), await raw.reply()
        await raw.close()
    assert refused.status == 413 and "connection" not in refused.headers
    assert json.loads(after.body)["path"] == "/after"


async def test_body_can_be_read_only_once():
    async def twice(request: Request, body: RequestBody) -> Response:
        await body.read(LIMIT)
        await body.read(LIMIT)
        return Response(200, [], b"")

    async with running(twice) as server, httpx.AsyncClient() as client:
        response = await client.post(server.url, content=b"once")
    assert response.status_code == 500


# --- HEAD and statuses without a body ---------------------------------------------------


async def test_head_has_the_get_length_and_no_body():
    async with running(hello) as server:
        raw = await server.connect()
        await raw.send(get("/h").replace(b"GET", b"HEAD", 1) + get("/h"))
        head = await raw.reply(head_only=True)
        full = await raw.reply()  # parses only if the HEAD response had no body
        await raw.close()
    assert head.status == full.status == 200
    assert head.headers["content-length"] == full.headers["content-length"] == "8"
    assert full.body == b"hello /h"


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_and_no_length_for_204_and_304(status: int):
    async def empty(request: Request, body: RequestBody) -> Response:
        return Response(status, [], b"")

    async with running(empty) as server:
        raw = await server.connect()
        await raw.send(get("/") + get("/"))
        replies = [await raw.reply(), await raw.reply()]
        await raw.close()
    assert [r.status for r in replies] == [status, status]
    assert "content-length" not in replies[0].headers


# --- bad requests -----------------------------------------------------------------------


async def _answer_then_close(server: Server, data: bytes) -> Reply:
    raw = await server.connect()
    await raw.send(data)
    reply = await raw.reply()
    assert reply.headers["connection"] == "close"
    assert "x-request-id" in reply.headers
    assert await raw.closed_by_server()
    await raw.close()
    return reply


@pytest.mark.parametrize(
    "data",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        post("/", b"0\r\n\r\n", "Content-Length: 5", "Transfer-Encoding: chunked"),
    ],
    ids=["request-line", "header-line", "content-length", "length-and-chunked"],
)
async def test_malformed_request_gets_400_then_close(data: bytes):
    async with running(hello) as server:
        assert (await _answer_then_close(server, data)).status == 400


async def test_unknown_transfer_coding_gets_501():
    async with running(hello) as server:
        reply = await _answer_then_close(server, post("/", b"", "Transfer-Encoding: gzip"))
    assert reply.status == 501


@pytest.mark.parametrize("in_one_write", [True, False], ids=["complete", "never-ending"])
async def test_head_over_the_limit_gets_431_then_close(in_one_write: bool):
    config = ServerConfig(max_head_bytes=4096)
    head = get("/", f"X-Big: {'b' * 5000}")
    if not in_one_write:
        head = head[:-4]  # no blank line: the head never ends
    async with running(hello, config) as server:
        assert (await _answer_then_close(server, head)).status == 431


async def test_head_just_under_the_limit_is_served():
    config = ServerConfig(max_head_bytes=4096)
    request = get("/")
    request = get("/", "X-Fill: " + "f" * (4096 - len(request) - len("X-Fill: \r\n")))
    assert len(request) == 4096
    async with running(hello, config) as server:
        raw = await server.connect()
        await raw.send(request)
        assert (await raw.reply()).status == 200
        await raw.close()


# --- handler failures -------------------------------------------------------------------


async def test_handler_exception_is_500_logged_and_the_connection_survives(caplog):
    async def flaky(request: Request, body: RequestBody) -> Response:
        if request.path == "/boom":
            raise RuntimeError("secret detail")
        return Response(200, [], b"fine")

    caplog.set_level(logging.ERROR, logger="supervisor.server")
    async with running(flaky) as server:
        raw = await server.connect()
        await raw.send(get("/boom"))
        failed = await raw.reply()
        await raw.send(get("/ok"))
        ok = await raw.reply()
        await raw.close()
    assert failed.status == 500
    assert b"secret" not in failed.body
    assert "connection" not in failed.headers
    assert ok.body == b"fine"
    [record] = caplog.records
    assert failed.headers["x-request-id"] in record.getMessage()
    assert "secret detail" in record.exc_text


@pytest.mark.parametrize(
    "response",
    [
        Response(200, [(b"x-evil", b"a\r\nset-cookie: stolen")], b""),
        Response(200, [(b"bad name", b"v")], b""),
        Response(200, [], b"", reason=b"OK\r\nx: y"),
        Response(101, [], b""),
        Response(200, [("x-str", "not bytes")], b""),  # type: ignore[list-item]
    ],
    ids=["value-crlf", "name-space", "reason-crlf", "status-1xx", "str-header"],
)
async def test_invalid_response_from_handler_becomes_500(response: Response):
    async def bad(request: Request, body: RequestBody) -> Response:
        return response

    async with running(bad) as server:
        raw = await server.connect()
        await raw.send(get("/"))
        reply = await raw.reply()
        await raw.close()
    assert reply.status == 500
    assert "set-cookie" not in reply.headers and "x" not in reply.headers


async def test_handler_headers_are_sent_and_server_owned_ones_replaced():
    async def custom(request: Request, body: RequestBody) -> Response:
        headers = [(b"X-Custom", b"1"), (b"content-length", b"999"), (b"server", b"other")]
        return Response(418, headers, b"tea", reason=b"I'm a teapot")

    async with running(custom) as server, httpx.AsyncClient() as client:
        response = await client.get(server.url)
    assert (response.status_code, response.reason_phrase) == (418, "I'm a teapot")
    assert response.headers["x-custom"] == "1"
    assert response.headers.get_list("server") == ["wasm-supervisor"]
    assert response.headers.get_list("content-length") == ["3"]


# --- clients that vanish ----------------------------------------------------------------


def _reset(raw: Raw) -> None:
    """Close with a RST instead of a FIN, as a crashed client or a middlebox would."""
    raw.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    raw.stream.socket.close()


async def test_client_reset_while_sending_the_body_does_not_hurt_the_server():
    outcomes: list[str] = []
    reading = trio.Event()

    async def reader(request: Request, body: RequestBody) -> Response:
        reading.set()
        try:
            await body.read(LIMIT)
        except Exception as exc:
            outcomes.append(type(exc).__name__)
            raise
        return Response(200, [], b"")

    async with running(reader) as server:
        raw = await server.connect()
        await raw.send(post("/", b"", "Content-Length: 500") + b"partial")
        await reading.wait()
        _reset(raw)
        async with httpx.AsyncClient() as client:
            response = await client.post(server.url, content=b"still serving")
    assert outcomes == ["BadRequest"]
    assert response.status_code == 200


async def test_client_gone_before_the_response_does_not_hurt_the_server():
    release = trio.Event()
    started = trio.Event()

    async def slow(request: Request, body: RequestBody) -> Response:
        if request.path == "/slow":
            started.set()
            await release.wait()
        return Response(200, [], b"x" * 100_000)

    async with running(slow) as server:
        raw = await server.connect()
        await raw.send(get("/slow"))
        await started.wait()
        _reset(raw)
        release.set()
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{server.url}/fast")
    assert response.status_code == 200


# --- timeouts ---------------------------------------------------------------------------


async def test_slow_client_is_cut_off_at_the_head_timeout(autojump_clock):
    config = ServerConfig(head_timeout_s=10.0)
    async with running(hello, config) as server:
        raw = await server.connect()
        start = trio.current_time()

        async def dribble() -> None:
            for byte in get("/", "X-Slow: " + "s" * 100):
                await raw.send(bytes([byte]))
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            reply = await raw.reply()
            assert await raw.closed_by_server()
            nursery.cancel_scope.cancel()
        assert reply.status == 408
        assert 10.0 <= trio.current_time() - start < 11.0
        await raw.close()


async def test_connection_that_sends_nothing_is_closed_silently(autojump_clock):
    async with running(hello, ServerConfig(head_timeout_s=10.0)) as server:
        raw = await server.connect()
        start = trio.current_time()
        assert await raw.closed_by_server()  # no 408: there was no request to answer
        assert 10.0 <= trio.current_time() - start <= 10.0 + IDLE_SWEEP_S
        await raw.close()


async def test_idle_keep_alive_connection_closes_after_the_timeout(autojump_clock):
    async with running(hello, ServerConfig(keep_alive_timeout_s=5.0)) as server:
        raw = await server.connect()
        await raw.send(get("/"))
        await raw.reply()
        idle_since = trio.current_time()
        await trio.sleep(4.0)
        await raw.send(get("/again"))  # within the timeout: still open
        assert (await raw.reply()).body == b"hello /again"
        idle_since = trio.current_time()
        assert await raw.closed_by_server()
        assert 5.0 <= trio.current_time() - idle_since <= 5.0 + IDLE_SWEEP_S
        await raw.close()


async def test_body_not_sent_in_time_gets_408(autojump_clock):
    async with running(echo, ServerConfig(body_timeout_s=30.0)) as server:
        raw = await server.connect()
        await raw.send(post("/", b"", "Content-Length: 10") + b"12345")
        start = trio.current_time()
        reply = await raw.reply()
        assert (reply.status, reply.headers["connection"]) == (408, "close")
        assert 30.0 <= trio.current_time() - start < 31.0
        await raw.close()


# --- limits and shutdown ----------------------------------------------------------------


async def test_connections_past_the_limit_wait_while_every_one_is_busy():
    calls: list[str] = []
    release = trio.Event()

    async def busy_first(request: Request, body: RequestBody) -> Response:
        calls.append(request.path)
        if request.path == "/first":
            await release.wait()
        return Response(200, [], b"")

    async with running(busy_first, ServerConfig(max_connections=1)) as server:
        first = await server.connect()
        await first.send(get("/first"))
        second = await server.connect()  # the kernel completes it; the server does not accept
        await second.send(get("/second"))
        await trio.testing.wait_all_tasks_blocked()
        assert calls == ["/first"]
        release.set()
        assert (await first.reply()).status == 200
        # Now idle, the first connection gives its place to the one waiting.
        assert (await second.reply()).status == 200
        assert calls == ["/first", "/second"]
        assert await first.closed_by_server()
        await first.close()
        await second.close()


async def test_at_the_limit_a_new_connection_replaces_the_oldest_idle_of_the_biggest_holder():
    async with running(hello, ServerConfig(max_connections=3)) as server:
        quiet = await server.connect(source="127.0.0.3")
        hoarder_old = await server.connect(source="127.0.0.2")
        hoarder_new = await server.connect(source="127.0.0.2")
        for raw in (quiet, hoarder_old, hoarder_new):  # served, in this order: now idle
            await raw.send(get("/"))
            assert (await raw.reply()).status == 200
        newcomer = await server.connect(source="127.0.0.3")
        await newcomer.send(get("/new"))
        assert (await newcomer.reply()).body == b"hello /new"
        assert await hoarder_old.closed_by_server()
        for raw in (quiet, hoarder_new):
            await raw.send(get("/again"))
            assert (await raw.reply()).status == 200
        for raw in (quiet, hoarder_old, hoarder_new, newcomer):
            await raw.close()


async def test_a_client_past_its_idle_cap_loses_its_oldest_idle_connections():
    async with running(hello, ServerConfig(max_idle_per_client=2)) as server:
        others = await server.connect(source="127.0.0.3")
        await others.send(get("/"))
        await others.reply()
        mine = [await server.connect(source="127.0.0.2") for _ in range(4)]
        for raw in mine:
            await raw.send(get("/"))
            assert (await raw.reply()).status == 200
        for raw in mine[:2]:
            assert await raw.closed_by_server()
        for raw in [*mine[2:], others]:
            await raw.send(get("/still-open"))
            assert (await raw.reply()).status == 200
        for raw in [*mine, others]:
            await raw.close()


@pytest.mark.parametrize("field", ["max_connections", "max_idle_per_client"])
def test_connection_limits_below_one_are_refused(field: str):
    with pytest.raises(ValueError, match=f"{field} must be at least 1, got 0"):
        ServerConfig(**{field: 0})


async def test_graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones():
    started, release = trio.Event(), trio.Event()

    async def slow(request: Request, body: RequestBody) -> Response:
        if request.path == "/slow":
            started.set()
            await release.wait()
        return Response(200, [], b"done")

    async with running(slow) as server:
        idle = await server.connect()
        await idle.send(get("/quick"))
        await idle.reply()
        busy = await server.connect()
        await busy.send(get("/slow"))
        await started.wait()

        server.shutdown.set()
        assert await idle.closed_by_server()  # idle keep-alive connections close at once
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", server.port)
        release.set()
        reply = await busy.reply()
        assert (reply.status, reply.body, reply.headers["connection"]) == (200, b"done", "close")
        assert await busy.closed_by_server()
        await idle.close()
        await busy.close()


async def test_a_connection_accepted_before_shutdown_still_gets_its_first_request_served():
    async with running(hello) as server:
        fresh = await server.connect()  # accepted, but its request comes after shutdown began
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown.set()
        await trio.testing.wait_all_tasks_blocked()
        await fresh.send(get("/late"))
        reply = await fresh.reply()
        assert (reply.status, reply.body, reply.headers["connection"]) == (
            200,
            b"hello /late",
            "close",
        )
        assert await fresh.closed_by_server()
        await fresh.close()


async def test_a_fresh_connection_that_sends_nothing_is_closed_soon_after_shutdown(
    autojump_clock,
):
    async with running(hello) as server:
        fresh = await server.connect()
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        server.shutdown.set()
        assert await fresh.closed_by_server()
        assert trio.current_time() - start <= FIRST_REQUEST_GRACE_S + IDLE_SWEEP_S
        await fresh.close()


async def test_shutdown_cancels_requests_still_running_after_the_grace_period(autojump_clock):
    started = trio.Event()
    cancelled = False

    async def stuck(request: Request, body: RequestBody) -> Response:
        nonlocal cancelled
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled = True
            raise

    config = ServerConfig(grace_period_s=30.0)
    async with running(stuck, config) as server:
        raw = await server.connect()
        await raw.send(get("/"))
        await started.wait()
        start = trio.current_time()
        server.shutdown.set()
        assert await raw.closed_by_server()
        assert trio.current_time() - start == pytest.approx(30.0)
        await raw.close()
    assert cancelled


# --- listeners --------------------------------------------------------------------------


async def test_open_listeners_on_port_zero_share_one_port():
    listeners = await open_listeners("localhost", 0)
    try:
        assert len(listeners) == 1
        assert bound_port(listeners) > 0
    finally:
        for listener in listeners:
            await listener.aclose()


@pytest.mark.parametrize(
    ("data", "over"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100, False),  # ends within; more follows
        (b"GET / HTTP/1.1\r\nHost: x\n\n" + b"x" * 100, False),  # bare LF ends a head too
        (b"GET / HTTP/1.1\r\nX: " + b" " * 100 + b"v\r\n\r\n", True),  # padding past the limit
        (b"GET / HTTP/1.1\r\nHost: x\r\n", False),  # not over yet: more may end it in time
    ],
)
def test_a_head_is_over_the_limit_only_when_no_blank_line_ends_it_within(data, over):
    """The check that refuses an oversized head before either parser reads it."""
    assert server_module.head_over_limit(data, 64) is over


def test_a_head_of_exactly_the_limit_is_not_over_it():
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert not server_module.head_over_limit(head + b"GET", len(head))
    assert server_module.head_over_limit(head + b"GET", len(head) - 1)
