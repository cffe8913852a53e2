"""kill -9 during uploads, at random moments: after a restart every module is its old or its
new version, never a torn one, every upload that was answered 201 survived, and the server
serves them all.

Each round starts `wasm-supervisor serve` as a subprocess, sends several uploads at once (new
versions of the same modules, each compiling for a few milliseconds), and SIGKILLs the
server at a random moment while they run. The next round's start is the restart: the tenant
must load without error and serve exactly what the manifest says. The seed is in the test's
name, so a failure can be replayed.
"""

from __future__ import annotations

import hashlib
import random
import re

import httpx
import pytest
import trio
import wasmtime
from test_admin import API, OPERATOR, OPERATOR_TOKEN, admin_tenant, greeter, upload
from test_lifecycle import serve_process

from supervisor import store

ROUNDS = 8
MODULES = ("m0", "m1", "m2", "m3")
KILL_WINDOW_S = 0.08
"""The kill lands uniformly in this window after the uploads start: a round's uploads take
about as long, so kills fall before, inside and after the commits."""
SEED = 20_260_101
SERVE_ARGS = ["--metrics-listen", "127.0.0.1:0", "--workers", "1"]
"""One process: the kill -9 hits the very process that writes (workers would outlive it)."""
SERVE_ENV = {"SUPERVISOR_ADMIN_TOKEN": OPERATOR_TOKEN}


def sha_of(source: bytes) -> str:
    return hashlib.sha256(wasmtime.wat2wasm(source.decode())).hexdigest()


async def uploads_then_kill(server, sources: dict[str, bytes], delay_s: float) -> dict[str, str]:
    """Upload `sources` at once, SIGKILL the server after `delay_s`; the shas answered 201."""
    acknowledged: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def send(name: str, source: bytes) -> None:
            try:
                response = await upload(client, "acme", name, source, route=f"/{name}")
            except httpx.TransportError:
                return  # killed before it answered: the old or the new version may be stored
            assert response.status_code == 201, response.text
            acknowledged[name] = response.json()["sha256"]

        async with trio.open_nursery() as nursery:
            for name, source in sources.items():
                nursery.start_soon(send, name, source)
            await trio.sleep(delay_s)
            server.process.kill()
    await server.process.wait()
    return acknowledged


def check_store(workspace, before: dict[str, str], attempted: dict[str, str], acked: dict) -> dict:
    """The manifest on disk after a kill: whole, each module old or new, acknowledged kept."""
    tenant_dir = workspace.tenants / "acme"
    manifest = store.read_manifest(tenant_dir)  # a torn manifest raises here
    current = {name: record.current.sha256 for name, record in manifest.modules.items()}
    for name in MODULES:
        assert current.get(name) in {before.get(name), attempted[name]}, name
        if name in acked:
            assert current[name] == acked[name], f"{name} was answered 201 but is gone"
    for sha in manifest.referenced():
        data = store.module_path(tenant_dir, sha).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
    return current


async def check_served(server, current: dict[str, str], texts: dict[str, str]) -> None:
    """After the restart: no load error, and each module answers with its stored version."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        tenant = (await client.get(f"{API}/tenants/acme", headers=OPERATOR)).json()
        assert tenant["load_error"] is None
        for name, sha in current.items():
            assert (await client.get(f"/acme/{name}")).text == texts[sha]


@pytest.mark.parametrize("seed", [SEED])
async def test_kill_9_at_random_moments_of_uploads_leaves_old_or_new_never_torn(workspace, seed):
    admin_tenant(workspace, "acme")
    rng = random.Random(seed)
    texts: dict[str, str] = {}  # sha -> the body its guest answers
    current: dict[str, str] = {}  # name -> sha the manifest names
    for round_number in range(ROUNDS):
        sources = {
            name: greeter(f"round {round_number} {name}", functions=rng.randrange(5, 40))
            for name in MODULES
        }
        attempted = {name: sha_of(source) for name, source in sources.items()}
        for name, sha in attempted.items():
            texts[sha] = f"round {round_number} {name}\n"
        async with serve_process(workspace, extra=SERVE_ARGS, env=SERVE_ENV) as server:
            await check_served(server, current, texts)  # the restart after the last kill
            acked = await uploads_then_kill(server, sources, rng.uniform(0, KILL_WINDOW_S))
        current = check_store(workspace, current, attempted, acked)

    # The last restart: serves the survivors, takes uploads, and clears what the kills left.
    async with serve_process(workspace, extra=SERVE_ARGS, env=SERVE_ENV) as server:
        await check_served(server, current, texts)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            response = await upload(client, "acme", "m0", greeter("after"), route="/m0")
            assert response.status_code == 201
            assert (await client.get("/acme/m0")).text == "after\n"
    tenant_dir = workspace.tenants / "acme"
    manifest = store.read_manifest(tenant_dir)
    left = {path.name for path in (tenant_dir / store.MODULES_DIR).iterdir()}
    assert left == {f"{sha}.wasm" for sha in manifest.referenced()}
    assert not [path for path in tenant_dir.iterdir() if re.fullmatch(r"\..*\.tmp", path.name)]
