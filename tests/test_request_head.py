"""The fast head parser: every head it accepts, h11 parses the same way; common heads it accepts.

h11 is the reference: for each head of a corpus (real clients' heads, edge cases, and every
single-byte mutation of them), either the fast parser declines or h11 yields a `Request` with
the same method, target, version and headers, no body, and the same bytes left over.
"""

from __future__ import annotations

import h11
import pytest

from supervisor.request_head import parse_simple_head

COMMON_HEADS = {
    "wrk": b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    "curl": (
        b"GET /demo/site/about.txt?x=1&y=%20 HTTP/1.1\r\nHost: localhost:8080\r\n"
        b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    ),
    "httpx": (
        b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\n"
        b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
        b"User-Agent: python-httpx/0.27.0\r\n\r\n"
    ),
    "browser": (
        b"GET /acme/page HTTP/1.1\r\nHost: acme.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\nCookie: a=b; c=d\r\nSec-Fetch-Mode: navigate\r\n"
        b"Upgrade-Insecure-Requests: 1\r\n\r\n"
    ),
    "http/1.0 without host": b"GET / HTTP/1.0\r\n\r\n",
    "options asterisk": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute form": b"GET http://x.test/a?b HTTP/1.1\r\nHost: x.test\r\n\r\n",
    "empty value and OWS": b"GET / HTTP/1.1\r\nHost:x\r\nX-Empty:\r\nX-Pad: \t a  b \t\r\n\r\n",
    "obs-text value": b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xc3\xa9 \xff\r\n\r\n",
    "repeated header": b"DELETE /r HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
    "pipelined": b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n",
}

# Heads the fast parser must leave to h11: h11 refuses them, frames a body, or reads them in
# a way (bare LF, obs-fold, control characters) the fast parser does not reproduce.
EDGE_HEADS = [
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n  b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Del: a\x7fb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\n: x\r\nHost: x\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r",
    b"",
]

# Bytes that matter to the grammar, for the single-byte mutations.
MUTATIONS = [b"\x00", b"\x01", b"\t", b" ", b"\r", b"\n", b":", b"\x7f", b"\x80", b"a", b"/", b""]


def h11_reading(data: bytes) -> tuple[bytes, bytes, bytes, list, bytes] | None:
    """h11's request for `data` if it is a complete head without a body, else None."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        if type(event) is not h11.Request:
            return None
        rest = conn.trailing_data[0]
        if type(conn.next_event()) is not h11.EndOfMessage:
            return None
    except h11.RemoteProtocolError:
        return None
    return event.method, event.target, event.http_version, list(event.headers.raw_items()), rest


def assert_agrees_with_h11(data: bytes) -> None:
    head = parse_simple_head(data)
    if head is None:
        return
    reference = h11_reading(data)
    assert reference is not None, f"h11 refuses or frames a body for {data!r}"
    fast = (head.method, head.target, head.http_version, head.headers, data[head.size :])
    assert fast == reference, data


def mutants(data: bytes):
    for index in range(len(data)):
        for byte in MUTATIONS:
            yield data[:index] + byte + data[index + 1 :]
        yield data[:index] + data[index : index + 1] * 2 + data[index + 1 :]


@pytest.mark.parametrize("name", COMMON_HEADS)
def test_common_heads_are_parsed_as_h11_parses_them(name: str):
    data = COMMON_HEADS[name]
    assert parse_simple_head(data) is not None, "the fast path declined a common head"
    assert_agrees_with_h11(data)


@pytest.mark.parametrize("data", EDGE_HEADS)
def test_edge_heads_are_left_to_h11(data: bytes):
    assert parse_simple_head(data) is None


@pytest.mark.parametrize("name", ["wrk", "curl", "empty value and OWS", "obs-text value"])
def test_every_single_byte_mutation_agrees_with_h11(name: str):
    for data in mutants(COMMON_HEADS[name]):
        assert_agrees_with_h11(data)


def test_every_edge_head_mutation_agrees_with_h11():
    for edge in EDGE_HEADS:
        for data in mutants(edge):
            assert_agrees_with_h11(data)


def test_pipelined_heads_are_parsed_one_at_a_time():
    data = COMMON_HEADS["pipelined"]
    first = parse_simple_head(data)
    assert first is not None and first.target == b"/1"
    second = parse_simple_head(data[first.size :])
    assert second is not None and second.target == b"/2"
    assert first.size + second.size == len(data)


def test_an_incomplete_head_is_left_to_h11_until_it_is_whole():
    data = COMMON_HEADS["curl"]
    for end in range(len(data)):
        assert parse_simple_head(data[:end]) is None
    assert parse_simple_head(data) is not None
