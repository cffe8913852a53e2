"""The WAGI contract as pure functions: request → guest env/argv, guest stdout → response.

No I/O here, so every rule of WAGI.md ("Request → guest", "Guest → response") is tested
without a server or a guest. This runs on every request: one dict for the env, one regex
search per response, and byte-level checks (`bytes.translate`) instead of a regex per header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from supervisor.errors import GuestBadOutput

__all__ = [
    "MISSING_HEADERS_MESSAGE",
    "CgiRequest",
    "CgiResponse",
    "build_argv",
    "build_env",
    "parse_output",
]

_SERVER_SOFTWARE = "WAGI/1"
_GATEWAY_INTERFACE = "CGI/1.1"

# WAGI's own body for output without the headers CGI requires; guests and their tests know it.
MISSING_HEADERS_MESSAGE = "Exactly one of 'location' or 'content-type' must be specified"

# Never held by the guest: credentials stay with the gateway (as in WAGI and RFC 3875 §4.1.18),
# and `Connection` describes our hop, not the guest's request.
_HIDDEN_REQUEST_HEADERS = frozenset({"authorization", "connection"})

# The server owns the framing of the response it sends (h11 computes it); a guest's own
# framing headers would contradict it and could split the response. `status` is consumed.
_DROPPED_RESPONSE_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})

# Guest output quoted in an error message is cut here: enough to find the header, too little
# to leak a response through an error page or flood a log line.
_ECHO_LIMIT = 64

# The first empty line, CRs ignored. Two patterns, because one with `^|\n` loses the regex
# engine's fast scan for a literal first byte (measured on 10 MB with no newline: 110 ms vs 3).
_BLANK_FIRST_LINE = re.compile(rb"\r*\n")  # used with .match: an empty header block
_BLANK_LINE = re.compile(rb"\n\r*\n")

# RFC 9110 §5.6.2: token = 1*tchar.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5: a field value holds no CTL but HTAB (so no CR, LF or NUL); obs-text is allowed.
_VALUE_CTL = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


@dataclass(slots=True)
class CgiRequest:
    """What the guest is told about one HTTP request.

    Not frozen, nor is `CgiResponse`: a frozen dataclass sets each field through
    `object.__setattr__`, which made building these two 1.3 µs of a hello request's CPU.
    """

    method: str  # as sent, e.g. "GET"
    path: str  # raw request path as sent (still percent-encoded), no query
    query: str  # raw query without '?', "" if none
    has_query: bool  # True when the target contained '?' (argv rule)
    http_version: str  # "1.0" or "1.1"
    headers: Sequence[tuple[str, str]]  # (name lower-cased, value), in order, repeats kept
    host: str  # Host header value, "" if absent
    server_port: int  # the listening port (default for SERVER_PORT / X_FULL_URL)
    client_addr: str  # client IP
    body_length: int  # bytes of body as read
    scheme: str = "http"


@dataclass(slots=True)
class CgiResponse:
    """The HTTP response a guest asked for, already checked to be valid HTTP."""

    status: int
    reason: bytes  # reason phrase from `Status: 404 Not Found`, else b""
    headers: list[tuple[bytes, bytes]]  # names lower-cased, repeats kept, in order
    body: bytes


def build_env(
    request: CgiRequest,
    *,
    script_name: str,
    path_info_raw: str,
    matched_route: str,
    base_path: str,
    tenant_env: Mapping[str, str],
) -> dict[str, str]:
    """The guest's environment for one request.

    `script_name` is the route base already joined after the tenant's base path;
    `path_info_raw` is the path after it, still percent-encoded. The tenant's `env` goes in
    first so that everything the gateway derives from the request overrides it.
    """
    env = dict(tenant_env)
    content_type = ""
    for name, value in request.headers:
        if name in _HIDDEN_REQUEST_HEADERS:
            continue
        env["HTTP_" + name.upper().replace("-", "_")] = value
        if name == "content-type":
            content_type = value  # repeated header: the last one, like every HTTP_ variable
    server_name, server_port = _split_host(request.host, request.server_port)
    path_info = unquote(path_info_raw)  # UTF-8, invalid sequences replaced
    full_url = f"{request.scheme}://{server_name}:{server_port}{request.path}"
    if request.has_query:
        full_url += "?" + request.query
    env["REQUEST_METHOD"] = request.method
    env["SCRIPT_NAME"] = script_name
    env["PATH_INFO"] = path_info
    env["X_RAW_PATH_INFO"] = path_info_raw
    env["PATH_TRANSLATED"] = path_info
    env["QUERY_STRING"] = request.query
    env["X_MATCHED_ROUTE"] = matched_route
    env["X_FULL_URL"] = full_url
    env["X_BASE_PATH"] = base_path
    env["SERVER_NAME"] = server_name
    env["SERVER_PORT"] = server_port
    env["SERVER_PROTOCOL"] = "HTTP/" + request.http_version
    env["SERVER_SOFTWARE"] = _SERVER_SOFTWARE
    env["GATEWAY_INTERFACE"] = _GATEWAY_INTERFACE
    env["REMOTE_ADDR"] = request.client_addr
    env["REMOTE_HOST"] = request.client_addr
    env["AUTH_TYPE"] = ""
    env["REMOTE_USER"] = ""
    env["CONTENT_LENGTH"] = str(request.body_length)
    env["CONTENT_TYPE"] = content_type
    return env


def _split_host(host: str, default_port: int) -> tuple[str, str]:
    """`Host` → (SERVER_NAME, SERVER_PORT); an IPv6 literal keeps its brackets (RFC 3875 §4.1.14).

    A missing, empty or non-numeric port falls back to the listening port.
    """
    if host.startswith("["):
        end = host.find("]")
        if end >= 0:
            name, rest = host[: end + 1], host[end + 1 :]
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, port = host, ""
    else:
        name, _, port = host.partition(":")
    if not (port.isascii() and port.isdigit()):
        port = str(default_port)
    return name, port


def build_argv(request: CgiRequest, template: str | None) -> list[str]:
    """The guest's argv: the path, then the query's `&`-separated parts, none decoded.

    With a template, `${SCRIPT_NAME}` is the path and `${ARGS}` the query with `&` as spaces,
    and the result is split on whitespace. Both are substituted in one pass, so a path that
    happens to contain `${ARGS}` is not expanded again.
    """
    if template is None:
        if request.has_query:
            return [request.path, *request.query.split("&")]
        return [request.path]
    args = request.query.replace("&", " ")
    pieces = (piece.replace("${ARGS}", args) for piece in template.split("${SCRIPT_NAME}"))
    return request.path.join(pieces).split()


def parse_output(stdout: bytes, *, max_headers: int, max_header_bytes: int) -> CgiResponse:
    """Turn a guest's stdout (CGI headers, blank line, body) into a response.

    The header block, its blank line included, may hold at most `max_header_bytes` bytes and
    `max_headers` lines (any line, `Status` and lines without ':' too: each is parsed); past
    either, `GuestBadOutput` 502 names the limit. The work done here is bounded by those two,
    not by the size of the output: the blank line is looked for only within the bound.
    Raises `GuestBadOutput` with status 500 when the output lacks the required headers or the
    blank line (WAGI's message), and 502 when a header or the `Status` is not valid HTTP. The
    500 is checked first: output that never tried to be CGI gets the message that says so.
    `Content-Length`, `Transfer-Encoding` and `Connection` are dropped: the server frames the
    response itself. An explicit `Status` wins over `Location`'s 302; the last `Status` counts.
    """
    end = _BLANK_FIRST_LINE.match(stdout, 0, max_header_bytes) or _BLANK_LINE.search(
        stdout, 0, max_header_bytes
    )
    if end is None:
        if len(stdout) > max_header_bytes:
            raise GuestBadOutput(
                f"guest output's header block is over {max_header_bytes} bytes"
                " (max_response_header_bytes): no blank line ends it within them",
                status=502,
            )
        raise GuestBadOutput(MISSING_HEADERS_MESSAGE, status=500)
    head = stdout[: end.start()]
    if b"\r" in head:
        head = head.replace(b"\r", b"")
    # Split at most `max_headers` times: one piece more than that means one line too many.
    lines = head.split(b"\n", max_headers) if head else ()
    if len(lines) > max_headers:
        raise GuestBadOutput(
            f"guest output's header block is over {max_headers} lines (max_response_headers)",
            status=502,
        )
    status_value: bytes | None = None
    has_location = has_content_type = False
    invalid: str | None = None  # the first bad header, reported once the required ones are found
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        raw_name, colon, raw_value = line.partition(b":")
        if not colon:
            continue  # WAGI ignores a line with no ':'
        name = raw_name.strip(b" \t")
        value = raw_value.strip(b" \t")
        if invalid is None:
            invalid = _check_header(name, value)  # quotes the name as the guest wrote it
        name = name.lower()
        if name == b"status":
            status_value = value
        elif name not in _DROPPED_RESPONSE_HEADERS:
            headers.append((name, value))
            if name == b"location":
                has_location = True
            elif name == b"content-type":
                has_content_type = True
    if status_value is None and not has_location and not has_content_type:
        raise GuestBadOutput(MISSING_HEADERS_MESSAGE, status=500)
    if invalid is not None:
        raise GuestBadOutput(invalid, status=502)
    if status_value is not None:
        status, reason = _parse_status(status_value)
    else:
        status, reason = (302 if has_location else 200), b""
    return CgiResponse(status, reason, headers, stdout[end.end() :])


def _check_header(name: bytes, value: bytes) -> str | None:
    """Why a header is not valid HTTP (RFC 9110 §5.1, §5.5), or None when it is."""
    if not name or name.translate(None, _TCHAR):
        return f"guest output has an invalid header name {_quote(name)}"
    if len(value.translate(None, _VALUE_CTL)) != len(value):
        return f"guest output has a control character in header {_quote(name)}"
    return None


def _parse_status(value: bytes) -> tuple[int, bytes]:
    """`NNN [reason]` → (NNN, reason); NNN must be three digits, 100 to 999 (RFC 9110 §15)."""
    parts = value.split(None, 1)  # the value has no whitespace but SP and HTAB left
    code = parts[0] if parts else b""
    if len(code) != 3 or not code.isdigit() or code.startswith(b"0"):
        raise GuestBadOutput(f"guest output has an invalid Status {_quote(value)}", status=502)
    return int(code), parts[1] if len(parts) == 2 else b""


def _quote(raw: bytes) -> str:
    """Guest bytes fit for an error message: cut to `_ECHO_LIMIT`, control characters escaped."""
    cut = ascii(raw[:_ECHO_LIMIT].decode("latin-1"))
    return cut + "..." if len(raw) > _ECHO_LIMIT else cut
