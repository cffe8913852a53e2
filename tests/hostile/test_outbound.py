"""Outbound HTTP for guests: WAGI's wasi_experimental_http ABI without its holes (issue 12, §4).

Each test runs a real server on 127.0.0.1 and WAT guests (tests/hostile/guests/outbound_*.wat)
that call the five imports; the upstream is a real HTTP server of the test's own on
127.0.0.1 (plain, and TLS with a CA made by `openssl` for the test). The upstream is on
loopback, so a policy that lets a guest reach it names 127.0.0.1 (or localhost) exactly,
which is the SSRF guard's exception; wildcards and names resolving to loopback are refused.
"""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"
SLOW_UPSTREAM_S = 5.0
"""How long /slow waits before answering: well past the guests' 1 s deadline."""


class _Upstream(http.server.BaseHTTPRequestHandler):
    """/hello, /echo, /big?N, /slow, /redirect?URL, /loop: what the tests call."""

    protocol_version = "HTTP/1.1"
    release: threading.Event
    connections: list[int]

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
        elif path == "/loop":
            self._answer(302, b"", {"location": "/loop"})
        else:
            self._answer(404, b"no such path")


@dataclass
class Upstream:
    port: int
    connections: list[int]
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _serve(context: ssl.SSLContext | None = None) -> Iterator[Upstream]:
    release = threading.Event()
    connections: list[int] = []
    handler = type("Handler", (_Upstream,), {"release": release, "connections": connections})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(server.server_address[1], connections, "https" if context else "http")
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
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
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
) -> None:
    """Tenant `t`, route `/call` running `guest` with the module's `allowed_hosts`."""
    lines = [f"outbound_hosts = {outbound_hosts!r}".replace("'", '"'), "timeout_ms = 1000", policy]
    workspace.add_tenant("t", {}, "\n".join(lines) + "\n")
    folder = workspace.tenants / "t"
    shutil.copyfile(GUESTS / guest, folder / guest)
    entry = f'[[module]]\nroute = "/call"\nmodule = "{guest}"\n{extra}'
    if allowed_hosts is not None:
        entry += f"allowed_hosts = {allowed_hosts!r}\n".replace("'", '"')
    (folder / "modules.toml").write_text(entry)


async def call(running, url: str, method: str = "GET", headers: str = "", body: bytes = b""):
    """Ask the guest to make one request; its response (status, text)."""
    stdin = b"\0".join([url.encode(), method.encode(), headers.encode(), body])
    response = await running.client.post("/t/call", content=stdin)
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
