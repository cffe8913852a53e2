"""Hostile `_routes` (issue 10, items 4, 5 and 10): what a module declares is bounded, its
`_routes` runs once per module version and never on a serving path, and a worker that cannot
load what the pod committed says so on `/healthz` until it converges.

Servers are real: in this process (`start_supervisor`) for the bounds, `serve --workers 2`
(test_lifecycle.serve_process) where the workers matter. Guests are tests/hostile/guests/.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import time
from pathlib import Path

import httpx
import trio
import wasmtime
from conftest import GUESTS
from test_admin import (
    OPERATOR_TOKEN,
    admin_tenant,
    error_of,
    greeter,
    start_admin,
    upload,
)
from test_admin_multipod import connection_per_worker
from test_lifecycle import serve_process
from test_workers import TWO_WORKERS, worker_of, worker_pids

from supervisor import store
from supervisor.declared_routes import CACHE_SUFFIX

HOSTILE_GUESTS = Path(__file__).resolve().parent / "guests"
WAIT_S = 20.0
"""Bound on a state a test waits for (a worker restarted, a retry converged)."""
POLL_S = 0.02
SLEEPY_ROUTES_S = 2.0
"""How long routes_sleepy.wat's `_routes` sleeps."""
STALL_BOUND_S = SLEEPY_ROUTES_S / 2
"""A request of another tenant on the other worker answers well within this (a hello takes
milliseconds); a worker that ran the sleeping `_routes` (or a 2 s compile) on its request
path took 2 s."""
ADMIN_ENV = {"SUPERVISOR_ADMIN_TOKEN": OPERATOR_TOKEN}
BIG_FUNCTIONS = 3000
"""Functions of a module that takes 2-4 s to compile here (3,000 of greeter's: ~1.7 MB)."""


def guest(name: str) -> bytes:
    return (HOSTILE_GUESTS / name).read_bytes()


async def wait_until(check, *, timeout_s: float = WAIT_S) -> None:
    """Until the async `check()` is true; fails past `timeout_s`."""
    with trio.fail_after(timeout_s):
        while not await check():
            await trio.sleep(POLL_S)


# Item 4: what a module may declare is bounded.


async def test_a_module_declaring_257_routes_is_refused_naming_max_routes_per_module(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    admin_tenant(workspace, "roomy", "max_routes_per_module = 257\n")
    running = await start_admin(start_supervisor)
    refused = await upload(running.client, "acme", "many", guest("routes_many.wat"), route="/m")
    assert refused.status_code == 422, refused.text
    assert "max_routes_per_module (256)" in error_of(refused)
    assert "257 routes" in error_of(refused)
    assert (await running.client.get("/acme/m")).status_code == 404
    # The bound is the policy's: the same module fits a tenant allowed 257.
    taken = await upload(running.client, "roomy", "many", guest("routes_many.wat"), route="/m")
    assert taken.status_code == 201, taken.text
    assert (await running.client.get("/roomy/m/r")).text == "many\n"


async def test_a_tenant_over_max_routes_is_refused_naming_it(workspace, start_supervisor):
    """routes.wat serves 3 routes (its own, /a, /b/...): two fit in 8, a third does not."""
    admin_tenant(workspace, "acme", "max_routes = 8\n")
    running = await start_admin(start_supervisor)
    source = (GUESTS / "routes.wat").read_bytes()
    for name in ("one", "two"):
        response = await upload(running.client, "acme", name, source, route=f"/{name}")
        assert response.status_code == 201, response.text
    refused = await upload(running.client, "acme", "three", source, route="/three")
    assert refused.status_code == 422, refused.text
    assert "max_routes (8)" in error_of(refused)
    assert (await running.client.get("/acme/three/a")).status_code == 404
    assert (await running.client.get("/acme/two/a")).text == "from alt_a\n"


async def test_modules_toml_over_max_routes_keeps_the_last_good_state(workspace, start_supervisor):
    folder = workspace.add_tenant("t", {"/one": "routes.wat"}, "max_routes = 4\n")
    running = await start_supervisor()
    assert (await running.client.get("/t/one/a")).text == "from alt_a\n"
    entries = (folder / "modules.toml").read_text()
    # Replaced whole, as an operator's deploy does: a poll must not read half a file.
    (folder / "next.toml").write_text(entries + entries.replace("/one", "/two"))
    (folder / "next.toml").replace(folder / "modules.toml")

    async def refused() -> bool:
        return "max_routes" in running.app.registry.state.errors.get("t", "")

    await wait_until(refused)
    error = running.app.registry.state.errors["t"]
    assert "modules.toml: module[1]: max_routes:" in error
    assert (await running.client.get("/t/one/a")).text == "from alt_a\n"  # last good state
    assert (await running.client.get("/t/two/a")).status_code == 404


async def test_routes_output_over_max_routes_output_bytes_is_refused(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    refused = await upload(running.client, "acme", "flood", guest("routes_flood.wat"), route="/f")
    assert refused.status_code == 422, refused.text
    assert "max_routes_output_bytes (65536)" in error_of(refused)
    assert (await running.client.get("/acme/f")).status_code == 404


# Item 5: `_routes` runs once per module version, never on a serving path.


async def test_routes_runs_once_per_sha256_across_workers_reloads_and_restarts(workspace):
    """The same module named by modules.toml and uploaded through the admin API, served by
    two workers, reloaded, then every worker restarted (SIGHUP rolls them): its `_routes`
    (which says so on stderr, copied to the log) ran once in all."""
    folder = workspace.add_tenant("fixed")
    (folder / "once.wat").write_bytes(guest("routes_once.wat"))
    (folder / "modules.toml").write_text('[[module]]\nroute = "/o"\nmodule = "once.wat"\n')
    admin_tenant(workspace, "acme")
    async with (
        serve_process(workspace, extra=TWO_WORKERS, env=ADMIN_ENV) as server,
        connection_per_worker(server.url, workers=2) as clients,
    ):
        response = await upload(clients[0], "acme", "o", guest("routes_once.wat"), route="/o")
        assert response.status_code == 201, response.text
        for client in clients:  # each worker: the fixed tenant, and the upload caught up
            assert (await client.get("/fixed/o/a")).text == "once a\n"
            assert (await client.get("/acme/o/a")).text == "once a\n"
        old = worker_pids(server)
        server.process.send_signal(signal.SIGHUP)
        with trio.fail_after(WAIT_S):
            while "rolling restart done" not in server.log():
                await trio.sleep(POLL_S)
        assert not old & worker_pids(server)
        async with httpx.AsyncClient(
            base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0)
        ) as fresh:
            answered_by = set()
            with trio.fail_after(WAIT_S):
                while len(answered_by) < 2:
                    response = await fresh.get("/acme/o/a")
                    assert response.text == "once a\n"
                    answered_by.add(worker_of(response))
        assert server.log().count("routes-once-ran") == 1, server.log()


async def test_a_sleeping_routes_does_not_stall_another_tenants_requests_on_the_other_worker(
    workspace,
):
    workspace.add_tenant("quiet", {"/hello": "hello.wat"})
    admin_tenant(workspace, "acme", "timeout_ms = 5000\n")  # the sleep is well within it
    async with (
        serve_process(workspace, extra=TWO_WORKERS, env=ADMIN_ENV) as server,
        connection_per_worker(server.url, workers=2) as (uploader, other),
    ):
        durations: list[float] = []
        uploaded = trio.Event()

        async def probe_until_uploaded() -> None:
            # Until the upload is answered, then a few more: the other worker catches up
            # with it on its first request after the commit.
            after = 0
            while after < 5:
                after += uploaded.is_set()
                started = time.perf_counter()
                response = await other.get("/quiet/hello")
                durations.append(time.perf_counter() - started)
                assert response.status_code == 200

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe_until_uploaded)
            sleepy = guest("routes_sleepy.wat")
            response = await upload(uploader, "acme", "s", sleepy, route="/s")
            uploaded.set()
        assert response.status_code == 201, response.text
        assert (await other.get("/acme/s/a")).text == "sleepy a\n"
        assert max(durations) < STALL_BOUND_S, sorted(durations)[-5:]
        assert worker_of(await uploader.get("/healthz")) != worker_of(await other.get("/healthz"))


async def test_a_catch_up_that_would_compile_leaves_it_to_the_background_reload(workspace):
    """The pod's cache cannot keep the upload's artifact (as on a full disk: here a folder
    holds its name), so the other worker would compile it (~2 s) to catch up, on a request of
    any tenant. That request is served from the state in force at once, and the poll
    compiles the upload in the background."""
    workspace.add_tenant("quiet", {"/hello": "hello.wat"})
    admin_tenant(workspace, "acme")
    big = greeter("big", functions=BIG_FUNCTIONS)
    digest = hashlib.sha256(wasmtime.wat2wasm(big.decode())).hexdigest()
    async with (
        serve_process(workspace, extra=TWO_WORKERS, env=ADMIN_ENV) as server,
        connection_per_worker(server.url, workers=2) as (uploader, other),
    ):
        (engine_folder,) = (path for path in workspace.cache.iterdir() if path.is_dir())
        (engine_folder / f"{digest}.cwasm").mkdir()
        response = await upload(uploader, "acme", "big", big, route="/big")
        assert response.status_code == 201, response.text
        started = time.perf_counter()
        quiet = await other.get("/quiet/hello")  # the first request after the commit
        assert time.perf_counter() - started < STALL_BOUND_S
        assert quiet.status_code == 200

        async def served() -> bool:
            return (await other.get("/acme/big")).text == "big\n"

        await wait_until(served)


async def test_a_format_1_manifest_is_served_its_routes_learned_once_and_cached(
    workspace, start_supervisor
):
    """What the previous revision wrote (no `declared_routes`): its module's `_routes` runs
    once, into the pod's routes cache; a second server on the same folders reads it there,
    and the next write keeps the entry and writes format 2."""
    folder = admin_tenant(workspace, "acme")
    binary = wasmtime.wat2wasm((GUESTS / "routes.wat").read_text())
    digest = store.store_module(folder, binary)
    entry = {
        "sha256": digest,
        "size": len(binary),
        "route": "/r",
        "entrypoint": "_start",
        "argv": None,
        "volumes": {},
        "uploaded_at": "2026-12-01T00:00:00.000Z",
        "compile_s": 0.1,
        "previous": None,
    }
    document = {"format": 1, "modules": {"r": entry}, "deleted": {}}
    (folder / store.MANIFEST_FILE).write_text(json.dumps(document))

    first = await start_admin(start_supervisor)
    assert (await first.client.get("/acme/r/a")).text == "from alt_a\n"
    (cached,) = workspace.cache.glob(f"*/{digest}{CACHE_SUFFIX}")
    learned = (cached.stat().st_ino, cached.stat().st_mtime_ns)
    second = await start_admin(start_supervisor)
    assert (await second.client.get("/acme/r/a")).text == "from alt_a\n"
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == learned  # read, not rewritten

    response = await upload(second.client, "acme", "g", greeter("g"), route="/g")
    assert response.status_code == 201, response.text
    rewritten = json.loads((folder / store.MANIFEST_FILE).read_text())
    assert rewritten["format"] == 2
    assert rewritten["modules"]["r"] == entry
    assert rewritten["modules"]["g"]["declared_routes"] == []
    assert (await second.client.get("/acme/r/a")).text == "from alt_a\n"


# Item 10: a worker that cannot load what the pod committed converges, and says so meanwhile.


def _worker_serving(server, client_port: int) -> int:
    """The worker process holding the server side of the connection from `client_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rpartition(":")[2], 16) == server.port and (
            int(remote.rpartition(":")[2], 16) == client_port
        ):
            inode = fields[9]
    assert inode is not None, "no server socket for that connection"
    for pid in worker_pids(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds that connection")


async def test_a_worker_that_cannot_load_an_upload_answers_503_on_healthz_then_converges(
    workspace,
):
    """The fault is real: the worker can open no file (RLIMIT_NOFILE lowered under its open
    descriptors, as a descriptor leak or flood would), so its catch-up cannot read the
    manifest the other worker committed. Its kept-alive connection still answers."""
    admin_tenant(workspace, "acme")
    async with (
        serve_process(workspace, extra=TWO_WORKERS, env=ADMIN_ENV) as server,
        connection_per_worker(server.url, workers=2) as (uploader, faulty),
    ):
        first = await upload(uploader, "acme", "m", greeter("one"), route="/m")
        assert first.status_code == 201, first.text
        probe = await faulty.get("/acme/m")
        assert probe.text == "one\n"
        client_port = probe.extensions["network_stream"].get_extra_info("client_addr")[1]
        pid = _worker_serving(server, client_port)
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, limits[1]))  # 0-2 are open: no more
        try:
            second = await upload(uploader, "acme", "n", greeter("two"), route="/n")
            assert second.status_code == 201, second.text
            assert (await uploader.get("/acme/n")).text == "two\n"
            # The faulty worker serves the old state: it must say so, not pass as healthy.
            assert (await faulty.get("/acme/n")).status_code == 404
            health = await faulty.get("/healthz")
            assert health.status_code == 503
            assert "cannot load the manifest the pod committed for tenant 'acme'" in health.text
            assert "/" not in health.text.strip().rstrip(".")  # one line, no host path
            assert health.text.count("\n") == 1
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)

        async def converged() -> bool:
            return (await faulty.get("/acme/n")).status_code == 200

        await wait_until(converged)
        assert (await faulty.get("/acme/n")).text == "two\n"
        assert (await faulty.get("/healthz")).status_code == 200
