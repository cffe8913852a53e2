"""The `wasm-supervisor` process as an operator runs it: signals, logs, environment, checks.

Each test starts `python -m supervisor.cli serve` as a real subprocess on a loopback port the
kernel picks, and waits for `/healthz` to answer 200. `serve_process` and `ServerProcess` are
also used by test_reload.py (SIGHUP), test_artifact_cache.py (a read-only cache) and
test_scale.py (startup time and memory).

How a test knows a request is in flight before it signals the server: the access log is only
written when a request ends, and a `/healthz` answered on another connection proves nothing
about the first one. The kernel does know: once the client's socket has no unacknowledged
bytes and the server's socket has no unread ones (`/proc/net/tcp`), the server process has
read the whole request, so its connection is past the idle state that shutdown closes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
import pytest
import trio
from conftest import REPO, Workspace

from supervisor import cli

STARTUP_TIMEOUT_S = 30.0
"""From spawn to a healthy `/healthz`: a cold start compiles every module first."""
EXIT_TIMEOUT_S = 10.0
"""For a drained server to exit once its last request is answered."""
POLL_S = 0.02
"""Between two looks at something the test waits for (a port, a socket queue, a response)."""
NAP_S = 1.0
"""How long tests/guests/nap.wat sleeps: the window in which the server is told to stop."""
PROC_NET_TCP = Path("/proc/net/tcp")
SERVING = re.compile(r"serving on http://[^:/\s]+:(?P<port>\d+)")
"""The line `serve` logs once it listens: it names the port the kernel picked."""
CLI_SCRIPT = Path(sys.executable).with_name("wasm-supervisor")
"""The console script `pip install` put beside the interpreter running the tests."""


def child_environment(extra: Mapping[str, str] | None = None, *, home: Path) -> dict[str, str]:
    """The test's environment without anything that configures `serve`, plus `extra`.

    `XDG_CACHE_HOME` points into the test's folder so that the default cache is never the
    developer's own; `/metrics` listens on a port the kernel picks, so that servers of test
    runs in parallel never collide on its fixed default.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SUPERVISOR_") and key != "PORT"
    }
    env["XDG_CACHE_HOME"] = str(home / "xdg-cache")
    env["SUPERVISOR_METRICS_LISTEN"] = "127.0.0.1:0"
    env.update(extra or {})
    return env


def workspace_args(workspace: Workspace) -> list[str]:
    return [
        "--listen",
        "127.0.0.1:0",
        "--tenants",
        str(workspace.tenants),
        "--policies",
        str(workspace.policies),
        "--cache",
        str(workspace.cache),
    ]


@dataclass
class ServerProcess:
    process: trio.Process
    port: int
    log_path: Path
    ready_s: float  # from spawn to the first 200 from /healthz

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server wrote to stderr (and stdout) so far."""
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the server process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/<pid>/status")


@asynccontextmanager
async def serve_process(
    workspace: Workspace,
    args: Sequence[str] | None = None,
    *,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[ServerProcess]:
    """Run `serve` with `args` (default: on `workspace`) and `extra` until it is healthy.

    The server listens on a port the kernel picks (`--listen 127.0.0.1:0`, or the test's own
    `PORT=0`): a port chosen beforehand could be taken by the time the server binds it, and
    parallel test runs did collide. The port is read from the server's "serving on" line.
    On exit a server still running gets SIGTERM, then SIGKILL if it has not exited in time.
    """
    command = [sys.executable, "-m", "supervisor.cli", "serve"]
    command += workspace_args(workspace) if args is None else list(args)
    command += extra
    fd, log_name = tempfile.mkstemp(dir=workspace.root, prefix="server-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log_file:
        started = time.perf_counter()
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=child_environment(env, home=workspace.root),
            cwd=cwd or workspace.root,
            preexec_fn=preexec_fn,
        )
    try:
        port = await _wait_until_healthy(process, log_path)
        yield ServerProcess(process, port, log_path, time.perf_counter() - started)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(EXIT_TIMEOUT_S):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _wait_until_healthy(process: trio.Process, log_path: Path) -> int:
    """The server's port, once its `/healthz` answers 200; fails if it exits or takes long."""
    port = None
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.move_on_after(STARTUP_TIMEOUT_S):
            while process.poll() is None:
                if port is None and (serving := SERVING.search(log_path.read_text())):
                    port = int(serving["port"])
                if port is not None:
                    try:
                        response = await client.get(f"http://127.0.0.1:{port}/healthz")
                    except httpx.TransportError:
                        pass
                    else:
                        if response.status_code == 200:
                            return port
                await trio.sleep(POLL_S)
            log = log_path.read_text(errors="replace")
            pytest.fail(f"server exited with {process.returncode} before serving:\n{log}")
    pytest.fail(f"no healthy /healthz in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(unsent-or-unacked, unread) bytes of the IPv4 socket local_port -> remote_port."""
    for line in PROC_NET_TCP.read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.rpartition(":")[2], 16) == local_port and (
            int(remote.rpartition(":")[2], 16) == remote_port
        ):
            tx_queue, rx_queue = (int(part, 16) for part in queues.split(":"))
            return tx_queue, rx_queue
    return None


async def wait_until_server_read(server_port: int, client_port: int) -> None:
    """Until the server process has read every byte the client sent on this connection."""
    with trio.fail_after(5):
        while True:
            client = _tcp_queues(client_port, server_port)
            server = _tcp_queues(server_port, client_port)
            if client == (0, 0) and server is not None and server[1] == 0:
                return
            await trio.sleep(POLL_S)


async def wait_until_refused(port: int) -> None:
    """Until connecting to `port` is refused (nothing listens there any more)."""
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(POLL_S)


async def read_response(
    stream: trio.SocketStream, client: h11.Connection
) -> tuple[int, dict, bytes]:
    """Status, headers (lower-case names) and body of the response on `stream`."""
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        else:
            raise AssertionError(f"unexpected {event!r}")


@pytest.mark.skipif(not PROC_NET_TCP.exists(), reason="needs Linux /proc/net/tcp")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_drains_the_request_in_flight_and_exits_0(
    workspace: Workspace, signum: signal.Signals
) -> None:
    workspace.add_tenant("slow", {"/nap": "nap.wat"})
    async with serve_process(workspace) as server:
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/slow/nap", headers=[("Host", "127.0.0.1")])
        finished: dict[str, object] = {}

        async def in_flight(stream: trio.SocketStream) -> None:
            finished["response"] = await read_response(stream, client)
            finished["at"] = time.perf_counter()

        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            sent_at = time.perf_counter()
            await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
            await wait_until_server_read(server.port, stream.socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight, stream)
                server.process.send_signal(signum)
                await wait_until_refused(server.port)
                refused_at = time.perf_counter()
        with trio.fail_after(EXIT_TIMEOUT_S):
            returncode = await server.process.wait()

    status, headers, body = finished["response"]
    assert (status, body) == (200, b"rested\n")
    assert headers["connection"] == "close"
    # New connections were refused while the request was still being served...
    assert refused_at < finished["at"]
    assert finished["at"] - sent_at >= NAP_S * 0.9
    # ...and the process exited cleanly once it was answered.
    assert returncode == 0, server.log()
    assert f"{signum.name}: draining" in server.log()


async def test_json_log_format_writes_one_object_per_line(workspace: Workspace) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=["--log-format", "json"]) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        ok = await http.get("/demo/hello")
        missing = await http.get("/nobody/here")
    assert ok.status_code == 200
    assert missing.status_code == 404

    entries = [json.loads(line) for line in server.log().splitlines()]  # every line is JSON
    access = {e["request_id"]: e for e in entries if e["logger"] == "supervisor.access"}
    fields = {"request_id", "tenant", "route", "status", "outcome", "duration_ms", "fuel_used"}
    for entry in access.values():
        assert fields <= entry.keys(), entry

    served = access[ok.headers["x-request-id"]]
    assert (served["tenant"], served["route"], served["status"]) == ("demo", "/hello", 200)
    assert served["outcome"] == "ok"
    assert isinstance(served["duration_ms"], float) and served["duration_ms"] > 0
    assert isinstance(served["fuel_used"], int) and served["fuel_used"] > 0

    unknown = access[missing.headers["x-request-id"]]
    assert (unknown["tenant"], unknown["route"], unknown["status"]) == ("-", "-", 404)
    assert (unknown["outcome"], unknown["fuel_used"]) == ("not_found", 0)


async def test_environment_variables_configure_serve(workspace: Workspace) -> None:
    """With no flags at all, SUPERVISOR_* set every path, the address and the log format.

    The child runs in an empty folder, so the relative defaults (`tenants`, `policies`) find
    nothing there: serving the tenant proves the variables were read.
    """
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    empty = workspace.root / "elsewhere"
    empty.mkdir()
    env = {
        "SUPERVISOR_LISTEN": "127.0.0.1:0",
        "SUPERVISOR_TENANTS": str(workspace.tenants),
        "SUPERVISOR_POLICIES": str(workspace.policies),
        "SUPERVISOR_CACHE": str(workspace.cache),
        "SUPERVISOR_LOG_FORMAT": "json",
    }
    async with (
        serve_process(workspace, [], env=env, cwd=empty) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        response = await http.get("/demo/hello")
    assert (response.status_code, response.text) == (200, "hello from wasm\n")
    assert list(workspace.cache.rglob("*.cwasm")), "the artifact went to SUPERVISOR_CACHE"
    assert all(json.loads(line) for line in server.log().splitlines())


async def test_flags_win_over_environment_and_port_sets_the_default_listen(
    workspace: Workspace,
) -> None:
    """Knative sets PORT; a flag given on the command line beats its SUPERVISOR_* variable."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    env = {"PORT": "0", "SUPERVISOR_TENANTS": str(workspace.root / "no-such-folder")}
    args = ["--tenants", str(workspace.tenants), "--policies", str(workspace.policies)]
    args += ["--cache", str(workspace.cache)]
    async with (
        serve_process(workspace, args, env=env) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        response = await http.get("/demo/hello")
    assert (response.status_code, response.text) == (200, "hello from wasm\n")
    assert server.port != cli.DEFAULT_PORT  # PORT=0: the kernel picked it


def test_policy_check_accepts_the_repository_policies() -> None:
    result = subprocess.run(
        [str(CLI_SCRIPT), "policy", "check", "--policies", str(REPO / "policies")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(" valid, 0 invalid")


def test_policy_check_names_the_broken_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text("timeout_ms = 100\n")
    (tmp_path / "acme.toml").write_text("timeout_msx = 100\n")
    result = subprocess.run(
        [str(CLI_SCRIPT), "policy", "check", "--policies", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == "1 valid, 1 invalid"
    assert str(tmp_path / "acme.toml") in result.stderr
    assert "timeout_msx" in result.stderr
    assert "unknown key" in result.stderr
    assert "good.toml" not in result.stderr


async def test_the_pod_serves_once_its_policies_are_read_and_builds_each_tenant_on_demand(
    workspace: Workspace,
) -> None:
    """Issue 11 section 5: readiness waits for the policies, not for every tenant's build.
    Tenant `pulling` names an `oci:` module whose registry accepts the connection and says
    nothing, so building it blocks: the pod is ready and serves `ok` (built first) meanwhile,
    and answers 404 at once for a name with no policy. A request for `pulling` waits for its
    build, which fails when the registry hangs up: not served, 404. Before, the pod was
    ready only once every tenant was built."""
    workspace.add_tenant("ok", {"/hello": "hello.wat"})
    with trio.socket.socket() as registry:
        await registry.bind(("127.0.0.1", 0))
        registry.listen()
        host = f"127.0.0.1:{registry.getsockname()[1]}"
        pulling = workspace.tenants / "pulling"
        pulling.mkdir()
        workspace.write_policy("pulling", "")
        (pulling / "modules.toml").write_text(
            f'[[module]]\nroute = "/hello"\nmodule = "oci:{host}/hello:1"\n'
        )
        extra = ["--workers", "1", "--insecure-registry", host]
        async with (
            serve_process(workspace, extra=extra) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        ):
            pull, _ = await registry.accept()  # the build of `pulling` waits for an answer
            with pull:
                assert (await http.get("/ok/hello")).status_code == 200
                assert (await http.get("/nobody/hello")).status_code == 404
                assert "read 1 tenants" not in server.log()  # `pulling` is still being built
                client = h11.Connection(h11.CLIENT)
                request = h11.Request(
                    method="GET", target="/pulling/hello", headers=[("Host", "127.0.0.1")]
                )
                async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
                    await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
                    await wait_until_server_read(server.port, stream.socket.getsockname()[1])
                    pull.shutdown(socket.SHUT_RDWR)  # the registry hangs up: the build fails
                    status, _, body = await read_response(stream, client)
            assert (status, body) == (404, b"no tenant serves '/pulling/hello'\n")
            with trio.fail_after(10):  # the build goes on a moment after answering
                while "read 1 tenants" not in server.log():
                    await trio.sleep(POLL_S)
