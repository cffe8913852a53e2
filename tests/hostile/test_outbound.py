"""Outbound HTTP for guests: WAGI's wasi_experimental_http ABI without its holes (issue 12, §4).

Each test runs a real server on 127.0.0.1 and WAT guests (tests/hostile/guests/outbound_*.wat)
that call the five imports; the upstream is a real HTTP server of the test's own on
127.0.0.1 (plain, and TLS with a CA made by `openssl` for the test). The upstream is on
loopback, so a policy that lets a guest reach it names 127.0.0.1 (or localhost) exactly,
which is the SSRF guard's exception; wildcards and names resolving to loopback are refused.
"""

from __future__ import annotations

import contextlib
import gc
import http.server
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from connect_proxy import connect_proxy

from supervisor import sandbox
from supervisor.auth import token_sha256
from supervisor.outbound import client

GUESTS = Path(__file__).parent / "guests"
SLOW_UPSTREAM_S = 5.0
"""How long /slow waits before answering: well past the guests' 1 s deadline."""


class _Upstream(http.server.BaseHTTPRequestHandler):
    """/hello, /echo, /big?N, /slow, /redirect?URL, /loop: what the tests call."""

    protocol_version = "HTTP/1.1"
    release: threading.Event
    connections: list[int]
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.requests.append(self.path)
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if path == "/hello":
            self._answer(200, b"hello from upstream", {"x-test": "yes", "x-other": "1"})
        elif path == "/echo":
            lines = [f"{self.command} {self.path}"]
            lines += [f"{name.lower()}={value!r}" for name, value in self.headers.items()]
            self._answer(200, "\n".join(lines).encode() + b"\n" + body)
        elif path == "/big":
            self._answer(200, b"b" * int(query))
        elif path == "/slow":
            self.release.wait(SLOW_UPSTREAM_S)
            self._answer(200, b"late")
        elif path == "/redirect":
            self._answer(302, b"", {"location": query})
        elif path == "/fat":
            self._answer(200, b"fat", {"x-fat": "f" * 5000})
        elif path.startswith("http://"):  # absolute form: we are the proxy
            self._answer(200, f"proxied {self.path}".encode())
        elif path == "/loop":
            self._answer(302, b"", {"location": "/loop"})
        else:
            self._answer(404, b"no such path")


@dataclass
class Upstream:
    port: int
    connections: list[int]
    requests: list[str]
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _serve(context: ssl.SSLContext | None = None) -> Iterator[Upstream]:
    release = threading.Event()
    connections: list[int] = []
    requests: list[str] = []
    handler = type(
        "Handler",
        (_Upstream,),
        {"release": release, "connections": connections, "requests": requests},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a guest stopped mid-call hangs up
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(
            server.server_address[1], connections, requests, "https" if context else "http"
        )
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    yield from _serve()


@pytest.fixture
def tls_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    """A TLS upstream whose certificate a test CA signed; SSL_CERT_FILE names that CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (tmp_path / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:api.example.test\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    yield from _serve(context)


def add_tenant(
    workspace,
    allowed_hosts: list[str] | None,
    outbound_hosts: list[str],
    policy: str = "",
    guest: str = "outbound_call.wat",
    extra: str = "",
    tenant: str = "t",
) -> None:
    """Tenant `tenant`, route `/call` running `guest` with the module's `allowed_hosts`."""
    lines = [f"outbound_hosts = {outbound_hosts!r}".replace("'", '"'), "timeout_ms = 1000", policy]
    workspace.add_tenant(tenant, {}, "\n".join(lines) + "\n")
    folder = workspace.tenants / tenant
    shutil.copyfile(GUESTS / guest, folder / guest)
    entry = f'[[module]]\nroute = "/call"\nmodule = "{guest}"\n{extra}'
    if allowed_hosts is not None:
        entry += f"allowed_hosts = {allowed_hosts!r}\n".replace("'", '"')
    (folder / "modules.toml").write_text(entry)


async def call(
    running, url: str, method: str = "GET", headers: str = "", body: bytes = b"", tenant: str = "t"
):
    """Ask the guest to make one request; its response (status, text)."""
    stdin = b"\0".join([url.encode(), method.encode(), headers.encode(), body])
    response = await running.client.post(f"/{tenant}/call", content=stdin)
    return response.status_code, response.text


def req_code(text: str) -> int:
    return int(text.split("req=", 1)[1].split()[0])


# The ABI: a request and everything the guest reads back.


async def test_a_guest_calls_an_allowed_upstream_and_reads_status_headers_and_body(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    status, text = await call(running, upstream.url("/hello"))
    assert status == 200, text
    assert "req=0 status=200" in text
    assert "\nx-test:yes\n" in text and "\nx-other:1\n" in text  # name:value\n, no space
    assert "\nget=0yes\n" in text
    assert "body=hello from upstream\nend" in text


async def test_the_guest_sends_its_method_headers_and_body_stripped_of_surrounding_spaces(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    headers = "x-a:   spaced value \t\nx-b:1\r\nx-b:2\nhost:evil.example\ncontent-length:999\n"
    status, text = await call(running, upstream.url("/echo?q=1"), "POST", headers, b"payload")
    assert status == 200, text
    assert "POST /echo?q=1" in text
    assert "x-a='spaced value'" in text  # httpx would refuse the value unstripped
    assert "x-b='2'" in text and "x-b='1'" not in text  # the last one wins, as in WAGI
    assert f"host='127.0.0.1:{upstream.port}'" in text  # the URL's host, not the guest's
    assert "content-length='7'" in text  # the body's length, not the guest's
    assert "payload\nend" in text
    assert "get=5" in text  # header_get: header_not_found (the echo sends no x-test)


async def test_a_tls_upstream_signed_by_the_ca_in_ssl_cert_file_is_reached(
    workspace, start_supervisor, tls_upstream
):
    origin = f"https://127.0.0.1:{tls_upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    status, text = await call(running, tls_upstream.url("/hello"))
    assert status == 200, text
    assert "req=0 status=200" in text and "body=hello from upstream" in text


async def test_a_tls_upstream_whose_ca_is_not_trusted_is_a_request_error(
    workspace, start_supervisor, tls_upstream, monkeypatch
):
    monkeypatch.delenv("SSL_CERT_FILE")
    origin = f"https://127.0.0.1:{tls_upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    assert req_code((await call(running, tls_upstream.url("/hello")))[1]) == 11


# Error codes for malformed calls: never a crash, never an exception in the host.


@pytest.mark.parametrize(
    ("url", "method", "headers", "code"),
    [
        ("{origin}/hello", "GET", "no colon here\n", 9),  # WAGI's host panicked on this
        ("{origin}/hello", "GET", "bad name:v\n", 9),
        ("{origin}/hello", "GET", "x-a:bad\x01value\n", 9),
        ("{origin}/hello", "B AD", "", 8),
        ("not a url at all", "GET", "", 10),
        ("ftp://127.0.0.1/file", "GET", "", 10),
        ("\udcff", "GET", "", 6),  # bytes that are not UTF-8
    ],
    ids=[
        "header-without-colon",
        "bad-header-name",
        "control-in-value",
        "bad-method",
        "bad-url",
        "not-http",
        "not-utf8",
    ],
)
async def test_a_malformed_request_gets_the_abis_error_code(
    workspace, start_supervisor, upstream, url, method, headers, code
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    stdin = b"\0".join(
        [
            url.format(origin=origin).encode("utf-8", "surrogateescape"),
            method.encode(),
            headers.encode(),
            b"",
        ]
    )
    response = await running.client.post("/t/call", content=stdin)
    assert response.status_code == 200, response.text
    assert req_code(response.text) == code


async def test_unknown_handles_and_pointers_outside_memory_get_error_codes(
    workspace, start_supervisor
):
    add_tenant(workspace, [], [], guest="outbound_abi.wat")
    running = await start_supervisor()
    response = await running.client.get("/t/call")
    assert response.status_code == 200, response.text
    assert response.text.split() == [
        "body_read=1",  # invalid_handle (WAGI's host panicked)
        "header_get=1",
        "headers_get_all=1",
        "close=0",  # an unknown handle is not an error, as in WAGI
        "req=3",  # memory_access_error
    ]


async def test_a_guest_without_an_exported_memory_gets_memory_not_found(
    workspace, start_supervisor
):
    add_tenant(workspace, [], [], guest="outbound_nomemory.wat")
    running = await start_supervisor()
    response = await running.client.get("/t/call")
    assert response.status_code == 500
    assert "unreachable" in response.text  # the guest's sign that `close` answered 2


async def test_a_header_block_larger_than_the_guests_buffer_is_buffer_too_small(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    _, text = await call(running, upstream.url("/fat"))
    assert "req=0 status=200" in text
    assert "all=4" in text  # 5,000 bytes of x-fat in a 4,096-byte buffer
    assert "body=fat\nend" in text


# Allow rules: the module's allowed_hosts AND the policy's outbound_hosts.


@pytest.mark.parametrize(
    ("allowed_hosts", "outbound_hosts", "url", "code"),
    [
        (None, ["{origin}"], "{origin}/hello", 7),  # no allowed_hosts: nothing (WAGI)
        (["{origin}"], [], "{origin}/hello", 7),  # the policy's default allows nothing
        (["{origin}"], ["http://127.0.0.1:1"], "{origin}/hello", 7),  # not in the policy
        (["http://127.0.0.1:1"], ["{origin}"], "{origin}/hello", 7),  # not in the module's
        (["https://127.0.0.1:{port}"], ["{origin}"], "{origin}/hello", 7),  # scheme compared
        (["http://127.0.0.1"], ["{origin}"], "{origin}/hello", 7),  # default port 80 only
        (["{origin}"], ["{origin}"], "http://127.0.0.1:{port2}/hello", 7),  # port compared
        (["insecure:allow-all"], ["{origin}"], "{origin}/hello", 0),  # WAGI's escape hatch
        (["http://127.0.0.1:*"], ["{origin}"], "{origin}/hello", 0),  # any port
        (["*://127.0.0.1:{port}"], ["{origin}"], "{origin}/hello", 0),  # any scheme
        (["{origin}/"], ["{origin}"], "{origin}/hello", 0),  # WAGI's trailing slash
    ],
    ids=[
        "module-none",
        "policy-empty",
        "policy-other",
        "module-other",
        "scheme",
        "default-port",
        "port",
        "module-allow-all",
        "any-port",
        "any-scheme",
        "slash",
    ],
)
async def test_both_the_module_and_the_policy_must_allow_scheme_host_and_port(
    workspace, start_supervisor, upstream, allowed_hosts, outbound_hosts, url, code
):
    values = {
        "origin": f"http://127.0.0.1:{upstream.port}",
        "port": upstream.port,
        "port2": upstream.port + 1,
    }
    add_tenant(
        workspace,
        None if allowed_hosts is None else [h.format(**values) for h in allowed_hosts],
        [h.format(**values) for h in outbound_hosts],
    )
    running = await start_supervisor()
    assert req_code((await call(running, url.format(**values)))[1]) == code


async def test_a_redirect_to_a_host_that_is_not_allowed_is_refused(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin, f"http://localhost:{upstream.port}"])
    running = await start_supervisor()
    elsewhere = upstream.url("/hello", host="localhost")  # the policy allows it; the module not
    text = (await call(running, upstream.url(f"/redirect?{elsewhere}")))[1]
    assert req_code(text) == 7
    followed = (await call(running, upstream.url(f"/redirect?{upstream.url('/hello')}")))[1]
    assert "req=0 status=200" in followed and "hello from upstream" in followed
    assert req_code((await call(running, upstream.url("/loop")))[1]) == 11  # > 10 hops
    assert upstream.requests.count("/loop") == 11  # the request and 10 redirects followed


# The SSRF guard: on the address actually connected to.


@pytest.mark.parametrize(
    ("outbound_hosts", "host", "code"),
    [
        (["http://*:{port}"], "127.0.0.1", 7),  # a wildcard never admits loopback
        (["http://*:{port}"], "localhost", 7),  # nor a name that resolves to it
        (["http://localhost:{port}"], "localhost", 0),  # named exactly: admitted
        (["http://127.0.0.1:{port}"], "127.0.0.1", 0),  # an IP literal named exactly
        (["http://169.254.169.254:{port}"], "169.254.169.254", 7),  # metadata: never
    ],
    ids=["wildcard-ip", "wildcard-localhost", "exact-localhost", "exact-ip", "metadata"],
)
async def test_the_ssrf_guard_refuses_private_addresses_unless_the_policy_names_the_host(
    workspace, start_supervisor, upstream, outbound_hosts, host, code
):
    add_tenant(
        workspace,
        ["insecure:allow-all"],
        [h.format(port=upstream.port) for h in outbound_hosts],
        "max_outbound_requests = 4",
    )
    running = await start_supervisor()
    assert req_code((await call(running, upstream.url("/hello", host=host)))[1]) == code


async def test_an_http_proxy_from_the_environment_is_used_and_exempt_from_the_guard(
    workspace, start_supervisor, upstream, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{upstream.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")  # the test's own client: direct
    add_tenant(
        workspace,
        ["http://api.example.test", f"http://localhost:{upstream.port}"],
        ["http://api.example.test", f"http://localhost:{upstream.port}"],
    )
    running = await start_supervisor()
    text = (await call(running, "http://api.example.test/thing"))[1]
    assert "req=0 status=200" in text and "proxied http://api.example.test/thing" in text
    # The allow rules still apply to the target: the proxy never sees a denied request.
    assert req_code((await call(running, "http://other.example.test/"))[1]) == 7
    # NO_PROXY: straight to the upstream, guarded (named exactly in the policy: admitted).
    direct = (await call(running, upstream.url("/hello", host="localhost")))[1]
    assert "hello from upstream" in direct


async def test_an_https_request_goes_through_the_proxy_with_connect_and_the_rules_still_apply(
    workspace, start_supervisor, tls_upstream, monkeypatch
):
    with connect_proxy({"api.example.test": "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "localhost")
        target = f"https://api.example.test:{tls_upstream.port}"
        direct = f"https://localhost:{tls_upstream.port}"
        add_tenant(workspace, [target, direct], [target, direct])
        running = await start_supervisor()
        # Through the proxy, TLS inside the tunnel (the test CA from SSL_CERT_FILE): the proxy
        # is on loopback and named nowhere in the policy, yet exempt from the guard.
        for _ in range(2):
            text = (await call(running, f"{target}/hello"))[1]
            assert "req=0 status=200" in text and "body=hello from upstream" in text
        tunnel = f"CONNECT api.example.test:{tls_upstream.port} HTTP/1.1"
        assert proxy.requests == [tunnel]  # one tunnel, kept alive for the second call
        # The allow rules apply to the target the guest asked for: the proxy sees nothing.
        other = f"https://other.example.test:{tls_upstream.port}/hello"
        assert req_code((await call(running, other))[1]) == 7
        # NO_PROXY: straight to the upstream, guarded (localhost is named exactly: admitted).
        text = (await call(running, f"{direct}/hello"))[1]
        assert "req=0 status=200" in text and "body=hello from upstream" in text
        assert proxy.requests == [tunnel]


@pytest.mark.parametrize(
    ("outbound_hosts", "host", "code"),
    [
        (["https://*:{port}"], "127.0.0.1", 7),  # an address: judged before the proxy
        (["https://*:{port}"], "169.254.169.254", 7),  # metadata: never
        (["https://127.0.0.1:{port}"], "127.0.0.1", 0),  # named exactly: admitted
        (["https://*:{port}"], "api.example.test", 0),  # a name: the proxy resolves it
    ],
    ids=["wildcard-loopback", "metadata", "exact-loopback", "name"],
)
async def test_through_a_proxy_the_guard_judges_a_target_given_as_an_address(
    workspace, start_supervisor, tls_upstream, monkeypatch, outbound_hosts, host, code
):
    with connect_proxy({"api.example.test": "127.0.0.1"}) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        add_tenant(
            workspace,
            ["insecure:allow-all"],
            [h.format(port=tls_upstream.port) for h in outbound_hosts],
        )
        running = await start_supervisor()
        url = f"https://{host}:{tls_upstream.port}/hello"
        assert req_code((await call(running, url))[1]) == code
        seen = [f"CONNECT {host}:{tls_upstream.port} HTTP/1.1"] if code == 0 else []
        assert proxy.requests == seen


# Limits: requests per guest request, responses held, tenant concurrency, size, deadline.


async def test_a_guest_hammering_req_is_stopped_by_the_per_request_cap(
    workspace, start_supervisor, upstream, caplog
):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(
        workspace, [origin], [origin], "max_outbound_requests = 5", guest="outbound_loop.wat"
    )
    running = await start_supervisor()
    response = await running.client.post(
        "/t/call", content=upstream.url("/hello").encode() + b"\0c"
    )
    assert response.text == "calls=6 last=13\n"  # 5 requests, the 6th refused
    assert len(upstream.connections) == 1  # one kept-alive connection for all five
    (record,) = [r for r in caplog.records if r.name == "supervisor.access"]
    assert record.outbound_calls == 6 and "outbound=6" in record.getMessage()


async def test_a_guest_hammering_req_under_a_high_cap_is_stopped_by_its_fuel(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(
        workspace,
        [origin],
        [origin],
        "max_outbound_requests = 10_000\nfuel_per_request = 1_000_000",
        guest="outbound_loop.wat",
    )
    running = await start_supervisor()
    response = await running.client.post(
        "/t/call", content=upstream.url("/hello").encode() + b"\0c"
    )
    assert response.status_code == 503, response.text  # out of fuel
    assert len(upstream.requests) <= 10  # each req charges its CPU time, ~1,000,000 units


async def test_a_guest_hammering_header_get_pays_for_the_hosts_work_in_fuel(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    # 20,000 calls cost the host ~0.15 s of CPU, ~1e9 units of fuel: far more than 5e7.
    for tenant, fuel in (("rich", 10**10), ("t", 5 * 10**7)):
        policy = f"fuel_per_request = {fuel}"
        add_tenant(workspace, [origin], [origin], policy, "outbound_headers.wat", tenant=tenant)
    running = await start_supervisor()
    url = upstream.url("/hello")
    rich = await running.client.post("/rich/call", content=url)
    assert rich.text == "req=0 calls=20000\n"
    poor = await running.client.post("/t/call", content=url)
    assert poor.status_code == 503, poor.text  # out of fuel


async def test_outbound_host_calls_count_toward_the_processes_host_share(
    workspace, start_supervisor, upstream, monkeypatch
):
    monkeypatch.setattr(sandbox, "HOST_SHARE", 0.005)  # 0.15 s of host work: 30 s of wall
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(
        workspace,
        [origin],
        [origin],
        "fuel_per_request = 10_000_000_000",
        guest="outbound_headers.wat",
    )
    running = await start_supervisor()
    started = time.monotonic()
    response = await running.client.post("/t/call", content=upstream.url("/hello"))
    assert response.status_code == 504, response.text  # its share: the deadline comes first
    assert time.monotonic() - started < SLOW_UPSTREAM_S / 2


async def test_responses_held_at_once_are_capped_by_http_max_concurrency(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(
        workspace, [origin], [origin], guest="outbound_loop.wat", extra="http_max_concurrency = 2\n"
    )
    running = await start_supervisor()
    keep = await running.client.post("/t/call", content=upstream.url("/hello").encode() + b"\0k")
    assert keep.text == "calls=3 last=13\n"  # two handles held, the third refused
    close = await running.client.post("/t/call", content=upstream.url("/hello").encode() + b"\0c")
    assert close.text == "calls=17 last=13\n"  # closing frees them: the policy's 16 apply


async def test_a_tenants_outbound_requests_in_flight_are_capped(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin], "max_outbound_concurrency = 1")
    running = await start_supervisor()
    async with trio.open_nursery() as nursery:
        slow: list[tuple[int, str]] = []

        async def call_slow() -> None:
            slow.append(await call(running, upstream.url("/slow")))

        nursery.start_soon(call_slow)
        deadline = time.monotonic() + 5
        while "/slow" not in upstream.requests:  # the first call is in flight
            assert time.monotonic() < deadline
            await trio.sleep(0.01)
        assert req_code((await call(running, upstream.url("/hello")))[1]) == 13
    assert slow[0][0] == 504  # the slow one ended at its guest's deadline


async def test_a_response_over_the_size_bound_is_a_request_error(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin], 'max_outbound_response_bytes = "1KiB"')
    running = await start_supervisor()
    assert req_code((await call(running, upstream.url("/big?1025")))[1]) == 11
    text = (await call(running, upstream.url("/big?1024")))[1]
    assert "req=0 status=200" in text and "b" * 1024 in text


async def test_a_slow_upstream_ends_at_the_guests_deadline_with_504(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])  # timeout_ms = 1000
    running = await start_supervisor()
    started = time.monotonic()
    status, text = await call(running, upstream.url("/slow"))
    elapsed = time.monotonic() - started
    assert status == 504, text
    assert 0.9 < elapsed < SLOW_UPSTREAM_S / 2, elapsed


async def test_a_connection_refused_is_a_request_error(workspace, start_supervisor):
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    assert req_code((await call(running, origin + "/"))[1]) == 11


async def test_outbound_requests_are_counted_by_tenant_and_outcome(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor(metrics_port=0, metrics_tenants=("t",))
    await call(running, upstream.url("/hello"))
    await call(running, "http://127.0.0.1:1/")
    async with httpx.AsyncClient() as scraper:
        text = (await scraper.get(f"http://127.0.0.1:{running.app.metrics_port}/metrics")).text
    assert 'wasm_supervisor_outbound_requests_total{outcome="ok",tenant="t"} 1.0' in text
    assert 'wasm_supervisor_outbound_requests_total{outcome="denied",tenant="t"} 1.0' in text
    assert 'wasm_supervisor_outbound_request_duration_seconds_count{tenant="t"} 2.0' in text


async def test_outbound_connections_of_the_process_are_bounded_and_given_back(
    workspace, start_supervisor, upstream, tls_upstream, monkeypatch
):
    gc.collect()  # earlier tests' servers: their pools give their places back when collected
    already = client.OPEN_CONNECTIONS.open
    monkeypatch.setattr(client, "MAX_CONNECTIONS", already + 1)
    origins = [f"http://127.0.0.1:{upstream.port}", f"https://127.0.0.1:{tls_upstream.port}"]
    add_tenant(workspace, origins, origins, "max_outbound_requests = 64")
    running = await start_supervisor()
    assert "req=0" in (await call(running, tls_upstream.url("/hello")))[1]
    assert client.OPEN_CONNECTIONS.open == already + 1  # kept alive, TLS: counted once
    # The one place is held by an idle connection: it is closed to make room for the new one.
    assert "req=0" in (await call(running, upstream.url("/hello")))[1]
    assert client.OPEN_CONNECTIONS.open == already + 1
    # The one place in use (a request in flight): a new connection fails.
    async with trio.open_nursery() as nursery:
        slow: list[tuple[int, str]] = []

        async def call_slow() -> None:
            slow.append(await call(running, upstream.url("/slow")))

        nursery.start_soon(call_slow)
        deadline = time.monotonic() + 5
        while "/slow" not in upstream.requests:
            assert time.monotonic() < deadline
            await trio.sleep(0.01)
        assert req_code((await call(running, tls_upstream.url("/hello")))[1]) == 11
    assert slow[0][0] == 504
    assert "req=0" in (await call(running, upstream.url("/hello")))[1]
    running.app.registry.outbound.close()  # what shutdown does
    assert client.OPEN_CONNECTIONS.open == already


async def test_idle_connections_of_idle_tenants_never_lock_out_a_busy_tenant(
    workspace, start_supervisor
):
    gc.collect()
    free = client.MAX_CONNECTIONS - client.OPEN_CONNECTIONS.open
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(contextlib.contextmanager(_serve)()) for _ in range(free)]
        # Idle tenants, each with its pool's kept-alive connections to its own upstreams.
        groups = [
            upstreams[i : i + client.KEEPALIVE_PER_POOL]
            for i in range(0, free, client.KEEPALIVE_PER_POOL)
        ]
        for index, group in enumerate(groups):
            origins = [f"http://127.0.0.1:{u.port}" for u in group]
            add_tenant(workspace, origins, origins, tenant=f"idle{index}")
        busy = stack.enter_context(contextlib.contextmanager(_serve)())
        add_tenant(workspace, [f"http://127.0.0.1:{busy.port}"], [f"http://127.0.0.1:{busy.port}"])
        running = await start_supervisor()
        for index, group in enumerate(groups):
            for each in group:
                text = (await call(running, each.url("/hello"), tenant=f"idle{index}"))[1]
                assert "req=0" in text, text
        assert client.OPEN_CONNECTIONS.open == client.MAX_CONNECTIONS  # all idle, kept alive
        for _ in range(3):
            assert "req=0 status=200" in (await call(running, busy.url("/hello")))[1]
        assert len(busy.connections) == 1  # the place it took stays its own, kept alive
        # The one closed was the least recently used: the first idle tenant's first.
        first = groups[0][0]
        assert (
            "req=0"
            in (await call(running, groups[-1][-1].url("/hello"), tenant=f"idle{len(groups) - 1}"))[
                1
            ]
        )
        assert len(groups[-1][-1].connections) == 1
        assert "req=0" in (await call(running, first.url("/hello"), tenant="idle0"))[1]
        assert len(first.connections) == 2
        running.app.registry.outbound.close()


async def test_idle_connections_are_closed_when_their_keep_alive_expires(
    workspace, start_supervisor, upstream, monkeypatch
):
    gc.collect()
    already = client.OPEN_CONNECTIONS.open
    monkeypatch.setattr(client, "KEEPALIVE_S", 0.2)
    origin = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    assert "req=0" in (await call(running, upstream.url("/hello")))[1]
    assert client.OPEN_CONNECTIONS.open == already + 1
    deadline = time.monotonic() + 5  # the sweeper looks every second
    while client.OPEN_CONNECTIONS.open > already:  # nobody calls: the sweeper closes it
        assert time.monotonic() < deadline, "the idle connection was never closed"
        await trio.sleep(0.05)
    assert "req=0" in (await call(running, upstream.url("/hello")))[1]
    assert len(upstream.connections) == 2


# Name lookups: bounded by the guest's deadline and by a few threads of their own.


@dataclass
class StuckResolver:
    lookups: list[str]
    release: threading.Event


@pytest.fixture
def stuck_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckResolver]:
    """The process's `getaddrinfo`, where a lookup of `stuck.test` waits (a dead name server)
    until released or for SLOW_UPSTREAM_S, then answers 127.0.0.1; other names resolve as
    usual. A real hung resolver would need the machine's /etc/resolv.conf changed."""
    real = socket.getaddrinfo
    stuck = StuckResolver([], threading.Event())

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "stuck.test":
            stuck.lookups.append(host)
            stuck.release.wait(SLOW_UPSTREAM_S)
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield stuck
    finally:
        stuck.release.set()


async def test_a_name_lookup_that_hangs_ends_at_the_guests_deadline_with_504(
    workspace, start_supervisor, upstream, stuck_resolver
):
    origin = f"http://stuck.test:{upstream.port}"  # named exactly: its loopback is admitted
    add_tenant(workspace, [origin], [origin])  # timeout_ms = 1000
    running = await start_supervisor()
    started = time.monotonic()
    status, text = await call(running, f"{origin}/hello")
    elapsed = time.monotonic() - started
    assert status == 504, text
    assert 0.9 < elapsed < SLOW_UPSTREAM_S / 2, elapsed
    assert stuck_resolver.lookups == ["stuck.test"]
    stuck_resolver.release.set()  # the name server answers again
    assert "req=0 status=200" in (await call(running, f"{origin}/hello"))[1]


async def test_a_lookup_slower_than_the_resolve_timeout_is_a_request_error(
    workspace, start_supervisor, upstream, stuck_resolver, monkeypatch
):
    monkeypatch.setattr(client, "RESOLVE_TIMEOUT_S", 0.1, raising=False)
    origin = f"http://stuck.test:{upstream.port}"
    add_tenant(workspace, [origin], [origin])
    running = await start_supervisor()
    started = time.monotonic()
    status, text = await call(running, f"{origin}/hello")
    assert status == 200 and req_code(text) == 11, text  # the guest answers without it
    assert time.monotonic() - started < SLOW_UPSTREAM_S / 2


async def test_when_every_lookup_thread_is_stuck_a_lookup_fails_at_once(
    workspace, start_supervisor, upstream, stuck_resolver, monkeypatch
):
    monkeypatch.setattr(client, "RESOLVE_TIMEOUT_S", 0.1, raising=False)
    monkeypatch.setattr(client, "RESOLVER_THREADS", 2, raising=False)
    origin = f"http://stuck.test:{upstream.port}"
    direct = f"http://127.0.0.1:{upstream.port}"
    add_tenant(workspace, [origin, direct], [origin, direct], "max_outbound_requests = 64")
    running = await start_supervisor()
    for _ in range(2):  # each leaves its lookup thread waiting for the name server
        assert req_code((await call(running, f"{origin}/hello"))[1]) == 11
    assert len(stuck_resolver.lookups) == 2
    assert req_code((await call(running, f"{origin}/hello"))[1]) == 11
    assert len(stuck_resolver.lookups) == 2  # no third thread was started
    assert "req=0" in (await call(running, f"{direct}/hello"))[1]  # an address needs none
    stuck_resolver.release.set()
    deadline = time.monotonic() + 5
    while "req=0" not in (await call(running, f"{origin}/hello"))[1]:  # threads given back
        assert time.monotonic() < deadline
        await trio.sleep(0.02)


async def test_one_tenants_stuck_lookups_never_take_another_tenants_lookups(
    workspace, start_supervisor, upstream, stuck_resolver, monkeypatch
):
    """A guest asking again and again for a name whose name server never answers holds at
    most its tenant's share of the lookup threads: another tenant's names still resolve."""
    monkeypatch.setattr(client, "RESOLVE_TIMEOUT_S", 0.1, raising=False)
    stuck = f"http://stuck.test:{upstream.port}"
    add_tenant(workspace, [stuck], [stuck], "max_outbound_requests = 64", tenant="a")
    named = f"http://localhost:{upstream.port}"  # resolved by /etc/hosts: a real lookup
    add_tenant(workspace, [named], [named], tenant="b")
    running = await start_supervisor()
    for _ in range(client.RESOLVER_THREADS):  # as many as the process has threads
        assert req_code((await call(running, f"{stuck}/hello", tenant="a"))[1]) == 11
    assert len(stuck_resolver.lookups) == client.RESOLVER_THREADS_PER_TENANT
    assert "req=0 status=200" in (await call(running, f"{named}/hello", tenant="b"))[1]


async def test_an_uploaded_module_gets_its_allowed_hosts_from_the_upload_and_keeps_them(
    workspace, start_supervisor, upstream
):
    origin = f"http://127.0.0.1:{upstream.port}"
    workspace.add_tenant("t", {}, f'outbound_hosts = ["{origin}"]\n')
    running = await start_supervisor(admin_token_sha256=token_sha256("operator"))
    admin = {"authorization": "Bearer operator"}
    url = "/_admin/v1/tenants/t/modules/call"
    source = (GUESTS / "outbound_call.wat").read_bytes()
    bad = await running.client.put(
        url, content=source, headers=admin, params={"route": "/call", "allowed_host": "nope"}
    )
    assert bad.status_code == 400 and "allowed_host 'nope'" in bad.text
    params = [("route", "/call"), ("allowed_host", "https://x.test"), ("allowed_host", origin)]
    uploaded = await running.client.put(url, content=source, headers=admin, params=params)
    assert uploaded.status_code == 201, uploaded.text
    manifest = json.loads((workspace.tenants / "t" / "manifest.json").read_text())
    assert manifest["modules"]["call"]["allowed_hosts"] == ["https://x.test", origin]
    assert "req=0 status=200" in (await call(running, upstream.url("/hello")))[1]
    # A re-upload without a query serves like the version it replaces: its hosts too.
    other = source.replace(
        b'(data (i32.const 148) "\\nend\\n")', b'(data (i32.const 148) "\\nEND\\n")'
    )
    assert other != source
    again = await running.client.put(url, content=other, headers=admin)
    assert again.status_code == 201, again.text
    assert "req=0 status=200" in (await call(running, upstream.url("/hello")))[1]
    # An upload that names no allowed_host makes no requests.
    none = await running.client.put(url, content=other, headers=admin, params={"route": "/call"})
    assert none.status_code == 201, none.text
    assert req_code((await call(running, upstream.url("/hello")))[1]) == 7
