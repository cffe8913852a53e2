"""The store of uploads' contract, run against both stores: `file:` and a real nats-server.

Manifests per tenant with a revision and compare-and-set updates that never lose one;
content-addressed module bytes verified on read; the tenant list; garbage collection with a
minimum age; and (NATS) the watch that brings another process's change to this one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from nats_server import run_nats

from supervisor.errors import ConfigError, Conflict
from supervisor.store import Manifest, ModuleRecord, ModuleVersion, read_manifest
from supervisor.store.settings import StoreSettings
from supervisor.store.uploads import UploadStore

CONNECT_S = 20.0


def version(binary: bytes, route: str = "/x") -> ModuleVersion:
    return ModuleVersion(
        sha256=hashlib.sha256(binary).hexdigest(),
        size=len(binary),
        route=route,
        entrypoint="_start",
        argv=None,
        volumes={},
        uploaded_at="2026-01-01T00:00:00.000Z",
        compile_s=0.0,
        declared_routes=(),
    )


class Stores:
    """Opens stores of one kind on one backing (a folder, or one nats-server)."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.opened: list[UploadStore] = []

    def open(self) -> UploadStore:
        cache = self.tmp_path / f"cache{len(self.opened)}"
        cache.mkdir()
        store = StoreSettings.parse(self.url).open(cache)
        if hasattr(store, "wait_synced"):
            assert store.wait_synced(CONNECT_S), "the NATS store never synced"
        self.opened.append(store)
        return store


@pytest.fixture(params=["file", "nats"])
def stores(request, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "file":
        opened = Stores(f"file:{tmp_path / 'uploads'}", tmp_path)
        yield opened
    else:
        with run_nats(tmp_path / "nats") as server:
            opened = Stores(server.url, tmp_path)
            yield opened
            for store in opened.opened:
                store.close()


def test_an_unknown_tenant_has_an_empty_manifest_at_revision_0(stores):
    store = stores.open()
    stored = store.read("acme")
    assert stored.manifest == Manifest() and stored.revision == 0
    assert store.tenants() == []


def test_update_stores_the_manifest_and_moves_the_revision(stores):
    store = stores.open()
    binary = b"\0asm\1\0\0\0"
    record = ModuleRecord(version(binary))
    manifest, changed = store.update("acme", lambda m: m.with_module("a", record))
    assert changed and manifest.modules["a"] == record
    first = store.read("acme")
    assert first.manifest.modules["a"] == record and first.revision > 0
    again, changed = store.update("acme", lambda m: None)
    assert not changed and again.modules["a"] == record
    store.update("acme", lambda m: m.without_module("a", keep_deleted=4))
    second = store.read("acme")
    assert second.revision > first.revision and "a" in second.manifest.deleted
    assert store.tenants() == ["acme"]


def test_keys_of_another_revision_are_kept_through_updates(stores):
    store = stores.open()
    newer = Manifest(unknown={"outbound": {"allow": ["example.com"]}})
    store.write("acme", newer)
    record = ModuleRecord(version(b"x"))
    store.update("acme", lambda m: m.with_module("a", record))
    assert store.read("acme").manifest.unknown == {"outbound": {"allow": ["example.com"]}}


def test_a_change_that_raises_writes_nothing(stores):
    store = stores.open()
    store.update("acme", lambda m: m.with_module("a", ModuleRecord(version(b"a"))))
    before = store.read("acme")

    def refuse(manifest: Manifest) -> Manifest:
        raise Conflict("module 'a' already exists")

    with pytest.raises(Conflict, match="already exists"):
        store.update("acme", refuse)
    assert store.read("acme") == before


def test_concurrent_updates_from_two_stores_lose_none(stores):
    """50 writers, split between two stores (two pods), each add their own module."""
    first, second = stores.open(), stores.open()

    def add(index: int) -> None:
        store = first if index % 2 else second
        record = ModuleRecord(version(f"module {index}".encode()))
        store.update("acme", lambda m: m.with_module(f"m{index}", record))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(add, range(50)))
    names = set(first.read("acme").manifest.modules)
    assert names == {f"m{index}" for index in range(50)}


def test_module_bytes_are_content_addressed_and_verified(stores):
    store = stores.open()
    binary = b"\0asm\1\0\0\0" + bytes(range(256)) * 5000  # > 1 MiB: several chunks
    digest = store.put_module("acme", binary)
    assert digest == hashlib.sha256(binary).hexdigest()
    assert store.has_module("acme", digest)
    assert store.get_module("acme", digest) == binary
    assert store.put_module("acme", binary) == digest  # again: nothing new
    assert store.module_path("acme", digest).read_bytes() == binary
    missing = "0" * 64
    assert not store.has_module("acme", missing)
    with pytest.raises(KeyError):
        store.get_module("acme", missing)


def test_a_module_whose_bytes_do_not_match_their_digest_is_refused(stores):
    store = stores.open()
    digest = hashlib.sha256(b"the real bytes").hexdigest()
    if stores.url.startswith("file:"):
        path = store.module_path("acme", digest)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"other bytes")
        with pytest.raises(ConfigError, match="does not hold its sha256"):
            store.get_module("acme", digest)
    else:  # an object stored under a name that is not its digest (a hostile writer)
        store.connection.call(lambda: store._objects.put(digest, b"other bytes"))
        with pytest.raises(KeyError):
            store.get_module("acme", digest)


def test_garbage_collection_spares_named_and_young_module_bytes(stores):
    store = stores.open()
    named, orphan = b"named module", b"orphan module"
    named_sha = store.put_module("acme", named)
    orphan_sha = store.put_module("acme", orphan)
    record = ModuleRecord(version(named))
    store.update("acme", lambda m: m.with_module("a", record))
    if stores.url.startswith("file:"):
        # The file store collects an update's own leftovers at once: put it back.
        orphan_sha = store.put_module("acme", orphan)
    assert store.collect_garbage(min_age_s=3600) == []  # young: an upload may name it soon
    assert store.has_module("acme", orphan_sha)
    time.sleep(0.01)  # the sweep below takes "older than 1 ms": let 1 ms pass
    removed = store.collect_garbage(min_age_s=0.001)
    assert len(removed) == 1 and orphan_sha in removed[0]
    assert not store.has_module("acme", orphan_sha)
    assert store.has_module("acme", named_sha)


def test_another_stores_change_reaches_this_one(stores):
    """NATS: the watch writes the manifest here and says so; a file store shares the folder."""
    writer, reader = stores.open(), stores.open()
    changed = threading.Event()
    reader.on_change(changed.set)
    binary = b"\0asm\1\0\0\0watched"
    writer.put_module("acme", binary)
    record = ModuleRecord(version(binary))
    writer.update("acme", lambda m: m.with_module("a", record))
    if not stores.url.startswith("file:"):
        assert changed.wait(10), "the watch never reported the change"
    assert read_manifest(reader.manifest_dir("acme")).modules["a"] == record
    local = reader.module_path("acme", record.current.sha256, fetch=False)
    assert local.read_bytes() == binary  # fetched before the manifest was installed


async def test_a_file_store_apart_from_the_tenants_folder_holds_the_uploads(
    workspace, start_supervisor
):
    """`--store file:PATH` elsewhere than `--tenants`: uploads land there, the operator's
    folder is untouched, and a second server on the same store serves them."""
    from test_admin import admin_tenant, greeter, start_admin, upload

    admin_tenant(workspace, "acme")
    settings = StoreSettings.parse(f"file:{workspace.root / 'uploads'}")
    running = await start_admin(start_supervisor, store=settings)
    response = await upload(running.client, "acme", "m", greeter("apart"), route="/m")
    assert response.status_code == 201, response.text
    assert (await running.client.get("/acme/m")).text == "apart\n"
    manifest = read_manifest(workspace.root / "uploads" / "acme")
    assert list(manifest.modules) == ["m"]
    assert sorted(path.name for path in (workspace.tenants / "acme").iterdir()) == ["modules.toml"]
    other = await start_admin(
        start_supervisor, store=settings, cache_dir=workspace.root / "cache-other"
    )
    assert (await other.client.get("/acme/m")).text == "apart\n"
