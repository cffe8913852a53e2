"""Outbound HTTP requests for one tenant's guests: pools, limits, redirects and the guard.

Each tenant has one `TenantClient`: kept-alive connection pools (httpcore, httpx's own
transport layer, used directly: the guest's thread makes one blocking request at a time and
needs neither httpx's cookies nor its auth layers), a cap on its requests in flight, and its
policy's allow list. A request is checked against the module's and the policy's allow lists
before every hop, redirects included (at most `MAX_REDIRECTS`); the SSRF guard (rules.py)
judges each address the connection is about to be made to, after resolution, so a name that
resolves to a public address when checked and to a private one when used (DNS rebinding) is
refused: there is no other resolution.

Every timeout is the time left before the guest's deadline, read again at each name lookup,
connect, read and write (a timeout mapping computed when asked), so neither a dead resolver
nor a trickling upstream can keep a guest past its deadline. Name lookups run in a few
threads of their own (`Resolver`): `getaddrinfo` cannot be interrupted, so a guest waits for
it at most its time left, and a lookup that never returns holds one of `RESOLVER_THREADS`,
never the guest.

The process holds at most `MAX_CONNECTIONS` outbound connections, all tenants together.
When all are taken, the least recently used idle one (any tenant's) is closed to make room,
so tenants that stopped calling never lock out one that calls; idle connections also close
after `KEEPALIVE_S`, swept by a thread, since a pool left alone never looks at its own.

Proxies and CAs, as operators set them in the server's environment (read once, at start):
`HTTPS_PROXY`/`HTTP_PROXY` (and lower-case forms) with `NO_PROXY`, and `SSL_CERT_FILE`/
`SSL_CERT_DIR` (OpenSSL's default verify paths). The proxy is the operator's: connections to it
are exempt from the guard, and through it a target's name is resolved by the proxy, so the
guard cannot judge the address; a target given as an IP address is judged before it is sent
to the proxy, and the allow rules still apply to the target the guest asked for. An operator
who needs the guard behind a proxy filters private ranges on the proxy, or lists the internal
names in `NO_PROXY`, so that those requests go direct and are guarded here.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpcore

from .rules import AllowList, address_allowed

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("supervisor.outbound")

MAX_REDIRECTS = 10
"""Hops followed for one request (reqwest's and WAGI's default), each checked again."""
MAX_CONNECTIONS = 32
"""Outbound connections open at once in this process, all tenants, in use or kept alive: the
descriptors the server's connection limit sets aside for them (app.py). A guest makes one
call at a time, so those in use are at most the execution slots; the rest are kept alive for
the next calls, and the least recently used of them is closed when a new one needs its place.
Only when all are in use does a new connection fail (11)."""
KEEPALIVE_PER_POOL = 4
"""Idle connections a tenant's pool keeps for its next calls; more are closed when released."""
KEEPALIVE_S = 30.0
"""An idle pooled connection is closed after this: kept alive for a tenant's next calls, not
holding descriptors for a tenant that stopped calling."""
SWEEP_INTERVAL_S = 1.0
"""How often idle connections are checked for an expired keep-alive (or a closed peer)."""
RESOLVER_THREADS = 8
"""Name lookups in progress at once in this process. `getaddrinfo` cannot be interrupted, so
a lookup stuck on a dead resolver keeps its thread (not the guest) until the system's own
timeout; when all are stuck, a lookup fails at once (11) instead of starting more threads."""
RESOLVER_THREADS_PER_TENANT = 2
"""Of those, the most one tenant's lookups may hold: a guest that asks for names whose name
server never answers (any name under a wildcard it is allowed) stalls its own lookups, not
every tenant's."""
RESOLVE_TIMEOUT_S = 5.0
"""The longest wait for a name lookup, when the guest has that much time left: past it the
request fails (11) and the guest may try again or answer without it. glibc waits 5 s for a
name server (resolv.conf's `timeout`) before it tries the next."""
MIN_TIMEOUT_S = 0.001
"""A timeout of 0 means "no timeout" to sockets; past the deadline we wait this instead."""
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Seconds; outbound calls fit inside a request's deadline, at most minutes."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Hop-by-hop and framing headers are the host's to write: a guest's own Content-Length or
# Transfer-Encoding could disagree with the body it passed (request smuggling), and its Host
# could name another virtual host than the URL the allow rules checked.
_HOST_WRITTEN = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade"}
)
_CROSS_ORIGIN_DROPPED = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


class OutboundError(Exception):
    """A request that did not get a response; `code` is the ABI's error code."""

    code = 11
    outcome = "failed"


class Denied(OutboundError):
    code = 7
    outcome = "denied"


class OverLimit(OutboundError):
    code = 13
    outcome = "over_limit"


class TooLarge(OutboundError):
    outcome = "too_large"


class DeadlineReached(OutboundError):
    """The guest's deadline passed while waiting: the guest is stopped (504)."""

    outcome = "timeout"


class _AddressRefused(Exception):
    """Raised from inside the pool when the guard refuses every address of a host."""


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower case, in the upstream's order
    body: bytes


class _TimeLeft(dict):
    """httpcore's timeout mapping, answering each `get` with the time left to the deadline."""

    def __init__(self, deadline: float) -> None:
        super().__init__(connect=None, read=None, write=None, pool=None)
        self.deadline = deadline

    def get(self, key: str, default: object = None) -> float:
        return max(MIN_TIMEOUT_S, self.deadline - time.monotonic())


class _TrackedConnection(httpcore.ConnectionInterface):
    """A pooled connection that another thread may close while it is idle (`close_if_idle`),
    without racing the pool handing it to a request: a request that finds it closed is
    retried by the pool on another connection (httpcore's `ConnectionNotAvailable`)."""

    def __init__(self, connection: httpcore.ConnectionInterface) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._starting = False  # a request is being handed to it: not idle, whatever it says
        self._closed_idle = False
        self.last_used = time.monotonic()

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        with self._lock:
            if self._closed_idle:
                raise httpcore.ConnectionNotAvailable()
            self._starting = True
            self.last_used = time.monotonic()
        try:
            return self._connection.handle_request(request)
        finally:
            self._starting = False  # from here on the connection's own state says

    def close_if_idle(self, *, expired_only: bool = False) -> bool:
        """Close it if it is idle (and, with `expired_only`, past its keep-alive)."""
        with self._lock:
            if self._closed_idle or self._starting or not self._connection.is_idle():
                return False
            if expired_only and not self._connection.has_expired():
                return False
            self._closed_idle = True
        self._connection.close()
        return True

    def close(self) -> None:
        self._connection.close()

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return self._connection.can_handle_request(origin)

    def is_available(self) -> bool:
        return not self._closed_idle and self._connection.is_available()

    def has_expired(self) -> bool:
        return self._connection.has_expired()

    def is_idle(self) -> bool:
        return not self._closed_idle and self._connection.is_idle()

    def is_closed(self) -> bool:
        return self._closed_idle or self._connection.is_closed()

    def info(self) -> str:
        return self._connection.info()


class _Pool(httpcore.ConnectionPool):
    """A tenant's pool whose connections the process-wide count can close when idle."""

    def create_connection(self, origin: httpcore.Origin) -> httpcore.ConnectionInterface:
        connection = _TrackedConnection(super().create_connection(origin))
        OPEN_CONNECTIONS.track(connection)
        return connection


class _ConnectionCount:
    """Outbound connections open in this process, bounded by `MAX_CONNECTIONS`: when all
    places are taken, the least recently used idle connection of any pool is closed to give
    its place to a new one; idle connections past their keep-alive are closed by a sweeper
    thread (started with the first connection)."""

    def __init__(self) -> None:
        self.open = 0
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[_TrackedConnection] = weakref.WeakSet()
        self._sweeper: threading.Thread | None = None

    def track(self, connection: _TrackedConnection) -> None:
        with self._lock:
            self._connections.add(connection)
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep_forever, name="outbound-keepalive", daemon=True
                )
                self._sweeper.start()

    def take(self) -> bool:
        """Take a place, closing idle connections for it if need be; False if none is free."""
        while True:
            with self._lock:
                if self.open < MAX_CONNECTIONS:
                    self.open += 1
                    return True
                idle = sorted(
                    (c for c in self._connections if c.is_idle()), key=lambda c: c.last_used
                )
            # Another thread may take the place given back first: then close the next one.
            if not any(connection.close_if_idle() for connection in idle):
                return False

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1

    def sweep(self) -> None:
        """Close the idle connections whose keep-alive has expired."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close_if_idle(expired_only=True)

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:  # a sweep that fails must not end the sweeper
                log.exception("closing expired outbound connections failed")


OPEN_CONNECTIONS = _ConnectionCount()


class _CountedStream(httpcore.NetworkStream):
    """A connection that gives its place back when closed, or when dropped unclosed (a pool
    of a client replaced at reload is never closed: its guests may still be using it)."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._release = weakref.finalize(self, OPEN_CONNECTIONS.give_back)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()
        self._release()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        try:
            secure = self._stream.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self.close()
            raise
        self._release.detach()  # the TLS stream holds the place now
        return _CountedStream(secure)

    def get_extra_info(self, info: str) -> object:
        return self._stream.get_extra_info(info)


class _Lookup:
    """One name lookup's result, handed from its thread to the guest's."""

    __slots__ = ("addresses", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.addresses: list[str] = []
        self.error: Exception | None = None


class Resolver:
    """Name lookups bounded by a timeout, in at most `RESOLVER_THREADS` threads at once.

    Each lookup runs `socket.getaddrinfo` in a daemon thread of its own (a stuck one never
    holds up the process's exit) and is waited for at most the time given; the thread ends
    when the lookup does. An IP address needs no lookup and gets no thread.
    """

    def __init__(self) -> None:
        self._busy = 0
        self._busy_by: dict[object, int] = {}  # by owner (a tenant's backend)
        self._lock = threading.Lock()

    def addresses(self, owner: object, host: str, port: int, timeout: float | None) -> list[str]:
        """The addresses `host` resolves to, in the resolver's order, for `owner` (one
        tenant's); raises httpcore's ConnectError (no answer, or every lookup thread of the
        process or of `owner` busy) or ConnectTimeout."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        with self._lock:
            if self._busy_by.get(owner, 0) >= RESOLVER_THREADS_PER_TENANT:
                raise httpcore.ConnectError(
                    f"cannot resolve {host}: this tenant's {RESOLVER_THREADS_PER_TENANT} name"
                    " lookups at once are waiting for the resolver"
                )
            if self._busy >= RESOLVER_THREADS:
                raise httpcore.ConnectError(
                    f"cannot resolve {host}: all {RESOLVER_THREADS} name lookup threads are"
                    " waiting for the resolver"
                )
            self._busy += 1
            self._busy_by[owner] = self._busy_by.get(owner, 0) + 1
        lookup = _Lookup()
        try:
            threading.Thread(
                target=self._run,
                args=(owner, host, port, lookup),
                name="outbound-resolver",
                daemon=True,
            ).start()
        except BaseException:
            self._done(owner)
            raise
        wait = RESOLVE_TIMEOUT_S if timeout is None else min(timeout, RESOLVE_TIMEOUT_S)
        if not lookup.done.wait(wait):
            raise httpcore.ConnectTimeout(f"resolving {host} took more than {wait:.3f} s")
        if lookup.error is not None:
            raise httpcore.ConnectError(f"cannot resolve {host}: {lookup.error}")
        return lookup.addresses

    def _run(self, owner: object, host: str, port: int, lookup: _Lookup) -> None:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            lookup.addresses = [str(info[4][0]) for info in found]
        except Exception as exc:  # OSError, UnicodeError: the guest gets 11, never a raise
            lookup.error = exc
        finally:
            self._done(owner)
            lookup.done.set()

    def _done(self, owner: object) -> None:
        with self._lock:
            self._busy -= 1
            left = self._busy_by.pop(owner) - 1
            if left:
                self._busy_by[owner] = left


RESOLVER = Resolver()


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves a host itself (bounded by the deadline) and connects only to an address the
    SSRF guard admits; the proxy's own addresses are exempt."""

    def __init__(self, named_exactly: frozenset[str], proxies: frozenset[tuple[str, int]]):
        self._named_exactly = named_exactly
        self._proxies = proxies

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if not OPEN_CONNECTIONS.take():
            raise httpcore.ConnectError(f"{MAX_CONNECTIONS} outbound connections already open")
        try:
            stream = self._connect(host, port, timeout, local_address, socket_options)
        except BaseException:
            OPEN_CONNECTIONS.give_back()
            raise
        return _CountedStream(stream)  # the place is the stream's until it closes

    def _connect(self, host, port, timeout, local_address, socket_options):
        started = time.monotonic()
        addresses = RESOLVER.addresses(self, host, port, timeout)
        if (host, port) not in self._proxies:
            addresses = [a for a in addresses if address_allowed(host, a, self._named_exactly)]
            if not addresses:
                raise _AddressRefused(f"{host} resolves only to addresses the SSRF guard refuses")
        ends = None if timeout is None else started + timeout
        failure: Exception | None = None
        for address in dict.fromkeys(addresses):
            # The lookup and the addresses tried before took part of the time given.
            left = None if ends is None else max(MIN_TIMEOUT_S, ends - time.monotonic())
            try:
                return super().connect_tcp(address, port, left, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} resolves to no address")


@dataclass(slots=True)
class OutboundStats:
    """One tenant's outbound calls: counts by outcome and a duration histogram. Thread-safe."""

    outcomes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.duration_sum += seconds

    def snapshot(self) -> tuple[dict[str, int], list[int], float]:
        with self.lock:
            return dict(self.outcomes), list(self.buckets), self.duration_sum


class TenantClient:
    """One tenant's outbound requests. Thread-safe: every guest thread of the tenant uses it."""

    def __init__(
        self, policy_rules: AllowList, max_in_flight: int, stats: OutboundStats | None = None
    ) -> None:
        self.policy_rules = policy_rules
        self.max_in_flight = max_in_flight
        self.stats = stats or OutboundStats()
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._proxy_settings = urllib.request.getproxies_environment()  # NO_PROXY too
        self._proxies = {
            scheme: url
            for scheme, url in self._proxy_settings.items()
            if scheme in ("http", "https")
        }
        import httpx  # here, at a tenant's first outbound call, not at start-up

        proxy_origins = frozenset(
            (url.host, url.port or (443 if url.scheme == "https" else 80))
            for url in map(httpx.URL, self._proxies.values())
        )
        self._backend = _GuardedBackend(policy_rules.exact_hosts, proxy_origins)
        self._ssl = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
        self._pools: dict[str | None, httpcore.ConnectionPool] = {}
        self._pools_lock = threading.Lock()

    def close(self) -> None:
        with self._pools_lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def fetch(
        self,
        method: bytes,
        url: httpx.URL,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        *,
        module_rules: AllowList,
        deadline: float,
        max_bytes: int,
    ) -> Fetched:
        """Make the request, following redirects; raises an OutboundError (never another)."""
        if not self._in_flight.acquire(blocking=False):
            raise OverLimit(f"{self.max_in_flight} outbound requests of this tenant in flight")
        try:
            return self._follow(method, url, list(headers), body, module_rules, deadline, max_bytes)
        finally:
            self._in_flight.release()

    def _follow(self, method, url, headers, body, module_rules, deadline, max_bytes) -> Fetched:
        import httpx

        for hop in range(MAX_REDIRECTS + 1):
            self.check(url, module_rules)
            fetched = self._once(method, url, headers, body, deadline, max_bytes)
            location = _first(fetched.headers, b"location")
            if fetched.status not in _REDIRECT_STATUSES or location is None:
                return fetched
            if hop == MAX_REDIRECTS:
                raise OutboundError(f"more than {MAX_REDIRECTS} redirects")
            try:
                target = url.join(location.decode("latin-1"))
            except httpx.InvalidURL as exc:
                raise OutboundError(f"bad redirect location: {exc}") from None
            if target.scheme not in ("http", "https"):
                raise Denied(f"redirect to a {target.scheme!r} URL")
            if (fetched.status == 303 and method != b"HEAD") or (
                fetched.status in (301, 302) and method == b"POST"
            ):
                method, body = b"GET", b""
                headers = [(n, v) for n, v in headers if n != b"content-type"]
            if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
                headers = [(n, v) for n, v in headers if n not in _CROSS_ORIGIN_DROPPED]
            url = target
        raise AssertionError("unreachable")  # pragma: no cover

    def check(self, url: httpx.URL, module_rules: AllowList) -> None:
        """Raise Denied unless both the module's and the policy's rules allow `url`."""
        port = url.port or (443 if url.scheme == "https" else 80)
        host = url.host.lower()
        if not module_rules.allows(url.scheme, host, port):
            raise Denied(f"{url.scheme}://{host}:{port} is not in the module's allowed_hosts")
        if not self.policy_rules.allows(url.scheme, host, port):
            raise Denied(f"{url.scheme}://{host}:{port} is not in the policy's outbound_hosts")

    def _once(self, method, url, headers, body, deadline, max_bytes) -> Fetched:
        host_header = url.netloc
        request_headers = [(b"host", host_header)]
        request_headers += [(n, v) for n, v in headers if n not in _HOST_WRITTEN]
        if body or method in (b"POST", b"PUT", b"PATCH"):
            request_headers.append((b"content-length", str(len(body)).encode()))
        target = httpcore.URL(
            scheme=url.raw_scheme,
            host=url.raw_host,
            port=url.port,
            target=url.raw_path,
        )
        proxy = self._proxy_for(url)
        if proxy is not None and not self._literal_allowed(url.host):
            raise Denied(f"{url.host} is an address the SSRF guard refuses")
        pool = self._pool(proxy)
        try:
            with pool.stream(
                method,
                target,
                headers=request_headers,
                content=body,
                extensions={"timeout": _TimeLeft(deadline)},
            ) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"response larger than {max_bytes} bytes")
                    chunks.append(chunk)
                return Fetched(
                    response.status,
                    [(name.lower(), value) for name, value in response.headers],
                    b"".join(chunks),
                )
        except OutboundError:
            raise
        except _AddressRefused as exc:
            raise Denied(str(exc)) from None
        except httpcore.TimeoutException as exc:
            if time.monotonic() >= deadline - MIN_TIMEOUT_S:
                raise DeadlineReached("the guest's deadline passed during the request") from None
            raise OutboundError(f"timed out: {exc}") from None
        except Exception as exc:  # connection, TLS, protocol: the upstream failed, not us
            if time.monotonic() >= deadline:
                raise DeadlineReached("the guest's deadline passed during the request") from None
            raise OutboundError(f"{type(exc).__name__}: {exc}") from None

    def _proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy `url` goes through: its scheme's, unless NO_PROXY names its host."""
        proxy = self._proxies.get(url.scheme)
        if proxy is not None and urllib.request.proxy_bypass_environment(
            url.host, self._proxy_settings
        ):
            return None
        return proxy

    def _literal_allowed(self, host: str) -> bool:
        """Through a proxy the guard sees no address, except a target given as one."""
        try:
            ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return True  # a name: the proxy resolves it
        return address_allowed(host, host, self.policy_rules.exact_hosts)

    def _pool(self, proxy: str | None) -> httpcore.ConnectionPool:
        pool = self._pools.get(proxy)
        if pool is None:
            with self._pools_lock:
                pool = self._pools.get(proxy)
                if pool is None:
                    pool = self._pools[proxy] = _Pool(
                        ssl_context=self._ssl,
                        proxy=httpcore.Proxy(proxy, ssl_context=self._ssl) if proxy else None,
                        max_connections=self.max_in_flight,
                        max_keepalive_connections=KEEPALIVE_PER_POOL,
                        keepalive_expiry=KEEPALIVE_S,
                        network_backend=self._backend,
                    )
        return pool


def _first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key == name), None)


class TenantClients:
    """The tenants' clients, kept across reloads while a tenant's outbound policy is unchanged
    (so are their kept-alive connections), and their stats, kept for as long as the process."""

    def __init__(self) -> None:
        self._clients: dict[str, TenantClient] = {}
        self._stats: dict[str, OutboundStats] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str, policy_rules: AllowList, max_in_flight: int) -> TenantClient:
        with self._lock:
            client = self._clients.get(tenant)
            if (
                client is not None
                and client.policy_rules == policy_rules
                and client.max_in_flight == max_in_flight
            ):
                return client
            # The old client is not closed: the old state's guests may be using it; its pools
            # close their connections when the last guest holding it lets go.
            stats = self._stats.setdefault(tenant, OutboundStats())
            client = self._clients[tenant] = TenantClient(policy_rules, max_in_flight, stats)
            return client

    def close(self) -> None:
        """Close every tenant's pooled connections (at shutdown)."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    def stats(self) -> dict[str, tuple[dict[str, int], list[int], float]]:
        """By tenant name: (counts by outcome, duration buckets, duration sum)."""
        with self._lock:
            items = list(self._stats.items())
        return {tenant: stats.snapshot() for tenant, stats in items}
