"""HTTP/1.1 server on trio + h11: connections, keep-alive, limits, graceful shutdown.

It knows nothing of tenants or wasm. Each request goes to one async handler, which gets the
parsed head and a `RequestBody` it may read, and returns a whole `Response`.

A common head without a body is parsed by `request_head.py` (~2 µs against h11's ~13);
every other head, and every body, by h11, which stays the authority on what is malformed.
Responses are written here. Every response has a Content-Length, so writing one is a status
line and validated headers, while h11's writer (validate, then rewrite the head for
keep-alive, then run its state machine) cost about half of a hello-world request's Python
time; and h11 cannot keep an HTTP/1.0 connection alive. So a request parsed by h11 gets a
fresh h11 state machine, fed the bytes received but not yet parsed (pipelined requests).

The hot path costs no nursery, no cancel scope, no regex compile, and one `send_all` for a
response of up to `INLINE_BODY_BYTES`.

Timeouts (all on trio's clock, so tests drive them with a mock clock):

    head_timeout_s        the first head of a connection must be complete this long after the
                          accept; a later head, this long after its first bytes arrived.
                          Expired with part of a head received: 408, then close. With nothing
                          received: close without a response (an idle connection is not a
                          request).
    keep_alive_timeout_s  the time allowed between a response and the first bytes of the next
                          request; then the connection closes silently. Idle connections are
                          swept every `IDLE_SWEEP_S`, so it can run that much longer.
    body_timeout_s        the whole body, from the handler's `read`; else `RequestTimeout`
                          (408) and the connection closes.

A body the handler leaves unread (or stops reading at `BodyTooLarge`) is read and dropped
after the response when at most `DISCARD_BODY_BYTES` of it remain, and the connection stays
open. A larger Content-Length rest, a client still waiting for a `100 Continue` it was never
sent, or a broken or late body make the response carry `Connection: close`; a chunked rest
found larger while dropping it closes the connection after the response.

Resource handling: every connection's socket is closed in a `finally`; the listeners are
closed when `serve` stops accepting. At most `max_connections` sockets are open at once (the
caller derives it from RLIMIT_NOFILE, so accept never meets EMFILE). At that limit a client
waiting to connect takes the place of the oldest idle connection of the client holding the
most idle ones, so a flood of idle connections cannot lock others out (`/healthz` keeps
answering); a connection still sending its head counts as idle there (a slow-head flood is
one too). Only when every connection is busy does a new one wait in the kernel's backlog.
No client keeps more than `max_idle_per_client` idle keep-alive connections: past that, its
oldest idle one is closed. A connection still waiting for its first request does not count
against that cap (its bytes may be on their way: a client that opens several connections at
once is not hoarding); `head_timeout_s` and the limit above bound those, and no client holds
more than `max_connections_per_client` connections of any kind: past it, a new connection is
closed as soon as it is accepted, before anything is spent on it.

Error handling: a client that resets or vanishes ends its connection quietly
(`trio.BrokenResourceError`, logged at debug). Protocol errors are answered with h11's
`error_status_hint` (400, 431, 501), logged at debug, and the connection closes. A
`ClientError` out of the handler (such as `BodyTooLarge` from `RequestBody.read`) is answered
with its own status and message; any other exception is a 500 with a generic body, logged
with the request id. Either way the connection lives on if its request was read in full. A
handler is not cancelled when its client goes away (that would take a task per request);
its response is then dropped.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import h11
import trio

from supervisor.errors import BadRequest, BodyTooLarge, ClientError, RequestTimeout
from supervisor.request_head import parse_simple_head

__all__ = [
    "Handler",
    "Request",
    "RequestBody",
    "Response",
    "ServerConfig",
    "bound_port",
    "open_listeners",
    "serve",
    "tls_context",
]

log = logging.getLogger("supervisor.server")

# One `receive_some`: a typical request head (and a small body) arrives in one call; a larger
# read would only fill h11's buffer faster than the handler consumes it.
RECEIVE_CHUNK_BYTES = 64 * 1024

_HEAD_END_RE = re.compile(rb"\n\r?\n")
"""The blank line that ends a head, as h11 finds it (CRLF or bare LF line ends)."""

# Responses whose body is at most this are sent with their head in one `send_all` (one
# syscall, one segment); a larger body is sent on its own rather than copied onto the head.
INLINE_BODY_BYTES = 64 * 1024

# An unread request body of at most this is read and dropped to keep the connection (RFC 9112
# §9.3 lets a server close instead). A bigger one costs the client less to resend on a new
# connection than it would cost us to drain.
DISCARD_BODY_BYTES = 64 * 1024

# Before closing a connection whose client may still be sending, half-close and read (at most
# this much, this long), so the kernel does not answer unread bytes with a RST that destroys
# our last response in flight (RFC 9112 §9.6; Apache's "lingering close").
LINGER_BYTES = 256 * 1024
LINGER_TIMEOUT_S = 2.0

# How often idle connections are checked against their deadline. One sweeping task instead
# of a cancel scope per wait: a trio CancelScope costs ~5 µs, a tenth of a hello request.
IDLE_SWEEP_S = 0.5

# When shutdown begins, a connection that was accepted but has not yet sent its first request
# gets this long to send it (answered with `Connection: close`) instead of being closed at
# once: its client connected before we stopped listening and cannot know to retry.
FIRST_REQUEST_GRACE_S = 1.0
DRAIN_SWEEP_S = 0.05  # while draining, shutdown waits on the sweeper: check more often

# At the connection limit with nothing idle to close, a waiting client is given the next free
# place; this often the accept loop looks again for a connection that has become idle since.
ROOM_RETRY_S = 0.1

# accept() fails with these when the process or kernel is out of descriptors or memory; like
# trio's serve_listeners, wait this long and retry, since closing connections free some.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1

SERVER_NAME = b"wasm-supervisor"
# The server frames the body, names itself, and decides on keep-alive: the handler's copies
# of these are dropped (a handler's `Connection: close` is honoured).
SERVER_OWNED_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"server", b"x-request-id"}
)
# RFC 9110 §6.4.1, §15.3.5, §15.4.5: no content in 204 and 304 responses, and no
# Content-Length (a 304's would describe the representation, which we do not know).
STATUSES_WITHOUT_BODY = frozenset({204, 304})
# RFC 9110 §5.1 field-name = token; §5.5 field-value, without obs-fold and without control
# characters (a recipient may keep them, a sender must not make them).
FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
# RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
REASON_PHRASE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
# RFC 9112 §3.2.2: an absolute-form target (what a client sends to a proxy, and a server
# must accept) is an absolute URI; for http and https, its authority replaces Host (§7.2).
ABSOLUTE_FORM = re.compile(r"(?i:https?)://([^/?#]*)([^#]*)")

PLAIN_TEXT = (b"content-type", b"text/plain; charset=utf-8")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Connection limits. The module docstring says what each timeout covers."""

    max_head_bytes: int = 16 * 1024  # 431 past it; h11's and nginx's default is as large
    head_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    body_timeout_s: float = 30.0
    grace_period_s: float = 30.0  # for in-flight requests once shutdown starts
    max_connections: int = 10_000  # sockets open at once; app.py lowers it to fit RLIMIT_NOFILE
    # Idle connections one client address may hold: a browser opens 6, a proxy's pool a few
    # dozen; more is a client hoarding places (past it, its oldest idle one is closed).
    max_idle_per_client: int = 64
    # Connections of any state one client address may hold: past it, a new one is closed as
    # soon as it is accepted. Far above what a browser or a proxy's pool opens (Knative's
    # queue-proxy is one address for all traffic: keep this above its containerConcurrency).
    max_connections_per_client: int = 256
    # HTTPS: a PEM certificate chain and its PEM private key (PKCS#8, PKCS#1 or SEC1, what
    # Python's ssl loads); None: plain HTTP. Loaded once per `serve` (tls_context).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_idle_per_client", "max_connections_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a TLS certificate and its key go together: give both or neither")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of TLS from PEM files; ValueError naming the file at fault."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])  # h11 speaks HTTP/1.1 only
    for path in (cert, key):
        if not path.is_file():
            raise ValueError(f"TLS: no such file: {path}")
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"TLS: cannot load certificate {cert} with key {key} (PEM expected): {exc}"
        ) from None
    return context


@dataclass(slots=True)
class Request:
    """One request head, decoded once for everything downstream (latin-1 keeps bytes 1:1)."""

    method: str
    target: str  # as sent, e.g. "/demo/hello?x=1"; an absolute-form one in origin form
    path: str  # target before '?'
    query: str  # after '?', "" if none
    has_query: bool
    http_version: str  # "1.0" / "1.1"
    headers: list[tuple[str, str]]  # names lower-cased, order kept
    host: str  # Host header or ""
    client_addr: str  # the client's IP address, without port
    server_port: int  # the local port the request came in on
    request_id: str  # 16 hex chars, also sent as `x-request-id`
    scheme: str = "http"  # "https" on a TLS listener


@dataclass(slots=True)
class Response:
    """What a handler returns; the server adds content-length, server and x-request-id."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reason: bytes = b""  # empty: the standard phrase


class RequestBody:
    """The request body, read at most once, on demand.

    On demand, so a handler can refuse a request (404, 429) before the client sends the body:
    `100 Continue` goes out only when `read` is called.
    """

    __slots__ = ("_conn", "_content_length", "_failed", "_read", "received")

    def __init__(self, conn: _Connection, content_length: int | None) -> None:
        self._conn = conn
        self._content_length = content_length  # None: chunked
        self._read = False
        self._failed = False  # broken or late: the connection cannot be reused
        self.received = 0

    async def read(self, limit: int) -> bytes:
        """Return the whole body, refusing one of more than `limit` bytes.

        Raises `BodyTooLarge` as soon as more than `limit` bytes arrived (a Content-Length
        over it, before reading), `RequestTimeout` when the body takes longer than
        `body_timeout_s`, `BadRequest` when its framing is broken or the client went away.
        """
        if self._read:
            raise RuntimeError("a request body can be read only once")
        self._read = True
        if self._content_length == 0:
            return b""
        if self._content_length is not None and self._content_length > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        conn = self._conn
        h11_conn = conn.h11
        deadline = trio.current_time() + conn.server.config.body_timeout_s
        chunks: list[bytes] = []
        try:
            if h11_conn.they_are_waiting_for_100_continue:
                continue_ = h11.InformationalResponse(status_code=100, headers=[])
                await conn.stream.send_all(h11_conn.send(continue_))
            while True:
                event = h11_conn.next_event()
                if type(event) is h11.Data:
                    self.received += len(event.data)
                    if self.received > limit:
                        raise BodyTooLarge(f"request body over {limit} bytes")
                    chunks.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    return b"".join(chunks)
                elif await conn.receive(deadline) is None:
                    self._failed = True
                    raise RequestTimeout("request body not received in time")
        except h11.RemoteProtocolError as exc:
            self._failed = True
            raise BadRequest(f"bad request body: {exc}") from exc
        except trio.BrokenResourceError as exc:
            self._failed = True
            raise BadRequest("client went away while sending the body") from exc

    @property
    def empty(self) -> bool:
        """No body at all: nothing to read or discard."""
        return self._content_length == 0

    def _discardable(self) -> bool:
        """Whether the unread rest of the body is worth reading to keep the connection."""
        h11_conn = self._conn.h11
        if self._failed or h11_conn.their_state is not h11.SEND_BODY:
            return False
        if h11_conn.they_are_waiting_for_100_continue:
            return False  # the body may never come: it waits for a 100 we did not send
        if self._content_length is None:
            return True  # chunked: try, up to DISCARD_BODY_BYTES
        return self._content_length - self.received <= DISCARD_BODY_BYTES


Handler = Callable[[Request, RequestBody], Awaitable[Response]]


class _Client:
    """The connections of one client address: how many are open, which are idle."""

    __slots__ = ("connections", "idle", "new", "reading")

    def __init__(self) -> None:
        self.connections = 0
        # Waiting for a request, in the order they began to (a dict keeps insertion order):
        # after a response (kept alive), and before the first request (just accepted).
        self.idle: dict[_Connection, None] = {}
        self.new: dict[_Connection, None] = {}
        # Waiting for the rest of a head that came in part: closed at the connection limit
        # like idle ones (a slow head holds a place as long), but never swept as idle.
        self.reading: dict[_Connection, None] = {}


class _Server:
    """State shared by the connections of one `serve` call."""

    def __init__(self, handler: Handler, config: ServerConfig) -> None:
        self.handler = handler
        self.config = config
        self.slots = trio.Semaphore(config.max_connections)
        self.closing = False
        self.clients: dict[str, _Client] = {}  # by address, while it has a connection open
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = tls_context(config.tls_cert, config.tls_key)
        self.scheme = "http" if self.tls is None else "https"
        # Request ids: a random prefix per `serve` and a counter, unique without a syscall.
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count()

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFF:08x}"

    def idle_connections(self) -> Iterator[_Connection]:
        """Every connection waiting for a request, the first one included."""
        for client in self.clients.values():
            yield from client.idle
            yield from client.new

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        server_port = listener.socket.getsockname()[1]
        while True:
            await self._take_slot(listener)
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.slots.release()
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in %s s", exc, ACCEPT_RETRY_S)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            except BaseException:
                self.slots.release()
                raise
            client_addr = _peer_ip(stream)
            client = self.clients.get(client_addr)
            if client is None:
                client = self.clients[client_addr] = _Client()
            elif client.connections >= self.config.max_connections_per_client:
                # Refused here, before a task or a buffer exists for it: a flood of
                # connections from one address costs an accept and a close each.
                self.slots.release()
                stream.socket.close()
                continue
            client.connections += 1  # counted now: tasks start later than a burst of accepts
            nursery.start_soon(self.serve_connection, stream, server_port, client_addr, client)

    async def _take_slot(self, listener: trio.SocketListener) -> None:
        """A place for the next connection; at the limit, made by closing an idle one."""
        while True:
            try:
                self.slots.acquire_nowait()
                return
            except trio.WouldBlock:
                pass
            await trio.lowlevel.wait_readable(listener.socket)  # a client waits to connect
            if self.close_most_idle():
                await self.slots.acquire()  # freed as soon as the closed connection ends
                return
            with trio.move_on_after(ROOM_RETRY_S):
                await self.slots.acquire()
                return

    def close_most_idle(self) -> bool:
        """Close the oldest idle connection of the client holding the most; False if none.

        A kept-alive one goes before one still waiting for its first request, whose bytes
        may be arriving as it is chosen, and that before one still sending its head.
        """
        client = max(self.clients.values(), key=_idle_count, default=None)
        if client is None or not _idle_count(client):
            return False
        _close_oldest(client.idle or client.new or client.reading)
        return True

    async def serve_connection(
        self, stream: trio.abc.Stream, server_port: int, client_addr: str, client: _Client
    ) -> None:
        """Serve one accepted connection, already counted in `client` (its address's).

        Over TLS the handshake happens at the first read, under the head timeout.
        """
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        try:
            conn = _Connection(self, stream, server_port, client_addr, client)
            with conn.scope:
                await conn.run()
        except trio.BrokenResourceError as exc:  # over TLS, also a failed handshake
            log.debug("client went away: %s", exc.__cause__ or exc)
        except Exception:
            log.exception("connection failed")
        finally:
            client.connections -= 1
            if not client.connections:
                del self.clients[client_addr]
            self.slots.release()
            await trio.aclose_forcefully(stream)

    async def sweep_idle(self) -> None:
        """Close connections idle past their deadline (while draining: until none is idle)."""
        while True:
            if self.closing and next(self.idle_connections(), None) is None:
                return
            await trio.sleep(DRAIN_SWEEP_S if self.closing else IDLE_SWEEP_S)
            now = trio.current_time()
            for conn in self.idle_connections():
                if conn.idle_deadline <= now:
                    conn.scope.cancel()

    def begin_shutdown(self) -> None:
        """Close idle connections now (new ones soon); busy ones close after their response."""
        self.closing = True
        grace_deadline = trio.current_time() + FIRST_REQUEST_GRACE_S
        idle_count = 0
        for conn in self.idle_connections():
            idle_count += 1
            if conn.fresh:
                conn.idle_deadline = min(conn.idle_deadline, grace_deadline)
            else:
                conn.scope.cancel()
        open_count = self.config.max_connections - self.slots.value
        log.info("shutting down: %d connection(s) open, %d idle", open_count, idle_count)


def _idle_count(client: _Client) -> int:
    return len(client.idle) + len(client.new) + len(client.reading)


def _close_oldest(waiting: dict[_Connection, None]) -> None:
    """Close the connection waiting longest; it leaves `waiting` now, so it is never chosen
    twice."""
    conn = next(iter(waiting))
    del waiting[conn]
    conn.scope.cancel()


class _Connection:
    """One client connection: reads requests and writes their responses, in order."""

    __slots__ = (
        "accepted_at",
        "client",
        "client_addr",
        "eof",
        "fresh",
        "h11",
        "idle_deadline",
        "pending",
        "scope",
        "server",
        "server_port",
        "stream",
    )

    def __init__(
        self,
        server: _Server,
        stream: trio.abc.Stream,
        server_port: int,
        client_addr: str,
        client: _Client,
    ) -> None:
        self.server = server
        self.stream = stream
        self.server_port = server_port
        self.client_addr = client_addr
        self.client = client
        self.pending = b""  # bytes received and not yet parsed (the next request's)
        self.eof = False  # the client closed its side after `pending`
        self.h11: h11.Connection | None = None  # the current request's, when h11 parsed it
        self.fresh = True  # no request read yet
        self.accepted_at = trio.current_time()
        self.idle_deadline = self.accepted_at
        self.scope = trio.CancelScope()  # cancelled to close the connection while idle

    async def run(self) -> None:
        config = self.server.config
        idle_deadline = self.accepted_at + config.head_timeout_s
        first = True
        while True:
            try:
                head = await self._read_head(idle_deadline, first)
                if head is None:
                    return
                request, body, keep_alive = self._parse_head(*head)
            except h11.RemoteProtocolError as exc:
                log.debug("bad request head from %s: %s", self.client_addr, exc)
                await self._send_error(exc.error_status_hint)
                await self._linger()
                return
            self.fresh = False
            if not await self._exchange(request, body, keep_alive):
                return
            first = False
            idle_deadline = trio.current_time() + config.keep_alive_timeout_s

    async def receive(self, deadline: float) -> bytes | None:
        """Feed h11 the client's next bytes and return them (b"" at EOF); None if none came
        by `deadline`."""
        with trio.move_on_at(deadline):
            data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
            self.h11.receive_data(data)
            return data
        return None

    async def _read_head(self, idle_deadline: float, first: bool) -> _RawHead | None:
        """The next request head's parts, or None when the connection should just close."""
        if not self.pending and (self.eof or not await self._receive_idle(idle_deadline)):
            return None
        if head_over_limit(self.pending, self.server.config.max_head_bytes):
            # Refused before either parser reads it: parsing 60 KB of padding took 0.35 ms
            # (fast parser) to 1.2 ms (h11) of the event loop, per request.
            raise h11.RemoteProtocolError("head over max_head_bytes", error_status_hint=431)
        simple = parse_simple_head(self.pending)
        if simple is not None:
            self.pending = self.pending[simple.size :]
            return (
                simple.method,
                simple.target,
                simple.http_version,
                simple.headers,
                simple.size,
            )
        self.h11 = h11_conn = _new_h11(self.server.config)
        h11_conn.receive_data(self.pending)
        received = len(self.pending)
        if self.eof:
            h11_conn.receive_data(b"")
        self.pending = b""
        event = h11_conn.next_event()
        if event is h11.NEED_DATA:
            start = self.accepted_at if first else trio.current_time()
            deadline = start + self.server.config.head_timeout_s
            reading = self.client.reading
            reading[self] = None
            try:
                while event is h11.NEED_DATA:
                    data = await self.receive(deadline)
                    if data is None:
                        log.debug("request head from %s not complete in time", self.client_addr)
                        await self._send_error(HTTPStatus.REQUEST_TIMEOUT)
                        return None
                    received += len(data)
                    event = h11_conn.next_event()
            finally:
                reading.pop(self, None)
        if type(event) is h11.Request:
            # The head's size as sent, padding included: what h11 left unparsed follows it.
            size = received - len(h11_conn.trailing_data[0])
            headers = event.headers.raw_items()
            return event.method, event.target, event.http_version, headers, size
        return None  # ConnectionClosed: the client is done

    async def _receive_idle(self, deadline: float) -> bool:
        """Wait for the first bytes of a request; False on EOF, or closed while idle."""
        server = self.server
        if server.closing and not self.fresh:
            return False
        if server.closing:
            deadline = min(deadline, trio.current_time() + FIRST_REQUEST_GRACE_S)
        self.idle_deadline = deadline
        if self.fresh:
            waiting = self.client.new
            waiting[self] = None
        else:
            waiting = self.client.idle
            waiting[self] = None
            if len(waiting) > server.config.max_idle_per_client:
                _close_oldest(waiting)
        try:
            data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
        finally:
            waiting.pop(self, None)
        if not data or self.scope.cancel_called:
            return False  # EOF, or swept as the bytes came: as if they came too late
        self.pending = data
        return True

    def _parse_head(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        raw_headers: Iterable[tuple[bytes, bytes]],
        size: int,
    ) -> tuple[Request, RequestBody, bool]:
        """Decode the head; also say whether the client asked to keep the connection.

        Raises h11.RemoteProtocolError: 431 for a head over `max_head_bytes`, counted in bytes
        as received, whitespace padding included (h11 bounds only a head still incomplete, so
        one that came in a single read is measured here); 400 for both Content-Length and
        Transfer-Encoding, which RFC 9112 §6.1 lets a server refuse since a proxy in front may
        have framed it the other way (request smuggling); 400 for Transfer-Encoding in an
        HTTP/1.0 request, whose framing §6.1 says is faulty (§6.3: 400, then close); 400 for
        an absolute-form target without a host or with userinfo (RFC 9110 §4.2.1, §4.2.4).
        """
        if size > self.server.config.max_head_bytes:
            raise h11.RemoteProtocolError(f"head of {size} bytes", error_status_hint=431)
        target_text = target.decode("latin-1")
        authority = None
        if target_text[:1] != "/":
            target_text, authority = _origin_form(target_text)
        path, has_query, query = target_text.partition("?")
        headers = []
        host = ""
        content_length = None
        chunked = False
        connection = None
        for raw_name, raw_value in raw_headers:
            name = raw_name.lower().decode("latin-1")
            value = raw_value.decode("latin-1")
            headers.append((name, value))
            if name == "host":
                host = value
            elif name == "content-length":
                content_length = int(value)  # h11 checked: digits, one value
            elif name == "transfer-encoding":
                chunked = True  # h11 refuses every coding but chunked (501)
            elif name == "connection":
                connection = value.lower()
        version = http_version.decode("ascii")
        if chunked:
            if content_length is not None:
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding")
            if version < "1.1":
                raise h11.RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        elif not content_length:
            # No body (RFC 9112 §6.3): the request is complete. h11's EndOfMessage is left
            # unread (it consumes no bytes): `_exchange` knows the body is done, and the next
            # head is parsed from the bytes after this one.
            content_length = 0
        if authority is not None:
            # RFC 9112 §3.2.2: the target's authority, not the Host header, names the host.
            host = authority
            headers = [(name, authority if name == "host" else value) for name, value in headers]
        # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
        if connection is None:
            keep_alive = version >= "1.1"
        elif version >= "1.1":
            keep_alive = "close" not in _tokens(connection)
        else:
            keep_alive = "keep-alive" in _tokens(connection)
        request = Request(
            method=method.decode("ascii"),
            target=target_text,
            path=path,
            query=query,
            has_query=bool(has_query),
            http_version=version,
            headers=headers,
            host=host,
            client_addr=self.client_addr,
            server_port=self.server_port,
            request_id=self.server.new_request_id(),
            scheme=self.server.scheme,
        )
        return request, RequestBody(self, content_length), keep_alive

    async def _exchange(self, request: Request, body: RequestBody, keep_alive: bool) -> bool:
        """Answer one request; True if the connection can take another."""
        server = self.server
        try:
            response = await server.handler(request, body)
        except ClientError as exc:
            log.debug("request %s: %s", request.request_id, exc)
            response = _error_response(exc.status, exc.message)
        except Exception:
            log.exception("handler failed, request %s", request.request_id)
            response = _error_response(HTTPStatus.INTERNAL_SERVER_ERROR)
        h11_conn = self.h11
        body_done = (
            body.empty or h11_conn.their_state is h11.DONE or h11_conn.their_state is h11.MUST_CLOSE
        )
        keep_alive = keep_alive and not server.closing and (body_done or body._discardable())
        if not await self._respond(request, response, keep_alive):
            if not body_done or self.pending or (h11_conn and h11_conn.trailing_data[0]):
                await self._linger()  # the client may still be sending
            return False
        if not body_done and not await self._discard_body():
            await self._linger()
            return False
        if h11_conn is not None:  # it holds what came after the request
            self.pending, self.eof = h11_conn.trailing_data
            self.h11 = None
        return True

    async def _respond(self, request: Request, response: Response, keep_alive: bool) -> bool:
        """Write the response; True if the connection stays open after it."""
        request_id = request.request_id.encode("ascii")
        http10 = request.http_version < "1.1"
        try:
            head, keep_alive = _encode_head(response, request_id, keep_alive, http10)
        except (ValueError, TypeError) as exc:
            log.error("request %s: invalid response from handler: %s", request.request_id, exc)
            response = _error_response(HTTPStatus.INTERNAL_SERVER_ERROR)
            head, keep_alive = _encode_head(response, request_id, keep_alive, http10)
        body = response.body
        if not body or request.method == "HEAD" or response.status in STATUSES_WITHOUT_BODY:
            await self.stream.send_all(head)
        elif len(body) <= INLINE_BODY_BYTES:
            await self.stream.send_all(head + body)
        else:
            await self.stream.send_all(head)
            await self.stream.send_all(body)
        return keep_alive

    async def _send_error(self, status: int) -> None:
        """Answer a head the handler never saw (bad, too large, late); the caller closes."""
        response = _error_response(status)
        request_id = self.server.new_request_id().encode("ascii")
        head, _ = _encode_head(response, request_id, keep_alive=False, http10=False)
        await self.stream.send_all(head + response.body)

    async def _discard_body(self) -> bool:
        """Read and drop the unread rest of the body; False if too big, broken or late."""
        deadline = trio.current_time() + self.server.config.body_timeout_s
        dropped = 0
        try:
            while True:
                event = self.h11.next_event()
                if type(event) is h11.Data:
                    dropped += len(event.data)
                    if dropped > DISCARD_BODY_BYTES:
                        return False
                elif type(event) is h11.EndOfMessage:
                    return True
                elif await self.receive(deadline) is None:
                    return False
        except h11.RemoteProtocolError as exc:
            log.debug("bad request body from %s: %s", self.client_addr, exc)
            return False

    async def _linger(self) -> None:
        """Half-close, then drain what the client still sends, so our last response lands.
        (TLS has no half-close: there, only the drain.)"""
        try:
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            with trio.move_on_after(LINGER_TIMEOUT_S):
                drained = 0
                while drained <= LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                    if not data:
                        return
                    drained += len(data)
        except trio.BrokenResourceError:
            return


_RawHead = tuple[bytes, bytes, bytes, Iterable[tuple[bytes, bytes]], int]
"""A head's method, target, HTTP version, headers (names as sent) and size in bytes as
received, from either parser."""


def _new_h11(config: ServerConfig) -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_head_bytes)


def _origin_form(target: str) -> tuple[str, str | None]:
    """An absolute-form http(s) target as (path and query, authority); any other target
    as it is, with no authority (it matches no route).

    Raises h11.RemoteProtocolError (400) for an http(s) URI without a host or with userinfo.
    """
    absolute = ABSOLUTE_FORM.fullmatch(target)
    if absolute is None:
        return target, None
    authority, rest = absolute.groups()
    if not authority or authority.startswith(":"):
        raise h11.RemoteProtocolError("absolute-form target without a host")
    if "@" in authority:
        raise h11.RemoteProtocolError("absolute-form target with userinfo")
    return ("/" + rest if rest[:1] != "/" else rest), authority


def head_over_limit(data: bytes, limit: int) -> bool:
    """Whether the head at the start of `data` is known to be over `limit` bytes: more than
    that has arrived and no blank line ends a head within them."""
    return len(data) > limit and _HEAD_END_RE.search(data, 0, limit) is None


def _tokens(value: str) -> list[str]:
    return [token.strip() for token in value.split(",")]


def _encode_head(
    response: Response, request_id: bytes, keep_alive: bool, http10: bool
) -> tuple[bytes, bool]:
    """The status line and headers of `response`, and whether the connection stays open.

    Raises ValueError (or TypeError) for a status, reason or header that is not valid HTTP,
    so a handler can never split a response or inject a header.
    """
    status = response.status
    if not isinstance(status, int):
        raise TypeError(f"status {status!r} is not an int")
    if not 200 <= status <= 999:  # 1xx is never a final response (RFC 9110 §15.2)
        raise ValueError(f"status {status} is not a final status")
    reason = response.reason
    if not reason:
        reason = REASONS.get(status, b"")
    elif not REASON_PHRASE.fullmatch(reason):
        raise ValueError(f"invalid reason phrase {reason!r}")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in response.headers:
        if not FIELD_NAME.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            raise ValueError(f"invalid header {name!r}: {value!r}")
        lower = name.lower()
        if lower in SERVER_OWNED_HEADERS:
            if lower == b"connection" and b"close" in value.lower():
                keep_alive = False
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if status not in STATUSES_WITHOUT_BODY:
        lines.append(b"content-length: %d\r\n" % len(response.body))
    lines.append(b"server: %s\r\nx-request-id: %s\r\n" % (SERVER_NAME, request_id))
    if not keep_alive:
        lines.append(b"connection: close\r\n\r\n")
    elif http10:
        lines.append(b"connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines), keep_alive


def _error_response(status: int, message: str = "") -> Response:
    """A plain-text response that says what went wrong and nothing more."""
    text = message or REASONS.get(status, b"Error").decode("ascii")
    return Response(status=int(status), headers=[PLAIN_TEXT], body=f"{text}\n".encode())


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:  # already disconnected; its first read will say so
        return ""
    return peer[0] if isinstance(peer, tuple) else str(peer)


async def serve(
    handler: Handler,
    listeners: list[trio.SocketListener],
    config: ServerConfig,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP on `listeners` until `shutdown` is set, then drain and return.

    Use with `nursery.start`: it returns once accepting. On shutdown it stops accepting (the
    listeners are closed, so new connections are refused), closes idle connections, lets
    in-flight requests finish with `Connection: close` for up to `grace_period_s`, then
    cancels what is left.
    """
    server = _Server(handler, config)
    try:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(server.accept_loop, listener, connections)
                acceptors.start_soon(server.sweep_idle)
                task_status.started()
                await shutdown.wait()
                acceptors.cancel_scope.cancel()
            await _close_listeners(listeners)
            server.begin_shutdown()
            connections.start_soon(server.sweep_idle)  # for connections given a grace
            connections.cancel_scope.deadline = trio.current_time() + config.grace_period_s
    finally:
        await _close_listeners(listeners)


async def _close_listeners(listeners: list[trio.SocketListener]) -> None:
    for listener in listeners:
        await trio.aclose_forcefully(listener)


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listen on every address of `host`; with port 0, on the first only, so that there is
    one port the kernel picked (`bound_port`)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0:
        await _close_listeners(listeners[1:])
        del listeners[1:]
    return listeners


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The port the listeners accept on (the one picked, after binding port 0)."""
    return listeners[0].socket.getsockname()[1]
