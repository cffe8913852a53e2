"""A tenant against the compiled-artifact cache (issue 10, items 9 and 11).

Item 9: the cache only grew. Deleted modules kept their artifacts forever, and an artifact can
be 30 times its upload, so a tenant could fill the cache's disk with uploads. Item 11: an
artifact changed on disk under a running worker kills it (wasmtime maps the file), so the cache
is private to the server, and a worker that dies that way is restarted with a one-line reason.

Real servers over temp folders, real uploads through the admin API, real worker processes.
(Named `..._attacks` because `tests/test_artifact_cache.py` already takes the plain name: two
test files of one base name cannot both be collected.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import httpx
import trio
from conftest import Workspace
from test_admin import (
    OPERATOR,
    admin_tenant,
    error_of,
    greeter,
    module_url,
    start_admin,
    upload,
)
from test_lifecycle import serve_process
from test_workers import NO_KEEP_ALIVE, POLL_S, TWO_WORKERS, WAIT_S, worker_pids

from supervisor.modules import ARTIFACT_SUFFIX, ArtifactCache, to_binary
from supervisor.sandbox import Sandbox


def artifacts(workspace: Workspace) -> dict[str, int]:
    """sha256 -> bytes of each artifact in the cache (a pass may delete one meanwhile)."""
    return {
        path.stem: size
        for path in workspace.cache.rglob(f"*{ARTIFACT_SUFFIX}")
        if (size := _size(path)) is not None
    }


def cache_bytes(workspace: Workspace) -> int:
    """Everything in the engine folders: artifacts, records, temp files."""
    return sum(
        _size(path) or 0
        for folder in workspace.cache.iterdir()
        if folder.is_dir()
        for path in folder.iterdir()
    )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


async def wait_for(predicate) -> None:
    with trio.fail_after(WAIT_S):
        while not predicate():
            await trio.sleep(POLL_S)


async def test_a_deleted_modules_artifact_is_collected_and_a_served_ones_stays(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor, cache_min_age_s=0)
    gone = (await upload(running.client, "acme", "gone", greeter("gone"), route="/gone")).json()
    assert (await running.client.get("/acme/gone")).text == "gone\n"
    kept = (await upload(running.client, "acme", "kept", greeter("kept"), route="/kept")).json()
    # A module is loaded on its first request, and held (never collected) while loaded: with
    # no minimum age, an uploaded module nobody requested yet could be collected at once.
    assert (await running.client.get("/acme/kept")).text == "kept\n"
    assert set(artifacts(workspace)) == {gone["sha256"], kept["sha256"]}

    deleted = await running.client.delete(module_url("acme", "gone"), headers=OPERATOR)
    assert deleted.status_code == 200
    await wait_for(lambda: gone["sha256"] not in artifacts(workspace))
    assert set(artifacts(workspace)) == {kept["sha256"]}
    assert running.app.registry.cache.collected == 1  # wasm_supervisor_artifact_cache_collected
    assert (await running.client.get("/acme/kept")).text == "kept\n"

    # The module itself is kept for a rollback: it compiles again and serves.
    back = await running.client.post(module_url("acme", "gone") + "/rollback", headers=OPERATOR)
    assert back.status_code == 200
    assert (await running.client.get("/acme/gone")).text == "gone\n"
    assert set(artifacts(workspace)) == {gone["sha256"], kept["sha256"]}


async def test_upload_after_upload_never_grows_the_cache_past_its_bound(
    workspace, start_supervisor
):
    """New versions, each a new artifact: the replaced ones are evicted at once, oldest first,
    though they are younger than the minimum age (the default, 10 minutes)."""
    admin_tenant(workspace, "acme")
    with Sandbox() as sandbox:  # the size of one version's artifact (~570 KiB), as it is here
        probe = ArtifactCache(workspace.root / "probe", sandbox.engine, sandbox.settings)
        binary = to_binary(greeter("version 0", functions=400), name="probe.wat")
        one_artifact = probe.artifact_bytes(probe.load(binary, name="probe").sha256)
    bound = 3 * one_artifact + 3 * 1024  # three artifacts and their records
    running = await start_admin(start_supervisor, cache_max_bytes=bound)
    versions = []
    for n in range(6):
        source = greeter(f"version {n}", functions=400)
        response = await upload(running.client, "acme", "m", source, route="/m")
        assert response.status_code == 201, response.text
        versions.append(response.json()["sha256"])
        assert cache_bytes(workspace) <= bound
    assert (await running.client.get("/acme/m")).text == "version 5\n"
    assert versions[-1] in artifacts(workspace)
    assert versions[0] not in artifacts(workspace)
    assert running.app.registry.cache.collected >= 3


async def test_a_tenant_over_max_artifact_bytes_is_refused_422_naming_the_limit(
    workspace, start_supervisor
):
    """Artifacts in use cannot be evicted: the tenant's bound refuses the module that would
    take it past `max_artifact_bytes`, and what it served goes on being served."""
    admin_tenant(workspace, "acme", policy='max_artifact_bytes = "1MiB"\n')
    running = await start_admin(start_supervisor)
    first = await upload(running.client, "acme", "a", greeter("a", functions=400), route="/a")
    assert first.status_code == 201, first.text
    second = await upload(running.client, "acme", "b", greeter("b", functions=400), route="/b")
    assert second.status_code == 422
    message = error_of(second)
    assert "max_artifact_bytes (1048576)" in message
    assert "compiled artifacts would take" in message
    assert str(workspace.tenants) not in message
    assert (await running.client.get("/acme/a")).text == "a\n"
    assert (await running.client.get("/acme/b")).status_code == 404


async def test_a_worker_killed_by_sigbus_is_restarted_and_the_log_says_why(
    workspace: Workspace,
) -> None:
    """What a worker whose mapped artifact was truncated dies of (sent here with kill)."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        # The pod answers from its first ready worker: the victim must have started (its
        # faulthandler on), as a serving worker has.
        await wait_for(lambda: server.log().count(" ready (pid ") >= 2)
        victim = min(worker_pids(server))
        os.kill(victim, signal.SIGBUS)
        with trio.fail_after(WAIT_S):
            while len(pids := worker_pids(server)) < 2 or victim in pids:
                await trio.sleep(POLL_S)
        await wait_for(lambda: server.log().count(" ready (pid ") >= 3)
        statuses = {(await http.get("/demo/hello")).status_code for _ in range(8)}
    died = [line for line in server.log().splitlines() if f"(pid {victim}) died" in line]
    assert len(died) == 1
    assert "signal SIGBUS: likely a compiled artifact changed or truncated on disk" in died[0]
    assert "the artifact cache must be writable by the server alone" in died[0]
    assert "Fatal Python error: Bus error" in server.log()  # faulthandler's stacks, too
    assert statuses == {200}


async def test_an_artifact_truncated_under_running_workers_is_a_sigbus_that_the_log_explains(
    workspace: Workspace,
) -> None:
    """The crash itself, for real: whoever can write the cache can do this, hence 0700."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        assert (await http.get("/demo/hello")).status_code == 200
        (artifact,) = workspace.cache.rglob(f"*{ARTIFACT_SUFFIX}")
        os.truncate(artifact, 0)
        with trio.fail_after(WAIT_S):
            while "died (signal SIGBUS" not in server.log():
                with contextlib.suppress(httpx.TransportError):  # the one the crash cut off
                    await http.get("/demo/hello")
        await wait_for(lambda: server.log().count(" ready (pid ") >= 3)

        # The replacement finds the artifact unlike its record: rebuilt, never mapped. The
        # rebuild is a compile at nice 19, which a busy machine can delay past a request's
        # deadline (503 with Retry-After, the load going on; each worker loads its own): once
        # both are done, everything is served.
        async def statuses() -> set[int]:
            return {(await http.get("/demo/hello")).status_code for _ in range(8)}

        with trio.fail_after(WAIT_S):
            while (seen := await statuses()) != {200}:
                assert seen <= {200, 503}, seen
                await trio.sleep(POLL_S)
    assert (
        "signal SIGBUS: likely a compiled artifact changed or truncated on disk while the"
        " worker had it mapped; the artifact cache must be writable by the server alone"
    ) in server.log()


async def test_the_servers_cache_folder_is_private_and_an_open_one_is_made_private(
    workspace: Workspace,
) -> None:
    """An emptyDir mount is 0777: the folder the server keeps its artifacts in is its own."""
    workspace.cache.chmod(0o777)
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    for run in ("creates it", "finds it open"):
        async with (
            serve_process(workspace) as server,
            httpx.AsyncClient(base_url=server.url) as http,
        ):
            assert (await http.get("/demo/hello")).status_code == 200
        (engine_folder,) = [path for path in workspace.cache.iterdir() if path.is_dir()]
        assert _mode(engine_folder) == 0o700, run
        assert all(_mode(artifact) == 0o600 for artifact in engine_folder.iterdir())
        engine_folder.chmod(0o777)  # an operator's chmod, or a folder someone else made
    assert "was open to other users (mode 777); made private (0700)" in server.log()
    # ... and its artifacts are still used: the second run loads, never compiles.
    second_run = server.log()
    assert "hello.wat loaded in" in second_run and "(from its artifact" in second_run
    assert "(compiled" not in second_run


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
