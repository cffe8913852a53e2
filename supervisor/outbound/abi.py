"""WAGI's `wasi_experimental_http` host functions, over guest memory (WAGI-COMPAT.md §1).

Five imports, all i32 in and an i32 error code out: `req` makes the whole request and holds
the response (body read into host memory, up to the policy's bound) under a handle;
`header_get`, `headers_get_all` and `body_read` copy from it; `close` drops it. Handles belong
to one request (a `Session`), numbered from 0, the lowest free number first.

Where WAGI's host panicked (a header line without `:`, `body_read` on an unknown handle), these
return the ABI's error code (9, 1). Like every host function here they never raise: a bug is
logged and answered with 12 (runtime_error); they check the guest's deadline (past it the
guest is stopped: 504) and charge the host's work to the guest the way the sandbox's own
host functions do (sandbox.py): the CPU time each call took, as fuel and as the process's
share of host-call time, through the sandbox's `HostCharge`. `req` is charged its CPU time
only, not its wait for the network (a wait holds no GIL).
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import wasmtime

from .. import wasmtime_ext
from ..errors import GuestError, GuestTimeout
from .client import DeadlineReached, OutboundError, TenantClient
from .rules import AllowList

log = logging.getLogger("supervisor.outbound")

MODULE = "wasi_experimental_http"
IMPORTS = frozenset({"req", "close", "header_get", "headers_get_all", "body_read"})

# Error codes: the witx enum's order, which WAGI's host returns.
SUCCESS = 0
INVALID_HANDLE = 1
MEMORY_NOT_FOUND = 2
MEMORY_ACCESS_ERROR = 3
BUFFER_TOO_SMALL = 4
HEADER_NOT_FOUND = 5
UTF8_ERROR = 6
DESTINATION_NOT_ALLOWED = 7
INVALID_METHOD = 8
INVALID_ENCODING = 9
INVALID_URL = 10
REQUEST_ERROR = 11
RUNTIME_ERROR = 12
TOO_MANY_SESSIONS = 13

CALL_OVERHEAD_NS = 3_000
"""Host work of a call outside the timed function: wasmtime-py's trampoline and the
conversion of its arguments. Measured with tests/hostile/guests/outbound_headers.wat
(20,000 `header_get` calls): ~9 µs of the thread's CPU per call, ~6 µs of it inside."""

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one route's guests may do outbound, computed when the tenant loads."""

    client: TenantClient
    module_rules: AllowList
    max_open: int | None  # the module's http_max_concurrency: responses held at once
    max_requests: int  # the policy's outbound_requests: `req` calls per guest request
    max_response_bytes: int  # the policy's outbound_response_bytes


@dataclass(slots=True)
class _Held:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    cursor: int = 0


class Session:
    """One guest request's outbound state: its handle table, calls made, and why it stopped."""

    __slots__ = ("calls", "deadline", "fault", "grant", "handles")

    def __init__(self, grant: Grant | None, deadline: float) -> None:
        self.grant = grant
        self.deadline = deadline
        self.handles: dict[int, _Held] = {}
        self.calls = 0
        self.fault: GuestError | None = None


SessionOf = Callable[[], Session]
HostCharge = Callable[[int, int], bool]
"""`charge(caller, ns)`: charge `ns` of host work to the calling guest's fuel and to the
process's host-call share; False if that stopped the guest (out of fuel, or past its
deadline). The sandbox's (sandbox.py `_settle`), so these calls cost what its own do."""


def define(linker: wasmtime.Linker, session_of: SessionOf, charge: HostCharge) -> None:
    """Define the five imports on `linker`; `session_of()` is the calling request's session."""
    for name, params, function in (
        ("req", 10, _req),
        ("close", 1, _close),
        ("header_get", 6, _header_get),
        ("headers_get_all", 4, _headers_get_all),
        ("body_read", 4, _body_read),
    ):
        # `req` waits on the network, holding no GIL: only its CPU time is host work. The
        # others never wait, and the wall clock is ten times cheaper to read (~50 ns).
        clock = time.thread_time_ns if name == "req" else time.perf_counter_ns
        wasmtime_ext.define_host_function(
            linker, MODULE, name, params, _guarded(name, function, session_of, charge, clock)
        )


def _guarded(
    name: str,
    function: Callable,
    session_of: SessionOf,
    charge: HostCharge,
    clock: Callable[[], int],
) -> Callable:
    """`function` with the rules every host function keeps: deadline, cost, never raise."""

    def host_function(caller: int, args: Sequence[int]) -> int:
        started = clock()
        try:
            session = session_of()
            if time.monotonic() >= session.deadline:
                return _stop(caller, session, GuestTimeout("guest exceeded its deadline"))
            memory = wasmtime_ext.caller_memory(caller)
            if not len(memory):
                result = MEMORY_NOT_FOUND
            else:
                result = function(caller, session, memory, *args)
        except Exception:  # a bug here must not leak into another request's trap
            log.exception("wasi_experimental_http.%s failed", name)
            result = RUNTIME_ERROR
        try:
            if not charge(caller, CALL_OVERHEAD_NS + clock() - started):
                return RUNTIME_ERROR  # stopped: the guest never sees it
        except Exception:
            log.exception("charging wasi_experimental_http.%s failed", name)
            return RUNTIME_ERROR
        return result

    return host_function


def _stop(caller: int, session: Session, fault: GuestError) -> int:
    session.fault = fault
    wasmtime_ext.stop_guest(caller)
    return RUNTIME_ERROR


def _fits(memory, pointer: int, length: int) -> bool:
    return pointer + length <= len(memory)


def _req(
    caller: int,
    session: Session,
    memory,
    url_ptr: int,
    url_len: int,
    method_ptr: int,
    method_len: int,
    headers_ptr: int,
    headers_len: int,
    body_ptr: int,
    body_len: int,
    status_ptr: int,
    handle_ptr: int,
) -> int:
    if not all(
        _fits(memory, pointer, length)
        for pointer, length in (
            (url_ptr, url_len),
            (method_ptr, method_len),
            (headers_ptr, headers_len),
            (body_ptr, body_len),
            (status_ptr, 2),
            (handle_ptr, 4),
        )
    ):
        return MEMORY_ACCESS_ERROR
    session.calls += 1
    grant = session.grant
    if grant is None:
        return DESTINATION_NOT_ALLOWED
    stats = grant.client.stats
    if session.calls > grant.max_requests or (
        grant.max_open is not None and len(session.handles) >= grant.max_open
    ):
        stats.observe("over_limit", 0.0)
        return TOO_MANY_SESSIONS
    try:
        url_text = bytes(memory[url_ptr : url_ptr + url_len]).decode("utf-8")
        method_text = bytes(memory[method_ptr : method_ptr + method_len]).decode("utf-8")
        headers_text = bytes(memory[headers_ptr : headers_ptr + headers_len]).decode("utf-8")
    except UnicodeDecodeError:
        return UTF8_ERROR
    import httpx  # here, not at start-up: it costs a pod ~55 ms of imports

    try:
        url = httpx.URL(url_text)
    except (httpx.InvalidURL, TypeError, ValueError):
        return INVALID_URL
    if url.scheme not in ("http", "https") or not url.host:
        return INVALID_URL
    method = method_text.encode()
    if not _TOKEN.fullmatch(method):
        return INVALID_METHOD
    headers = parse_request_headers(headers_text)
    if headers is None:
        return INVALID_ENCODING
    body = bytes(memory[body_ptr : body_ptr + body_len])
    started = time.monotonic()
    try:
        fetched = grant.client.fetch(
            method,
            url,
            headers,
            body,
            module_rules=grant.module_rules,
            deadline=session.deadline,
            max_bytes=grant.max_response_bytes,
        )
    except OutboundError as error:
        stats.observe(error.outcome, time.monotonic() - started)
        if isinstance(error, DeadlineReached):
            return _stop(caller, session, GuestTimeout(f"guest exceeded its deadline: {error}"))
        return error.code
    stats.observe("ok", time.monotonic() - started)
    handle = 0
    while handle in session.handles:
        handle += 1
    session.handles[handle] = _Held(fetched.status, fetched.headers, fetched.body)
    # The guest is paused in this call: its memory has not moved while the request ran.
    _U16.pack_into(memory, status_ptr, fetched.status)
    _U32.pack_into(memory, handle_ptr, handle)
    return SUCCESS


def parse_request_headers(text: str) -> list[tuple[bytes, bytes]] | None:
    """`name:value` lines (LF or CRLF) as header pairs, values stripped; None if malformed.

    A repeated name keeps its last value, as WAGI's `HeaderMap::insert` did. Empty lines are
    skipped; a line without `:` is malformed (WAGI's host panicked on it).
    """
    pairs: dict[bytes, bytes] = {}
    for line in text.splitlines():
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            return None
        try:
            name_bytes = name.encode("ascii").lower()
            value_bytes = value.strip(" \t").encode("latin-1")
        except UnicodeEncodeError:
            return None
        if not _TOKEN.fullmatch(name_bytes) or _BAD_VALUE.search(value_bytes):
            return None
        pairs[name_bytes] = value_bytes
    return list(pairs.items())


def _close(caller: int, session: Session, memory, handle: int) -> int:
    session.handles.pop(handle, None)  # an unknown handle is not an error (WAGI)
    return SUCCESS


def _header_get(
    caller: int,
    session: Session,
    memory,
    handle: int,
    name_ptr: int,
    name_len: int,
    value_ptr: int,
    value_cap: int,
    written_ptr: int,
) -> int:
    held = session.handles.get(handle)
    if held is None:
        return INVALID_HANDLE
    if not (_fits(memory, name_ptr, name_len) and _fits(memory, value_ptr, value_cap)):
        return MEMORY_ACCESS_ERROR
    if not _fits(memory, written_ptr, 4):
        return MEMORY_ACCESS_ERROR
    try:
        name = bytes(memory[name_ptr : name_ptr + name_len]).decode("utf-8").lower().encode()
    except UnicodeDecodeError:
        return UTF8_ERROR
    value = next((v for n, v in held.headers if n == name), None)
    if value is None:
        return HEADER_NOT_FOUND
    if len(value) > value_cap:
        return BUFFER_TOO_SMALL
    memory[value_ptr : value_ptr + len(value)] = value
    _U32.pack_into(memory, written_ptr, len(value))
    return SUCCESS


def _headers_get_all(
    caller: int, session: Session, memory, handle: int, buf_ptr: int, buf_cap: int, written: int
) -> int:
    held = session.handles.get(handle)
    if held is None:
        return INVALID_HANDLE
    if not (_fits(memory, buf_ptr, buf_cap) and _fits(memory, written, 4)):
        return MEMORY_ACCESS_ERROR
    if any(_BAD_VALUE.search(name + value) for name, value in held.headers):
        return RUNTIME_ERROR
    text = b"".join(name + b":" + value + b"\n" for name, value in held.headers)
    if len(text) > buf_cap:
        return BUFFER_TOO_SMALL
    memory[buf_ptr : buf_ptr + len(text)] = text
    _U32.pack_into(memory, written, len(text))
    return SUCCESS


def _body_read(
    caller: int, session: Session, memory, handle: int, buf_ptr: int, buf_cap: int, read_ptr: int
) -> int:
    held = session.handles.get(handle)
    if held is None:
        return INVALID_HANDLE  # WAGI's host panicked here
    if not (_fits(memory, buf_ptr, buf_cap) and _fits(memory, read_ptr, 4)):
        return MEMORY_ACCESS_ERROR
    chunk = held.body[held.cursor : held.cursor + buf_cap]
    held.cursor += len(chunk)
    memory[buf_ptr : buf_ptr + len(chunk)] = chunk
    _U32.pack_into(memory, read_ptr, len(chunk))  # 0 bytes: the end of the body
    return SUCCESS
