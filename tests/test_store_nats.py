"""Supervisors on one real nats-server (`--store nats://`): pods as caches of one store.

Each supervisor runs in this process with its own cache folder (its own local copies, its own
NATS connection and watch), as two pods would; only nats-server is shared. Nothing is mocked:
nats-server is Debian's, started and stopped by the tests (tests/nats_server.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys

import pytest
import trio
from conftest import REPO
from nats_server import free_port, run_nats
from tcp_relay import relay_to
from test_admin import OPERATOR, admin_tenant, greeter, module_url, start_admin, upload
from test_admin_multipod import served_within
from test_store_contract import version

from supervisor.artifacts import ArtifactKeys
from supervisor.modules import to_binary
from supervisor.store import ModuleRecord, ModuleVersion, read_manifest
from supervisor.store.file_store import FileStore
from supervisor.store.settings import StoreSettings

UPLOADS_AT_ONCE_PER_POD = 6
"""Below the admin API's 8 uploads in progress, so no upload is refused as busy."""
NATS_DOWN_S = 1.0
"""How long traffic runs while nats-server is stopped."""
COPY_TIMEOUT_S = 60.0
"""`store copy` of two small tenants takes about a second (most of it imports)."""
RETURN_S = 20.0
"""A restarted nats-server is reconnected to and resynced within this (0.5 s retries)."""


@pytest.fixture
def nats(tmp_path):
    with run_nats(tmp_path / "nats") as server:
        yield server


async def start_pod(start_supervisor, workspace, nats, name: str):
    return await start_admin(
        start_supervisor,
        cache_dir=workspace.root / f"cache-{name}",
        store=StoreSettings.parse(nats.url),
    )


async def test_an_upload_to_one_supervisor_is_served_by_the_other(
    workspace, start_supervisor, nats
):
    admin_tenant(workspace, "acme")
    pod_a = await start_pod(start_supervisor, workspace, nats, "a")
    pod_b = await start_pod(start_supervisor, workspace, nats, "b")
    response = await upload(pod_a.client, "acme", "m", greeter("one"), route="/m")
    assert response.status_code == 201
    await served_within(pod_b.client, "/acme/m", "one\n")
    await upload(pod_a.client, "acme", "m", greeter("two"))
    await served_within(pod_b.client, "/acme/m", "two\n")
    await pod_b.client.post(module_url("acme", "m") + "/rollback", headers=OPERATOR)
    await served_within(pod_a.client, "/acme/m", "one\n")
    await pod_a.client.delete(module_url("acme", "m"), headers=OPERATOR)
    await served_within(pod_b.client, "/acme/m", 404)
    shown = await pod_b.client.get(module_url("acme", "m"), headers=OPERATOR)
    assert shown.status_code == 404
    # Nothing was written to the tenants folder: the uploads live in NATS.
    assert not (workspace.tenants / "acme" / "manifest.json").exists()


async def test_an_upload_through_one_pod_loads_in_the_other_from_its_artifact_alone(
    workspace, start_supervisor, nats
):
    """With one artifact key, pod A compiles an upload and publishes its sealed artifact
    before its 201; pod B then loads the module from that artifact by digest: it compiles
    nothing, and never needs the module's bytes (a 20 MB runtime is neither read nor hashed),
    shown here by removing them from B's disk and from the store before B's first request."""
    admin_tenant(workspace, "acme")
    keys = ArtifactKeys.parse("pods:" + "k" * 40, source="test")
    pods = [
        await start_admin(
            start_supervisor,
            cache_dir=workspace.root / f"cache-{name}",
            store=StoreSettings.parse(nats.url),
            artifact_keys=keys,
        )
        for name in ("a", "b")
    ]
    source = greeter("from the artifact")
    assert (await upload(pods[0].client, "acme", "m", source, route="/m")).status_code == 201
    digest = hashlib.sha256(to_binary(source, name="m.wat")).hexdigest()
    store_b = pods[1].app.registry.uploads
    with trio.fail_after(10):  # B's watch fetches the bytes before it installs the manifest
        while not store_b.module_path("acme", digest, fetch=False).exists():
            await trio.sleep(0.01)
    await trio.to_thread.run_sync(_delete_object, nats.url, store_b.object_bucket, digest)
    store_b.module_path("acme", digest, fetch=False).unlink()
    await served_within(pods[1].client, "/acme/m", "from the artifact\n")
    cache_a, cache_b = (running.app.registry.cache for running in pods)
    assert (cache_a.compiled, cache_a.shared.published) == (1, 1)
    assert (cache_b.compiled, cache_b.shared.downloaded, cache_b.shared.refused) == (0, 1, 0)


def _delete_object(url: str, bucket: str, name: str) -> None:
    """Delete one object of an Object Store bucket, with a client of the test's own."""
    import nats as nats_client

    async def delete() -> None:
        client = await nats_client.connect(url)
        try:
            await (await client.jetstream().object_store(bucket)).delete(name)
        finally:
            await client.close()

    asyncio.run(delete())


async def test_50_concurrent_changes_split_between_two_supervisors_lose_none(
    workspace, start_supervisor, nats
):
    admin_tenant(workspace, "acme")
    pods = [await start_pod(start_supervisor, workspace, nats, name) for name in "ab"]
    limiters = [trio.CapacityLimiter(UPLOADS_AT_ONCE_PER_POD) for _ in pods]
    source = greeter("shared")  # one content: compiled once per pod, the race is the manifest
    statuses: list[int] = []

    async def send(index: int) -> None:
        async with limiters[index % 2]:
            response = await upload(
                pods[index % 2].client, "acme", f"m{index}", source, route=f"/m{index}"
            )
        statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(send, index)
    assert statuses == [201] * 50
    listed = await pods[0].client.get("/_admin/v1/tenants/acme/modules", headers=OPERATOR)
    assert sorted(module["name"] for module in listed.json()["modules"]) == sorted(
        f"m{index}" for index in range(50)
    )
    for pod in pods:
        await served_within(pod.client, "/acme/m49", "shared\n")


async def test_nats_going_away_fails_no_request_for_a_loaded_module(
    workspace, start_supervisor, nats
):
    """While nats-server is stopped: every request for a loaded module is served, /healthz
    stays 200, an admin write answers 503 with Retry-After. After it returns, propagation
    resumes (the watch is re-created on reconnect)."""
    admin_tenant(workspace, "acme")
    pod_a = await start_pod(start_supervisor, workspace, nats, "a")
    pod_b = await start_pod(start_supervisor, workspace, nats, "b")
    await upload(pod_a.client, "acme", "m", greeter("before"), route="/m")
    await served_within(pod_b.client, "/acme/m", "before\n")
    failures: list[str] = []
    served = 0

    async def traffic(pod, stop: trio.Event) -> None:
        nonlocal served
        while not stop.is_set():
            response = await pod.client.get("/acme/m")
            if response.status_code != 200 or response.text != "before\n":
                failures.append(f"{response.status_code} {response.text!r}")
            health = await pod.client.get("/healthz")
            if health.status_code != 200:
                failures.append(f"/healthz {health.status_code} {health.text!r}")
            served += 1

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for pod in (pod_a, pod_b):
            nursery.start_soon(traffic, pod, stop)
        await trio.to_thread.run_sync(nats.stop)
        refused = await upload(pod_a.client, "acme", "m", greeter("while down"))
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"].isdigit()
        assert "store" in refused.json()["error"]
        await trio.sleep(NATS_DOWN_S)  # traffic runs for this long with NATS away
        await trio.to_thread.run_sync(nats.start)
        stop.set()
    assert failures == [] and served > 0

    with trio.fail_after(RETURN_S):
        while (
            response := await upload(pod_a.client, "acme", "m", greeter("after"))
        ).status_code == 503:
            await trio.sleep(0.1)
    assert response.status_code == 201, response.text
    await served_within(pod_b.client, "/acme/m", "after\n")


async def test_changes_made_while_one_pod_was_cut_off_reach_it_when_it_reconnects(
    workspace, start_supervisor, nats
):
    """Pod B reaches NATS through a relay that is cut while pod A changes the tenant (an
    upload and a deletion): B keeps serving what it had, and when the relay is back B's
    watch is re-created and its replay reconciles both changes; a change after that arrives
    as usual."""
    admin_tenant(workspace, "acme")
    pod_a = await start_pod(start_supervisor, workspace, nats, "a")
    with relay_to(nats.port) as relay:
        pod_b = await start_admin(
            start_supervisor,
            cache_dir=workspace.root / "cache-b",
            store=StoreSettings.parse(f"nats://127.0.0.1:{relay.port}"),
        )
        store_b = pod_b.app.registry.uploads
        await upload(pod_a.client, "acme", "m", greeter("one"), route="/m")
        await upload(pod_a.client, "acme", "gone", greeter("gone"), route="/gone")
        await served_within(pod_b.client, "/acme/m", "one\n")
        await served_within(pod_b.client, "/acme/gone", "gone\n")

        await trio.to_thread.run_sync(relay.cut)
        with trio.fail_after(RETURN_S):
            while store_b.connection.connected:
                await trio.sleep(0.02)
        assert (await upload(pod_a.client, "acme", "m", greeter("two"))).status_code == 201
        deleted = await pod_a.client.delete(module_url("acme", "gone"), headers=OPERATOR)
        assert deleted.status_code == 200, deleted.text
        assert (await pod_b.client.get("/acme/m")).text == "one\n"  # served while cut off

        await trio.to_thread.run_sync(relay.restore)
        await served_within(pod_b.client, "/acme/m", "two\n")
        await served_within(pod_b.client, "/acme/gone", 404)
        await upload(pod_a.client, "acme", "m", greeter("three"))
        await served_within(pod_b.client, "/acme/m", "three\n")


async def test_a_supervisor_started_while_nats_is_down_is_unready_until_it_returns(
    workspace, start_supervisor, nats
):
    admin_tenant(workspace, "acme")
    pod_a = await start_pod(start_supervisor, workspace, nats, "a")
    await upload(pod_a.client, "acme", "m", greeter("stored"), route="/m")
    await trio.to_thread.run_sync(nats.stop)
    pod_b = await start_pod(start_supervisor, workspace, nats, "b")
    health = await pod_b.client.get("/healthz")
    assert health.status_code == 503 and "store" in health.text
    await trio.to_thread.run_sync(nats.start)
    with trio.fail_after(RETURN_S):
        while (await pod_b.client.get("/healthz")).status_code != 200:
            await trio.sleep(0.05)
    await served_within(pod_b.client, "/acme/m", "stored\n")


def test_store_copy_moves_every_tenants_uploads_both_ways(tmp_path, nats):
    """file: -> nats:// -> another file: gives back the same manifests (unknown keys
    included) and the same verified module bytes."""
    source = FileStore(tmp_path / "source")
    binaries = {tenant: greeter(f"{tenant} module") for tenant in ("acme", "globex")}
    for tenant, binary in binaries.items():
        digest = source.put_module(tenant, binary)
        record = ModuleRecord(
            ModuleVersion(
                sha256=digest,
                size=len(binary),
                route="/m",
                entrypoint="_start",
                argv=None,
                volumes={},
                uploaded_at="2026-01-01T00:00:00.000Z",
                compile_s=0.1,
                declared_routes=(),
                unknown={"outbound": ["example.com"]},
            )
        )
        source.update(tenant, lambda m, record=record: m.with_module("m", record))
    assert store_copy(f"file:{tmp_path / 'source'}", nats.url).returncode == 0
    assert store_copy(nats.url, f"file:{tmp_path / 'back'}").returncode == 0
    back = FileStore(tmp_path / "back")
    assert back.tenants() == ["acme", "globex"]
    for tenant, binary in binaries.items():
        assert back.read(tenant).manifest == source.read(tenant).manifest
        digest = back.read(tenant).manifest.modules["m"].current.sha256
        assert back.get_module(tenant, digest) == binary


def test_store_copy_names_a_store_it_cannot_reach(tmp_path):
    port = free_port()  # nothing listens there
    result = store_copy(f"file:{tmp_path}", f"nats://127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "unreachable" in result.stderr


def store_copy(source: str, target: str) -> subprocess.CompletedProcess[str]:
    """`wasm-supervisor store copy SOURCE TARGET`, as an operator runs it."""
    command = [sys.executable, "-m", "supervisor.cli", "store", "copy", source, target]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=COPY_TIMEOUT_S, cwd=REPO, check=False
    )


def test_a_token_in_store_credentials_is_how_the_store_signs_in(tmp_path):
    token = "store-token-for-the-tests"
    token_file = tmp_path / "nats-token"
    token_file.write_text(token + "\n")
    with run_nats(tmp_path / "nats", extra=("--auth", token)) as server:
        signed_in = StoreSettings.parse(server.url, credentials=token_file).open(tmp_path / "a")
        refused = StoreSettings.parse(server.url).open(tmp_path / "b")
        try:
            assert signed_in.wait_synced(RETURN_S)
            signed_in.put_module("acme", b"\0asm\1\0\0\0")
            assert signed_in.tenants() == []
            assert not refused.connection.wait_connected(1.0)
            assert "authorization" in refused.connection.last_error.lower()
        finally:
            signed_in.close()
            refused.close()


def test_a_new_pod_reads_every_manifest_and_fetches_no_module_until_one_loads(tmp_path, nats):
    """The start replays the manifests bucket and nothing else: each module's bytes are fetched
    when it loads, so a store of many tenants costs a new pod their manifests, not their
    modules."""
    writer = StoreSettings.parse(nats.url).open(tmp_path / "writer")
    binaries = {f"t{n}": bytes([0, 97, 115, 109, 1, 0, 0, 0, n]) for n in range(3)}
    try:
        assert writer.wait_synced(RETURN_S)
        for tenant, binary in binaries.items():
            writer.put_module(tenant, binary)
            writer.update(tenant, lambda m, b=binary: m.with_module("m", ModuleRecord(version(b))))
    finally:
        writer.close()
    pod = StoreSettings.parse(nats.url).open(tmp_path / "pod")
    try:
        assert pod.wait_synced(RETURN_S)
        fetched = tmp_path / "pod" / "store" / "modules"
        assert list(fetched.iterdir()) == []
        for tenant, binary in binaries.items():
            folder = pod.manifest_dir(tenant)  # the tenant's build asks for it
            manifest = read_manifest(folder)
            assert manifest.modules["m"].current.sha256 == hashlib.sha256(binary).hexdigest()
        assert (
            pod.module_path("t1", hashlib.sha256(binaries["t1"]).digest().hex()).read_bytes()
            == (binaries["t1"])
        )  # fetched when it loads
        assert [path.name for path in fetched.iterdir()] == [
            hashlib.sha256(binaries["t1"]).hexdigest() + ".wasm"
        ]
    finally:
        pod.close()
