"""store.py on real files: the manifest round trip, its strict reading, durability helpers,
garbage collection and the cross-process lock."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest

from supervisor import store
from supervisor.errors import ConfigError


def version(text: str, route: str = "/m") -> store.ModuleVersion:
    return store.ModuleVersion(
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        size=len(text),
        route=route,
        entrypoint="_start",
        argv=None,
        volumes={"/data": "static"},
        uploaded_at=store.utc_now(),
        compile_s=0.5,
    )


def test_a_manifest_reads_back_as_written(tmp_path: Path):
    manifest = store.Manifest(
        {"a": store.ModuleRecord(version("two"), version("one"))},
        {"gone": store.ModuleRecord(version("old", "/old"))},
    )
    store.write_manifest(tmp_path, manifest)
    assert store.read_manifest(tmp_path) == manifest
    document = json.loads((tmp_path / store.MANIFEST_FILE).read_text())
    assert document["modules"]["a"]["previous"]["sha256"] == version("one").sha256
    assert [path.name for path in tmp_path.iterdir()] == [store.MANIFEST_FILE]  # no temp file


def test_no_manifest_is_an_empty_one(tmp_path: Path):
    assert store.read_manifest(tmp_path) == store.Manifest()


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d.update(format=3), "format"),
        (lambda d: d["modules"]["a"].update(size="big"), "modules.a.size"),
        (lambda d: d["modules"]["a"].pop("route"), "modules.a"),
        (lambda d: d["modules"]["a"].update(route="nope"), "modules.a.route"),
        (lambda d: d["modules"]["a"]["previous"].update(sha256="x"), "modules.a.previous.sha256"),
        (lambda d: d["modules"].update({"Bad": d["modules"]["a"]}), "modules.Bad"),
        (
            lambda d: d["modules"]["a"].update(declared_routes=[["/x"]]),
            "modules.a.declared_routes",
        ),
    ],
)
def test_a_hand_edited_manifest_is_refused_naming_the_key(tmp_path: Path, edit, key):
    store.write_manifest(
        tmp_path, store.Manifest({"a": store.ModuleRecord(version("2"), version("1"))})
    )
    path = tmp_path / store.MANIFEST_FILE
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as info:
        store.read_manifest(tmp_path)
    assert info.value.key == key and info.value.source == str(path)


def test_format_2_is_written_with_the_routes_each_version_declared(tmp_path: Path):
    declared = dataclasses.replace(version("2"), declared_routes=())
    routed = dataclasses.replace(version("3"), declared_routes=(("/a", "alt_a"),))
    manifest = store.Manifest({"a": store.ModuleRecord(routed, declared)})
    store.write_manifest(tmp_path, manifest)
    document = json.loads((tmp_path / store.MANIFEST_FILE).read_text())
    assert document["format"] == 2
    assert document["modules"]["a"]["declared_routes"] == [["/a", "alt_a"]]
    assert document["modules"]["a"]["previous"]["declared_routes"] == []
    assert store.read_manifest(tmp_path) == manifest


def test_a_format_1_manifest_loads_with_its_routes_unknown(tmp_path: Path):
    """What the previous revision wrote: no `declared_routes` anywhere."""
    written = version("1")
    entry = {**written.to_dict(), "previous": None}
    document = {"format": 1, "modules": {"a": entry}, "deleted": {}}
    (tmp_path / store.MANIFEST_FILE).write_text(json.dumps(document))
    manifest = store.read_manifest(tmp_path)
    assert manifest.modules["a"].current == written
    assert manifest.modules["a"].current.declared_routes is None


def test_keys_a_newer_revision_added_survive_a_rewrite(tmp_path: Path):
    """A rolling upgrade: a newer revision's keys (top level, and per version) are kept when
    this one rewrites the manifest, and stay with the version they came with."""
    store.write_manifest(
        tmp_path, store.Manifest({"a": store.ModuleRecord(version("2"), version("1"))})
    )
    path = tmp_path / store.MANIFEST_FILE
    document = json.loads(path.read_text())
    document["generation"] = {"by": "next"}
    document["modules"]["a"]["labels"] = ["api.example.com"]
    document["modules"]["a"]["previous"]["labels"] = []
    path.write_text(json.dumps(document))

    manifest = store.read_manifest(tmp_path)
    store.write_manifest(tmp_path, manifest.with_module("b", store.ModuleRecord(version("9"))))
    rewritten = json.loads(path.read_text())
    assert rewritten["generation"] == {"by": "next"}
    assert rewritten["modules"]["a"]["labels"] == ["api.example.com"]
    assert rewritten["modules"]["a"]["previous"]["labels"] == []
    assert "labels" not in rewritten["modules"]["b"]


def test_a_torn_manifest_is_refused(tmp_path: Path):
    store.write_manifest(tmp_path, store.Manifest({"a": store.ModuleRecord(version("1"))}))
    path = tmp_path / store.MANIFEST_FILE
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="invalid JSON"):
        store.read_manifest(tmp_path)


def test_module_files_are_named_by_their_content(tmp_path: Path):
    digest = store.store_module(tmp_path, b"\0asm module bytes")
    path = store.module_path(tmp_path, digest)
    assert path.read_bytes() == b"\0asm module bytes"
    assert digest == hashlib.sha256(b"\0asm module bytes").hexdigest()
    inode = path.stat().st_ino
    assert store.store_module(tmp_path, b"\0asm module bytes") == digest
    assert path.stat().st_ino == inode  # the same content is not written again


def test_garbage_is_what_no_version_names_and_what_a_crash_left(tmp_path: Path):
    kept = [store.store_module(tmp_path, text.encode()) for text in ("cur", "prev", "deleted")]
    orphan = store.store_module(tmp_path, b"orphan")
    modules = tmp_path / store.MODULES_DIR
    (modules / f".{orphan}.wasm.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".manifest.json.abc.tmp").write_bytes(b"{")
    (tmp_path / "modules.toml").write_text("")  # the operator's files are never touched
    (tmp_path / "hello.wasm").write_bytes(b"")

    def at(digest: str) -> store.ModuleVersion:
        return store.ModuleVersion(digest, 1, "/m", "_start", None, {}, store.utc_now(), 0.1)

    manifest = store.Manifest(
        {"m": store.ModuleRecord(at(kept[0]), at(kept[1]))},
        {"d": store.ModuleRecord(at(kept[2]))},
    )
    removed = store.collect_garbage(tmp_path, manifest)
    assert sorted(path.name for path in modules.iterdir()) == sorted(f"{d}.wasm" for d in kept)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "hello.wasm",
        store.MODULES_DIR,
        "modules.toml",
    ]
    assert len(removed) == 3


def test_deleted_modules_are_kept_up_to_a_bound_newest_first(tmp_path: Path):
    manifest = store.Manifest({name: store.ModuleRecord(version(name)) for name in "abcd"})
    for name in "abcd":
        manifest = manifest.without_module(name, keep_deleted=2)
    assert list(manifest.deleted) == ["c", "d"] and not manifest.modules
    restored = manifest.with_module("c", manifest.deleted["c"])
    assert list(restored.deleted) == ["d"] and list(restored.modules) == ["c"]


def test_the_manifest_lock_excludes_another_open_of_the_lock_file(tmp_path: Path):
    """flock locks belong to an open file: another process (or pod) opens its own."""
    lock_path = tmp_path / store.LOCK_FILE
    with store.manifest_lock(tmp_path):
        other = os.open(lock_path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    other = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving the block
    finally:
        os.close(other)
