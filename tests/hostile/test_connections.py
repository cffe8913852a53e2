"""Connections and file descriptors under a hostile client (issue 10, item 7).

One client address (127.0.0.2) floods the server with connections it never uses; another
(127.0.0.3) must still be served promptly, and the flood must cost the flooder its own
connections, not the server its descriptors: a guest still opens its volume, accept never
fails. The limits are lowered in the test (a small connection limit in-process; a small
RLIMIT_NOFILE for a server in a subprocess) so that a flood of a few hundred sockets is enough.

The flood's sockets are plain blocking sockets: connecting completes in the kernel (the
listen backlog), whether or not the server accepts, so connecting never waits on the server
running in this same event loop.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio
from conftest import DEMO, Workspace
from test_lifecycle import PROC_NET_TCP, child_environment, serve_process, workspace_args

from supervisor import cli
from supervisor.server import ServerConfig

ATTACKER = "127.0.0.2"
QUIET = "127.0.0.3"
PROMPT_S = 3.0
"""A quiet client's request under a flood must be answered within this. Before the fix it
waited in the backlog for the flooder's connections to time out (head_timeout_s)."""
WAIT_S = 10.0
"""Bound on waiting for the server to act on the flood."""
POLL_S = 0.02
SITE_ROUTE = "/t/site/about.txt"
"""A route of site.wat, which opens its read-only volume /static on every request."""


@contextlib.contextmanager
def flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections from ATTACKER that send nothing, closed on exit."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind((ATTACKER, 0))
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this connection (reads and drops any response first)."""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        if not data:
            return True


def still_open(sockets: list[socket.socket]) -> int:
    return sum(not closed_by_server(sock) for sock in sockets)


async def wait_until(predicate, what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not predicate():
            await trio.sleep(POLL_S)
        return
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def quiet_client(port: int) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=QUIET)
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30)


def add_site_tenant(workspace: Workspace) -> None:
    folder = workspace.add_tenant(
        "t", {"/site/...": ("site.wat", {"volumes": {"/static": "static"}})}
    )
    shutil.copytree(DEMO / "static", folder / "static")


async def test_idle_flood_from_one_client_leaves_healthz_prompt_for_another(
    workspace: Workspace, start_supervisor
) -> None:
    # Timeouts far past the test's waits: only the limits under test may close a connection.
    config = ServerConfig(
        max_connections=64, max_idle_per_client=8, head_timeout_s=60, keep_alive_timeout_s=60
    )
    running = await start_supervisor(server=config)
    port = running.app.port
    with flood(port, 40) as kept_alive:
        for sock in kept_alive:  # each asks once, then holds its connection idle
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: still_open(kept_alive) <= 8, "idle connections capped at 8")
        with flood(port, 150) as silent:  # past the limit: they wait in the backlog
            async with quiet_client(port) as client:
                with trio.fail_after(PROMPT_S):
                    assert (await client.get("/healthz")).status_code == 200
            await wait_until(
                lambda: still_open(kept_alive) + still_open(silent) <= 64,
                "the flooder holds no more than the connection limit",
            )


async def test_slow_head_flood_from_one_client_leaves_healthz_prompt_for_another(
    workspace: Workspace, start_supervisor
) -> None:
    config = ServerConfig(max_connections=16, head_timeout_s=60)
    running = await start_supervisor(server=config)
    port = running.app.port
    with flood(port, 40) as slow:
        for sock in slow:  # a head begun and never finished
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        async with quiet_client(port) as client:
            with trio.fail_after(PROMPT_S):
                assert (await client.get("/healthz")).status_code == 200
        await wait_until(lambda: still_open(slow) <= 16, "the flooder holds at most the limit")


async def test_a_volume_that_cannot_be_opened_never_shows_its_host_path(
    workspace: Workspace, start_supervisor
) -> None:
    add_site_tenant(workspace)
    running = await start_supervisor()
    assert (await running.client.get(SITE_ROUTE)).status_code == 200
    static = workspace.tenants / "t" / "static"
    shutil.rmtree(static)
    static.write_text("a file where the volume's folder was\n")
    response = await running.client.get(SITE_ROUTE)
    assert response.status_code == 500
    assert "/static" in response.text  # the guest's path, named
    assert str(workspace.root) not in response.text and "tenants" not in response.text


def _listen_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the IPv4 listener on `port`."""
    for line in PROC_NET_TCP.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
            return int(fields[4].split(":")[1], 16)  # rx_queue of a listener: its backlog
    return None


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


DESCRIPTORS = 256
"""RLIMIT_NOFILE of the server in a subprocess: a flood of FLOOD connections exceeds it."""
FLOOD = 400


def _lower_descriptor_limit(limit: int = DESCRIPTORS):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


async def test_under_a_low_descriptor_limit_an_idle_flood_leaves_volumes_and_accept_working(
    workspace: Workspace,
) -> None:
    add_site_tenant(workspace)
    extra = ["--workers", "1", "--slots", "2"]
    async with serve_process(
        workspace, extra=extra, preexec_fn=_lower_descriptor_limit()
    ) as server:
        async with quiet_client(server.port) as before, quiet_client(server.port) as after:
            assert (await before.get(SITE_ROUTE)).status_code == 200  # a connection kept alive
            with flood(server.port, FLOOD):
                # The server has taken what it will take: the backlog is empty (it makes room
                # by closing idle connections), or it has run out of descriptors (before).
                await wait_until(
                    lambda: (
                        _listen_queue(server.port) == 0
                        or _open_fds(server.process.pid) >= DESCRIPTORS - 1
                    ),
                    "the server accepts the flood or runs out of descriptors",
                )
                for client in (before, after):  # the kept connection, then a new one
                    with trio.fail_after(PROMPT_S):
                        response = await client.get(SITE_ROUTE)
                    assert str(workspace.root) not in response.text
                    assert response.status_code == 200, response.text
        assert "accept failed" not in server.log()
        assert re.search(r"connections: at most \d+ \(RLIMIT_NOFILE 256,", server.log())


def test_a_descriptor_limit_too_low_for_any_connection_refuses_to_start(
    workspace: Workspace,
) -> None:
    command = [sys.executable, "-m", "supervisor.cli", "serve", "--workers", "1"]
    result = subprocess.run(
        command + workspace_args(workspace),
        env=child_environment(home=workspace.root),
        cwd=workspace.root,
        preexec_fn=_lower_descriptor_limit(64),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "RLIMIT_NOFILE: the soft limit of 64 file descriptors leaves" in result.stderr
    assert "raise it (ulimit -n) or lower --slots" in result.stderr


async def test_connection_limits_are_flags_and_the_limit_in_force_is_logged(
    workspace: Workspace, start_supervisor, caplog
) -> None:
    args = ["serve", "--max-connections", "100", "--max-idle-per-client", "4"]
    config = cli._app_config(cli.build_parser().parse_args(args + workspace_args(workspace)))
    assert (config.server.max_connections, config.server.max_idle_per_client) == (100, 4)
    caplog.set_level(logging.INFO, logger="supervisor.app")
    await start_supervisor(server=config.server)
    assert "connections: at most 100 (RLIMIT_NOFILE" in caplog.text
    assert "4 idle per client" in caplog.text
