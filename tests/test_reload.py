"""Policies, routes and modules change under a running server, without a restart.

The registry polls its folders every `watch_interval_s` (0.05 s in tests). A test changes a
file, then polls the HTTP answer until it shows the change, bounded by `trio.fail_after`: never
a fixed sleep. A change that must *not* apply is checked after the registry has reported the
broken file (so at least one reload has seen it).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest
import trio
from conftest import DEMO, Running, Workspace, printing_guest
from test_lifecycle import serve_process

from supervisor.modules import ArtifactCache
from supervisor.sandbox import Sandbox
from supervisor.tenants import RETRY_FIRST_S, TenantRegistry

CHANGE_TIMEOUT_S = 5.0
"""For a change on disk to be served: many polls of the registry, on a loaded machine too."""
POLL_S = 0.02

ECHO = {"/echo/...": "echo.wat"}


async def until(
    running: Running,
    path: str,
    accept: Callable[[httpx.Response], bool],
    *,
    body: bytes | None = None,
) -> httpx.Response:
    """GET (POST with `body`) `path` until `accept` says yes; fails after CHANGE_TIMEOUT_S."""
    response = None
    try:
        with trio.fail_after(CHANGE_TIMEOUT_S):
            while True:
                if body is None:
                    response = await running.client.get(path)
                else:
                    response = await running.client.post(path, content=body)
                if accept(response):
                    return response
                await trio.sleep(POLL_S)
    except trio.TooSlowError:
        last = response and (response.status_code, response.text[:300])
        errors = dict(running.app.registry.state.errors)
        pytest.fail(f"{path}: no accepted answer; last {last}; registry errors {errors}")


async def until_error(running: Running, key: str) -> str:
    """The registry's error for `key` (a file or tenant name), once a reload has reported it."""
    with trio.fail_after(CHANGE_TIMEOUT_S):
        while key not in running.app.registry.state.errors:
            await trio.sleep(POLL_S)
    return running.app.registry.state.errors[key]


def says(status: int, text: str) -> Callable[[httpx.Response], bool]:
    return lambda response: response.status_code == status and text in response.text


def greeting_wat(text: str) -> str:
    """A guest answering `text`: one module per text."""
    return printing_guest(f"content-type: text/plain\n\n{text}\n".encode())


# Policies -------------------------------------------------------------------------------------


async def test_policy_env_change_applies_without_restart(workspace, start_supervisor):
    workspace.add_tenant("demo", ECHO, policy='[env]\nGREETING = "one"\n')
    running = await start_supervisor()
    assert "GREETING=one\n" in (await running.client.get("/demo/echo/")).text

    workspace.write_policy("demo", '[env]\nGREETING = "two"\n')
    await until(running, "/demo/echo/", says(200, "GREETING=two\n"))


async def test_policy_limit_change_applies_without_restart(workspace, start_supervisor):
    workspace.add_tenant("demo", ECHO, policy="max_request_bytes = 10\n")
    running = await start_supervisor()
    body = b"x" * 100
    assert (await running.client.post("/demo/echo/", content=body)).status_code == 413

    workspace.write_policy("demo", 'max_request_bytes = "1KiB"\n')
    response = await until(running, "/demo/echo/", says(200, "\n---\n"), body=body)
    assert response.text.startswith("x" * 100 + "\n---\n")


BROKEN_POLICIES = {
    "unknown key": ('timeout_msx = 100\n[env]\nGREETING = "two"\n', "timeout_msx", "unknown key"),
    "bad TOML": ('[env]\nGREETING = "two\n', None, "invalid TOML"),
    "wrong type": (
        'timeout_ms = "soon"\n[env]\nGREETING = "two"\n',
        "timeout_ms",
        "must be an integer",
    ),
    "out of range": (
        'timeout_ms = 0\n[env]\nGREETING = "two"\n',
        "timeout_ms",
        "must be at least 1",
    ),
}


@pytest.mark.parametrize(("text", "key", "reason"), BROKEN_POLICIES.values(), ids=BROKEN_POLICIES)
async def test_broken_policy_keeps_the_last_good_one_until_fixed(
    workspace, start_supervisor, text, key, reason
):
    workspace.add_tenant("demo", ECHO, policy='[env]\nGREETING = "one"\n')
    running = await start_supervisor()

    workspace.write_policy("demo", text)
    message = await until_error(running, "demo.toml")
    assert str(workspace.policies / "demo.toml") in message
    if key:
        assert f": {key}: " in message
    assert reason in message
    response = await running.client.get("/demo/echo/")
    assert response.status_code == 200
    assert "GREETING=one\n" in response.text  # the last good policy is in force

    workspace.write_policy("demo", '[env]\nGREETING = "three"\n')
    await until(running, "/demo/echo/", says(200, "GREETING=three\n"))
    assert dict(running.app.registry.state.errors) == {}


async def test_defaults_change_applies_and_broken_defaults_keep_the_old(
    workspace, start_supervisor
):
    workspace.add_tenant("demo", ECHO)
    (workspace.policies / "_defaults.toml").write_text('[env]\nFROM_DEFAULTS = "a"\n')
    running = await start_supervisor()
    assert "FROM_DEFAULTS=a\n" in (await running.client.get("/demo/echo/")).text

    (workspace.policies / "_defaults.toml").write_text('[env]\nFROM_DEFAULTS = "b"\n')
    await until(running, "/demo/echo/", says(200, "FROM_DEFAULTS=b\n"))

    (workspace.policies / "_defaults.toml").write_text(
        'timeout_ms = -1\n[env]\nFROM_DEFAULTS = "c"\n'
    )
    message = await until_error(running, "_defaults.toml")
    assert "timeout_ms" in message
    assert "FROM_DEFAULTS=b\n" in (await running.client.get("/demo/echo/")).text


# Routes and modules ---------------------------------------------------------------------------


BROKEN_MODULES_TOML = {
    "bad TOML": ("[[module]\nroute = 1\n", None),
    "unknown key": ('[[module]]\nroute = "/hello"\nmodule = "hello.wat"\nroot = "x"\n', "root"),
    "missing module file": ('[[module]]\nroute = "/hello"\nmodule = "gone.wat"\n', "module"),
}


@pytest.mark.parametrize(("text", "key"), BROKEN_MODULES_TOML.values(), ids=BROKEN_MODULES_TOML)
async def test_broken_modules_toml_keeps_the_old_routes(workspace, start_supervisor, text, key):
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()

    (folder / "modules.toml").write_text(text)
    message = await until_error(running, "demo")
    assert str(folder / "modules.toml") in message
    if key:
        assert key in message
    response = await running.client.get("/demo/hello")
    assert (response.status_code, response.text) == (200, "hello from wasm\n")

    (folder / "modules.toml").write_text('[[module]]\nroute = "/howdy"\nmodule = "hello.wat"\n')
    await until(running, "/demo/howdy", says(200, "hello from wasm"))
    assert (await running.client.get("/demo/hello")).status_code == 404
    assert dict(running.app.registry.state.errors) == {}


async def test_invalid_module_keeps_the_old_one(workspace, start_supervisor):
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()
    # Loaded on its first request (no module is loaded before): what a broken file keeps.
    assert (await running.client.get("/demo/hello")).text == "hello from wasm\n"

    (folder / "hello.wat").write_text("(module (func $broken (")
    message = await until_error(running, "demo")
    assert "hello.wat" in message
    assert "invalid WebAssembly text" in message
    response = await running.client.get("/demo/hello")
    assert (response.status_code, response.text) == (200, "hello from wasm\n")


async def test_added_route_is_served_without_restart(workspace, start_supervisor):
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()
    assert (await running.client.get("/demo/echo/x")).status_code == 404

    (folder / "echo.wat").write_bytes((DEMO / "echo.wat").read_bytes())
    with (folder / "modules.toml").open("a") as modules:
        modules.write('\n[[module]]\nroute = "/echo/..."\nmodule = "echo.wat"\n')
    await until(running, "/demo/echo/x", says(200, "PATH_INFO=/x\n"))
    assert (await running.client.get("/demo/hello")).text == "hello from wasm\n"


@pytest.mark.parametrize("how", ["in place", "renamed over"])
async def test_replaced_module_file_is_served_without_restart(workspace, start_supervisor, how):
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()
    assert (await running.client.get("/demo/hello")).text == "hello from wasm\n"

    if how == "in place":
        (folder / "hello.wat").write_text(greeting_wat("hello again"))
    else:
        (folder / "new.tmp").write_text(greeting_wat("hello again"))
        os.replace(folder / "new.tmp", folder / "hello.wat")
    await until(running, "/demo/hello", says(200, "hello again\n"))


SAME_SIZE_EDITS = {
    "modules.toml": ("modules.toml", '"/hello"', '"/howdy"', "/demo/howdy", "hello from wasm\n"),
    "module file": ("hello.wat", "hello from wasm", "howdy from wasm", "/demo/hello", "howdy"),
}


@pytest.mark.parametrize(
    ("file", "old", "new", "path", "body"), SAME_SIZE_EDITS.values(), ids=SAME_SIZE_EDITS
)
async def test_an_in_place_edit_of_the_same_size_is_seen(
    workspace, start_supervisor, file, old, new, path, body
):
    """Same size, same inode: the poll sees the change by its modification time alone."""
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running = await start_supervisor()
    assert (await running.client.get("/demo/hello")).text == "hello from wasm\n"

    target = folder / file
    before = os.stat(target)
    with target.open("r+") as handle:  # rewritten in place: the same inode
        text = handle.read()
        handle.seek(0)
        handle.write(text.replace(old, new))
    after = os.stat(target)
    assert (after.st_size, after.st_ino) == (before.st_size, before.st_ino)
    await until(running, path, says(200, body))


async def test_a_renamed_policy_file_moves_the_tenant(workspace, start_supervisor):
    """A rename keeps the file's stat: the policy folder's key must hold the names too."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    workspace.add_tenant("other", {"/hello": "hello.wat"})
    (workspace.policies / "other.toml").unlink()
    running = await start_supervisor()
    assert (await running.client.get("/other/hello")).status_code == 404

    os.replace(workspace.policies / "demo.toml", workspace.policies / "other.toml")
    await until(running, "/other/hello", says(200, "hello from wasm"))
    assert (await running.client.get("/demo/hello")).status_code == 404


def test_a_poll_rebuilds_only_the_tenants_whose_inputs_changed(workspace: Workspace):
    """What keeps a poll of 1,000 unchanged tenants cheap: an unchanged tenant is kept as it
    is, and so is one whose policy file was rewritten with the same policy (the tenant is
    built from the policy's value, not from the file)."""
    for name in ("kept", "policy", "module"):
        workspace.add_tenant(name, {"/hello": "hello.wat"}, policy="timeout_ms = 500\n")
    with Sandbox() as sandbox:
        cache = ArtifactCache(workspace.cache, sandbox.engine, sandbox.settings)
        registry = TenantRegistry(workspace.tenants, workspace.policies, sandbox, cache)
        first = registry.reload().tenants
        again = registry.reload().tenants
        assert all(again[name] is first[name] for name in first)

        workspace.write_policy("policy", "# the same limits\ntimeout_ms = 500\n")
        (workspace.tenants / "module" / "hello.wat").write_text(greeting_wat("changed"))
        second = registry.reload().tenants
        assert second["kept"] is first["kept"]
        assert second["policy"] is first["policy"]
        assert second["module"] is not first["module"]

        workspace.write_policy("policy", "timeout_ms = 600\n")
        third = registry.reload().tenants
        assert third["policy"].policy.timeout_ms == 600
        assert third["kept"] is first["kept"]


# One tenant's trouble stays its own ---------------------------------------------------------


async def test_tenants_broken_at_startup_do_not_stop_the_others(workspace, start_supervisor):
    workspace.add_tenant("good", {"/hello": "hello.wat"})
    workspace.add_tenant("badpolicy", {"/hello": "hello.wat"}, policy="fuel = 1\n")
    folder = workspace.add_tenant("badmodule", {"/hello": "hello.wat"})
    (folder / "hello.wat").write_text("(module (func $broken (")
    folder = workspace.add_tenant("badroutes", {"/": "bad_routes.wat"})
    running = await start_supervisor()

    assert (await running.client.get("/good/hello")).text == "hello from wasm\n"
    # `_routes` of a modules.toml module run after the pod is ready, by the first poll.
    await until_error(running, "badroutes")
    for name in ("badpolicy", "badmodule", "badroutes"):
        assert (await running.client.get(f"/{name}/hello")).status_code == 404
    errors = running.app.registry.state.errors
    assert set(errors) == {"badpolicy.toml", "badmodule", "badroutes"}
    assert "fuel" in errors["badpolicy.toml"]
    assert "this-line-has-no-export" in errors["badroutes"]

    # A broken tenant, once fixed, is served; the good one never stopped.
    (workspace.tenants / "badmodule" / "hello.wat").write_bytes((DEMO / "hello.wat").read_bytes())
    await until(running, "/badmodule/hello", says(200, "hello from wasm"))


async def test_a_tenant_broken_at_runtime_does_not_stop_changes_to_another(
    workspace, start_supervisor
):
    workspace.add_tenant("broken", ECHO, policy='[env]\nGREETING = "b1"\n')
    workspace.add_tenant("other", ECHO, policy='[env]\nGREETING = "o1"\n')
    running = await start_supervisor()

    workspace.write_policy("broken", "max_queue = -5\n")
    (workspace.tenants / "broken" / "modules.toml").write_text("not toml at all")
    await until_error(running, "broken.toml")
    workspace.write_policy("other", '[env]\nGREETING = "o2"\n')
    await until(running, "/other/echo/", says(200, "GREETING=o2\n"))
    assert "GREETING=b1\n" in (await running.client.get("/broken/echo/")).text


async def test_tenant_whose_policy_is_deleted_stops_being_served(workspace, start_supervisor):
    """DESIGN.md: a tenant without a policy file is not served; deleting it is not an error."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    workspace.add_tenant("other", {"/hello": "hello.wat"})
    running = await start_supervisor()

    (workspace.policies / "demo.toml").unlink()
    await until(running, "/demo/hello", says(404, "no tenant"))
    assert "demo" not in running.app.registry.state.tenants
    assert dict(running.app.registry.state.errors) == {}
    assert (await running.client.get("/other/hello")).status_code == 200


# SIGHUP -----------------------------------------------------------------------------------------


async def test_sighup_reloads_a_change_the_file_poll_cannot_see(workspace):
    """The server polls files by size, mtime and inode (every second in `serve`). The change
    below keeps all three (same length, written in place, mtime put back), so only the forced
    reload of SIGHUP can apply it: without SIGHUP handling, this test times out."""
    folder = workspace.add_tenant("demo", {"/hello": "hello.wat"})
    modules = folder / "modules.toml"
    async with serve_process(workspace) as server, httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/demo/hello")).status_code == 200

        before = os.stat(modules)
        modules.write_text(modules.read_text().replace('"/hello"', '"/howdy"'))
        os.utime(modules, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(modules)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        )

        server.process.send_signal(signal.SIGHUP)
        with trio.fail_after(CHANGE_TIMEOUT_S):
            while (await http.get("/demo/howdy")).status_code != 200:
                await trio.sleep(POLL_S)
        assert (await http.get("/demo/hello")).status_code == 404
    assert "SIGHUP: reloading" in server.log()


def test_a_tenant_that_fails_to_rebuild_from_unchanged_files_is_retried_with_backoff(
    workspace: Workspace,
):
    """Each failed try validates the broken module again (a new retry): while nothing the
    tenant is built from changes, tries come after RETRY_FIRST_S, then twice that; the
    module fixed in place is served at the next try, with no change to modules.toml."""
    folder = workspace.add_tenant("t", {"/hello": "hello.wat"})
    invalid = '(module (memory (export "memory") 1) (func (export "_start") i32.const 1))'
    (folder / "bad.wat").write_text(invalid)  # parses, but a body does not validate
    with Sandbox() as sandbox:
        cache = ArtifactCache(workspace.cache, sandbox.engine, sandbox.settings)
        registry = TenantRegistry(workspace.tenants, workspace.policies, sandbox, cache)
        registry.reload()
        entries = (folder / "modules.toml").read_text()
        (folder / "next.toml").write_text(
            entries + '[[module]]\nroute = "/bad"\nmodule = "bad.wat"\n'
        )
        (folder / "next.toml").replace(folder / "modules.toml")
        failed_at = time.monotonic()
        registry.reload()
        assert "bad.wat" in registry.state.errors["t"]
        tries = registry._retries["t"]  # replaced by each failed try
        for _ in range(5):  # polls while the first delay runs: no new try
            registry.reload()
        assert registry._retries["t"] is tries

        def reload_until(check, bound_s: float) -> float:
            started = time.monotonic()
            while not check():
                assert time.monotonic() - started < bound_s, "no retry within the bound"
                time.sleep(0.02)  # a poll interval, as `watch` has
                registry.reload()
            return time.monotonic()

        retried_at = reload_until(lambda: registry._retries["t"] is not tries, 3 * RETRY_FIRST_S)
        assert retried_at - failed_at >= RETRY_FIRST_S
        assert registry.state.tenants["t"].routes.match("/bad") is None  # last good state
        (folder / "bad.wat").write_text(greeting_wat("fixed"))
        fixed_at = reload_until(
            lambda: registry.state.tenants["t"].routes.match("/bad") is not None,
            4 * RETRY_FIRST_S,
        )
        assert fixed_at - retried_at >= 2 * RETRY_FIRST_S * 0.9  # the delay doubled
        assert "t" not in registry.state.errors
