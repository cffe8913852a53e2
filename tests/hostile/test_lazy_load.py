"""Lazy loading (issue 11, section 4): a pod is ready before any module loads; a module loads on
its route's first request, once however many first requests arrive together, within the
request's deadline, and loaded modules stay within `--module-cache-bytes`.

A module that takes seconds to compile (a few thousand functions) stands for a huge one: it
must delay neither `/healthz` nor another tenant, and a request that cannot wait for it gets
503 with Retry-After while the load goes on.
"""

from __future__ import annotations

import trio
from test_admin import greeter

SLOW_FUNCTIONS = 3_000
"""Functions of the module that stands for a huge one: 2-4 s to compile here (tests/
test_admin_multipod.py), well over the deadlines below."""
SHORT_TIMEOUT_MS = 200
WAIT_S = 30.0
POLL_S = 0.02
FIRST_REQUESTS = 8


def add_greeter(workspace, tenant: str, text: str, *, functions: int = 0, policy: str = ""):
    folder = workspace.tenants / tenant
    folder.mkdir()
    (folder / "greeter.wat").write_bytes(greeter(text, functions=functions))
    (folder / "modules.toml").write_text('[[module]]\nroute = "/"\nmodule = "greeter.wat"\n')
    workspace.write_policy(tenant, policy)


async def wait_for(check, bound_s: float = WAIT_S) -> None:
    with trio.fail_after(bound_s):
        while not await check():
            await trio.sleep(POLL_S)


async def test_a_pod_is_ready_before_any_module_loads(workspace, start_supervisor):
    add_greeter(workspace, "huge", "huge", functions=SLOW_FUNCTIONS)
    add_greeter(workspace, "small", "small")
    running = await start_supervisor()
    registry = running.app.registry

    health = await running.client.get("/healthz")
    assert (health.status_code, health.text) == (200, "OK\n")
    # Nothing was compiled, loaded from an artifact, or mapped before the pod said ready.
    assert (registry.cache.misses, registry.cache.hits) == (0, 0)
    assert len(registry.loaded) == 0
    assert set(registry.state.tenants) == {"huge", "small"}
    # The other tenant's first request does not wait for the huge module either.
    with trio.fail_after(WAIT_S):
        small = await running.client.get("/small/")
    assert (small.status_code, small.text) == (200, "small\n")
    assert len(registry.loaded) == 1


async def test_concurrent_first_requests_load_the_module_once(workspace, start_supervisor):
    add_greeter(workspace, "t", "once", functions=300, policy="timeout_ms = 20000\n")
    running = await start_supervisor()
    responses = []

    async def get() -> None:
        responses.append(await running.client.get("/t/"))

    async with trio.open_nursery() as nursery:
        for _ in range(FIRST_REQUESTS):
            nursery.start_soon(get)
    assert [(r.status_code, r.text) for r in responses] == [(200, "once\n")] * FIRST_REQUESTS
    loaded = running.app.registry.loaded
    assert (loaded.loads, running.app.registry.cache.misses, len(loaded)) == (1, 1, 1)


async def test_a_load_slower_than_the_deadline_answers_503_with_retry_after(
    workspace, start_supervisor
):
    add_greeter(
        workspace,
        "huge",
        "huge at last",
        functions=SLOW_FUNCTIONS,
        policy=f"timeout_ms = {SHORT_TIMEOUT_MS}\n",
    )
    running = await start_supervisor()

    response = await running.client.get("/huge/")
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "still loading" in response.text

    # The load went on without the request: a later request is served.
    async def served() -> bool:
        later = await running.client.get("/huge/")
        return (later.status_code, later.text) == (200, "huge at last\n")

    await wait_for(served)
    assert running.app.registry.loaded.loads == 1


async def test_a_module_that_cannot_be_loaded_answers_503_with_retry_after(
    workspace, start_supervisor
):
    add_greeter(workspace, "t", "gone")
    running = await start_supervisor()
    (workspace.tenants / "t" / "greeter.wat").unlink()  # after the tenant was read

    response = await running.client.get("/t/")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "could not be loaded" in response.text
    assert running.app.registry.loaded.load_failures == 1


async def test_eviction_under_a_small_module_cache_keeps_serving(workspace, start_supervisor):
    for name in ("a", "b", "c"):
        add_greeter(workspace, name, f"from {name}")
    running = await start_supervisor(module_cache_bytes=1)  # room for one module at a time
    for name in ("a", "b", "c", "a"):
        response = await running.client.get(f"/{name}/")
        assert (response.status_code, response.text) == (200, f"from {name}\n")
    loaded = running.app.registry.loaded
    assert (len(loaded), loaded.loads, loaded.evictions) == (1, 4, 3)
    # Reloaded from the artifact cache on disk, not compiled again.
    assert running.app.registry.cache.misses == 3
