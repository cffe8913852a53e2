"""HTTPS with trio's SSLStream: a certificate made by the `openssl` CLI, a real server on
127.0.0.1, real TLS clients; the guest sees `https` in X_FULL_URL."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from supervisor import server
from tests.test_lifecycle import child_environment, workspace_args


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PKCS#8 PEM, OpenSSL 3's default)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=t"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def traditional_key(key: Path) -> Path:
    """The same key in OpenSSL's traditional (SEC1) PEM form, which WAGI refused."""
    sec1 = key.with_name("key-sec1.pem")
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-out", str(sec1), "-traditional"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return sec1


@pytest.mark.parametrize("key_form", ["pkcs8", "sec1"])
async def test_serve_answers_over_tls_and_the_guest_sees_https(
    workspace, start_supervisor, key_form
):
    cert, key = make_certificate(workspace.root)
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()  # PKCS#8
    if key_form == "sec1":
        key = traditional_key(key)
        assert b"BEGIN EC PRIVATE KEY" in key.read_bytes()
    workspace.add_tenant("demo", {"/echo": "echo.wat"})
    running = await start_supervisor(server=server.ServerConfig(tls_cert=cert, tls_key=key))
    url = f"https://127.0.0.1:{running.app.port}"
    async with httpx.AsyncClient(verify=trusting(cert), base_url=url) as client:
        for _ in range(2):  # the second on the same kept-alive TLS connection
            response = await client.get("/demo/echo?x=1")
            assert response.status_code == 200
            assert f"X_FULL_URL=https://127.0.0.1:{running.app.port}/demo/echo?x=1\n" in (
                response.text
            )
    # Plain HTTP on the TLS port gets no answer, and the server carries on.
    with pytest.raises(httpx.TransportError):
        await running.client.get(f"http://127.0.0.1:{running.app.port}/demo/echo")
    async with httpx.AsyncClient(verify=trusting(cert), base_url=url) as client:
        assert (await client.get("/demo/echo")).status_code == 200


async def test_a_failed_handshake_does_not_stop_the_server(workspace, start_supervisor):
    cert, key = make_certificate(workspace.root)
    workspace.add_tenant("demo", {"/echo": "echo.wat"})
    running = await start_supervisor(server=server.ServerConfig(tls_cert=cert, tls_key=key))
    url = f"https://127.0.0.1:{running.app.port}/demo/echo"
    async with httpx.AsyncClient() as untrusting:  # verifies against the system CAs: fails
        with pytest.raises(httpx.ConnectError):
            await untrusting.get(url)
    stream = await trio.open_tcp_stream("127.0.0.1", running.app.port)
    await stream.send_all(b"\x16\x03\x01\x00\x05junk!")  # a broken ClientHello
    await stream.aclose()
    async with httpx.AsyncClient(verify=trusting(cert)) as client:
        assert (await client.get(url)).status_code == 200


def run_serve(workspace, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "serve", *workspace_args(workspace), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_environment(home=workspace.root),
    )


def test_serve_refuses_a_certificate_without_its_key(workspace):
    cert, _ = make_certificate(workspace.root)
    result = run_serve(workspace, "--tls-cert", str(cert))
    assert result.returncode == 2
    assert "--tls-cert and --tls-key go together" in result.stderr


def test_serve_names_an_unreadable_key(workspace):
    cert, _ = make_certificate(workspace.root)
    bad = workspace.root / "bad.pem"
    bad.write_text("not a key\n")
    result = run_serve(workspace, "--tls-cert", str(cert), "--tls-key", str(bad))
    assert result.returncode == 2
    assert f"TLS: cannot load certificate {cert} with key {bad}" in result.stderr
    missing = run_serve(workspace, "--tls-cert", str(cert), "--tls-key", "/nonexistent.pem")
    assert "TLS: no such file: /nonexistent.pem" in missing.stderr
