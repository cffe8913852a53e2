"""The compiled-artifact cache: compile once, load after, and never trust a bad artifact.

Most tests drive `ArtifactCache` directly with the real engine of a `Sandbox`, then run what it
returned. A corrupted artifact loads into wasmtime without an error (FACTS.md), so the telling
corruption flips one byte of the demo's greeting inside the artifact: "hello" becomes "jello".
A guest that answers "hello from wasm" after that was rebuilt from its source; one that
answers "jello" ran the corrupt artifact.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import wasmtime
from conftest import DEMO, Workspace
from test_lifecycle import serve_process

from supervisor.compiler import CodeSettings
from supervisor.modules import (
    ARTIFACT_SUFFIX,
    DEFAULT_MIN_AGE_S,
    RECORD_SUFFIX,
    STALE_TEMP_S,
    ArtifactCache,
    CompiledModule,
)
from supervisor.sandbox import GuestLimits, Sandbox

HELLO = wasmtime.wat2wasm((DEMO / "hello.wat").read_text())
HELLO_SHA = hashlib.sha256(HELLO).hexdigest()
GREETING = b"hello from wasm"
LIMITS = GuestLimits(fuel=10_000_000, memory_bytes=1 << 24, timeout_ms=1000, max_stdout_bytes=4096)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def new_cache(folder: Path, sandbox: Sandbox) -> ArtifactCache:
    return ArtifactCache(folder, sandbox.engine, sandbox.settings)


def answer(sandbox: Sandbox, compiled: CompiledModule) -> bytes:
    """The body the module answers with (it must run cleanly)."""
    run = sandbox.run(
        sandbox.prepare(compiled.module), "_start", argv=[], env={}, stdin=b"", limits=LIMITS
    )
    assert run.error is None, run.error
    return run.stdout.partition(b"\n\n")[2]


def artifact_of(cache: ArtifactCache, sha256: str = HELLO_SHA) -> tuple[Path, Path]:
    return (
        cache.directory / f"{sha256}{ARTIFACT_SUFFIX}",
        cache.directory / f"{sha256}{RECORD_SUFFIX}",
    )


def assert_artifact_matches_record(cache: ArtifactCache) -> None:
    artifact, record = artifact_of(cache)
    data = artifact.read_bytes()
    assert json.loads(record.read_bytes()) == {
        "size": len(data),
        "crc32": zlib.crc32(data),
    }


def test_compiled_once_then_loaded_from_its_artifact(tmp_path, sandbox):
    cache = new_cache(tmp_path, sandbox)
    first = cache.load(HELLO, name="hello.wat")
    assert (first.cache_hit, cache.misses, cache.hits) == (False, 1, 0)
    assert sorted(path.name for path in cache.directory.iterdir()) == [
        f"{HELLO_SHA}{ARTIFACT_SUFFIX}",
        f"{HELLO_SHA}{RECORD_SUFFIX}",
    ]
    assert_artifact_matches_record(cache)

    second = cache.load(HELLO, name="hello.wat")
    assert (second.cache_hit, cache.misses, cache.hits, cache.rebuilt) == (True, 1, 1, 0)
    assert second.sha256 == first.sha256 == HELLO_SHA
    assert answer(sandbox, first) == answer(sandbox, second) == GREETING + b"\n"


def test_a_restarted_process_loads_the_artifact(tmp_path, sandbox):
    """A new engine and a new cache object on the same folder: what a restart sees."""
    new_cache(tmp_path, sandbox).load(HELLO, name="hello.wat")
    with Sandbox() as restarted:
        cache = new_cache(tmp_path, restarted)
        loaded = cache.load(HELLO, name="hello.wat")
        assert (loaded.cache_hit, cache.hits, cache.misses, cache.rebuilt) == (True, 1, 0, 0)
        assert answer(restarted, loaded) == GREETING + b"\n"


def test_an_engine_built_otherwise_never_loads_the_artifact(tmp_path, sandbox):
    new_cache(tmp_path, sandbox).load(HELLO, name="hello.wat")
    code = CodeSettings(consume_fuel=False, epoch_interruption=False)
    other = wasmtime.Engine(code.config())  # no fuel, no epochs
    cache = ArtifactCache(tmp_path, other, "no-fuel,no-epochs", code)
    assert not cache.load(HELLO, name="hello.wat").cache_hit
    assert (cache.hits, cache.misses) == (0, 1)


def _flip_greeting(artifact: Path) -> None:
    data = bytearray(artifact.read_bytes())
    at = data.index(GREETING)
    data[at] ^= ord("h") ^ ord("j")  # one byte: "hello" -> "jello"
    artifact.write_bytes(data)


def _flip_last_byte(artifact: Path) -> None:
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(data)


ARTIFACT_DAMAGE: dict[str, Callable[[Path], object]] = {
    "one byte of the data flipped": _flip_greeting,
    "last byte flipped": _flip_last_byte,
    "truncated to half": lambda path: os.truncate(path, path.stat().st_size // 2),
    "truncated to nothing": lambda path: os.truncate(path, 0),
    "a byte appended": lambda path: path.write_bytes(path.read_bytes() + b"\0"),
    "deleted": lambda path: path.unlink(),
}


@pytest.mark.parametrize("damage", ARTIFACT_DAMAGE.values(), ids=ARTIFACT_DAMAGE)
def test_a_damaged_artifact_is_rebuilt_never_loaded(tmp_path, sandbox, damage):
    first = new_cache(tmp_path, sandbox)
    first.load(HELLO, name="hello.wat")
    artifact, _ = artifact_of(first)
    damage(artifact)

    cache = new_cache(tmp_path, sandbox)
    loaded = cache.load(HELLO, name="hello.wat")
    assert (loaded.cache_hit, cache.rebuilt, cache.misses, cache.hits) == (False, 1, 1, 0)
    assert answer(sandbox, loaded) == GREETING + b"\n"  # not "jello": the artifact never ran

    assert_artifact_matches_record(cache)  # repaired on disk...
    again = new_cache(tmp_path, sandbox)
    assert again.load(HELLO, name="hello.wat").cache_hit  # ...and trusted again
    assert again.rebuilt == 0


RECORD_DAMAGE: dict[str, tuple[bytes | None, int]] = {
    # A missing record is an artifact whose write never finished: a plain miss, not a rebuild.
    "missing": (None, 0),
    "garbage": (b"\x00\xffnot json", 1),
    "empty": (b"", 1),
    "not an object": (b"[1, 2]", 1),
    "wrong types": (b'{"size": "big", "crc32": "x"}', 1),
    "a checksum that lies": (json.dumps({"size": 0, "crc32": 12345}).encode(), 1),
    "an older record format": (json.dumps({"size": 0, "sha256": "0" * 64}).encode(), 1),
}


@pytest.mark.parametrize(("record_bytes", "rebuilt"), RECORD_DAMAGE.values(), ids=RECORD_DAMAGE)
def test_a_missing_or_bad_record_means_the_artifact_is_not_trusted(
    tmp_path, sandbox, record_bytes, rebuilt
):
    first = new_cache(tmp_path, sandbox)
    first.load(HELLO, name="hello.wat")
    artifact, record = artifact_of(first)
    _flip_greeting(artifact)  # what would run if the artifact were trusted without its record
    if record_bytes is None:
        record.unlink()
    else:
        size = artifact.stat().st_size
        record.write_bytes(record_bytes.replace(b'"size": 0', b'"size": %d' % size))

    cache = new_cache(tmp_path, sandbox)
    loaded = cache.load(HELLO, name="hello.wat")
    assert (loaded.cache_hit, cache.misses, cache.rebuilt) == (False, 1, rebuilt)
    assert answer(sandbox, loaded) == GREETING + b"\n"
    assert_artifact_matches_record(cache)


# Through the server ---------------------------------------------------------------------------


async def test_a_restarted_server_loads_artifacts_and_rebuilds_a_corrupt_one(
    workspace, start_supervisor
):
    workspace.add_tenant("demo", {"/hello": "hello.wat", "/echo/...": "echo.wat"})
    first = await start_supervisor()  # modules load on their first request
    assert (await first.client.get("/demo/hello")).text == "hello from wasm\n"
    assert (await first.client.get("/demo/echo/")).status_code == 200
    assert (first.app.registry.cache.misses, first.app.registry.cache.hits) == (2, 0)

    second = await start_supervisor()  # a new engine and registry on the same folders
    assert (await second.client.get("/demo/hello")).text == "hello from wasm\n"
    assert (await second.client.get("/demo/echo/")).status_code == 200
    assert (second.app.registry.cache.misses, second.app.registry.cache.hits) == (0, 2)

    hello_sha = second.app.registry.state.tenants["demo"].modules["hello.wat"].sha256
    _flip_greeting(artifact_of(second.app.registry.cache, hello_sha)[0])
    third = await start_supervisor()
    cache = third.app.registry.cache
    assert (await third.client.get("/demo/hello")).text == "hello from wasm\n"
    assert (await third.client.get("/demo/echo/")).status_code == 200
    assert (cache.rebuilt, cache.misses, cache.hits) == (1, 1, 1)


CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
PR_CAPBSET_DROP = 24


def _without_root_file_powers() -> None:
    """In the child, before exec: drop what lets root write through file permissions.

    Root ignores chmod because of CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH); once they are
    out of the bounding set, the exec'd server has neither, so a 0o500 folder is read-only to
    it, as it would be to any other user. Other users cannot run this interpreter here.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def read_only_cache(workspace: Workspace) -> Callable[[], None] | None:
    """chmod 0o500 every cache folder; what the server's process must run with to feel it."""
    for folder in [workspace.cache, *workspace.cache.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o500)
    if os.geteuid() != 0:
        return None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(workspace.cache / 'probe')!r}, 'w')"],
            preexec_fn=_without_root_file_powers,
            capture_output=True,
        )
    except subprocess.SubprocessError:  # prctl refused (no CAP_SETPCAP)
        probe = None
    if probe is None or probe.returncode == 0:
        pytest.skip("running as root, and root's chmod override could not be dropped")
    return _without_root_file_powers


async def test_a_read_only_cache_folder_still_serves(workspace):
    """Artifacts already there are used; new modules compile but cannot be stored."""
    workspace.add_tenant("demo", {"/hello": "hello.wat", "/echo/...": "echo.wat"})
    with Sandbox() as sandbox:
        new_cache(workspace.cache, sandbox).load(HELLO, name="hello.wat")
    restricted = read_only_cache(workspace)

    async with (
        serve_process(workspace, preexec_fn=restricted) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/demo/hello")).text == "hello from wasm\n"
        assert (await http.get("/demo/echo/")).status_code == 200
    log = server.log()
    assert "hello.wat loaded in" in log and "(from its artifact" in log
    assert "echo.wat loaded in" in log and "(compiled" in log
    assert "could not store artifact" in log
    assert len(list(workspace.cache.rglob(f"*{ARTIFACT_SUFFIX}"))) == 1


async def test_an_empty_read_only_cache_folder_still_serves(workspace):
    """Nothing can be created under the cache (not even the engine's folder): serve anyway."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    restricted = read_only_cache(workspace)

    async with (
        serve_process(workspace, preexec_fn=restricted) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        assert (await http.get("/demo/hello")).text == "hello from wasm\n"
    assert list(workspace.cache.iterdir()) == []
    assert "unusable" in server.log()


def test_an_artifact_is_found_by_its_digest_alone_and_still_verified(tmp_path, sandbox):
    compiled = new_cache(tmp_path, sandbox).load(HELLO, name="hello.wat")
    restarted = new_cache(tmp_path, sandbox)
    by_digest = restarted.load_cached(compiled.sha256, size=compiled.size)
    assert by_digest is not None and by_digest.cache_hit
    assert restarted.load_cached("0" * 64, size=1) is None  # never compiled: nothing to load

    artifact, _ = artifact_of(restarted)
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(data)
    corrupted = new_cache(tmp_path, sandbox)
    assert corrupted.load_cached(compiled.sha256, size=compiled.size) is None
    assert corrupted.rebuilt == 1


# Bounded and collected (issue 10, item 9) -----------------------------------------------------


def greeting_module(text: str) -> bytes:
    """A small module of its own content (its own digest, its own artifact). It answers `text`
    padded with NUL bytes to the greeting's length (the demo writes a fixed length)."""
    return wasmtime.wat2wasm((DEMO / "hello.wat").read_text().replace("hello from wasm", text))


def stored(cache: ArtifactCache) -> set[str]:
    """Digests with an artifact in the cache folder."""
    return {path.stem for path in cache.directory.glob(f"*{ARTIFACT_SUFFIX}")}


def age(cache: ArtifactCache, sha256: str, seconds: float) -> None:
    """Make an artifact's last use `seconds` ago, as a pass long after it would see it."""
    artifact, _ = artifact_of(cache, sha256)
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(artifact, ns=(then, then))


def test_an_artifact_nobody_used_for_min_age_is_collected_and_a_held_one_stays(tmp_path, sandbox):
    cache = ArtifactCache(tmp_path, sandbox.engine, sandbox.settings, min_age_s=600)
    dropped = cache.load(greeting_module("dropped"), name="dropped.wat")
    kept = cache.load(greeting_module("kept"), name="kept.wat")
    dropped_sha = dropped.sha256
    del dropped  # nothing in this process holds it any more
    assert cache.collect() == 0  # just written: another process may be about to load it
    assert stored(cache) == {dropped_sha, kept.sha256}

    age(cache, dropped_sha, 601)
    age(cache, kept.sha256, 601)  # held by this process: old on disk, still in use
    assert cache.collect() == 1
    assert stored(cache) == {kept.sha256}
    assert not artifact_of(cache, dropped_sha)[1].exists()  # its record went too
    assert answer(sandbox, kept).rstrip(b"\0") == b"kept\n"

    # The pass leased what this process holds: another process sharing the folder, which
    # holds nothing, leaves it alone.
    other = ArtifactCache(tmp_path, sandbox.engine, sandbox.settings, min_age_s=600)
    assert other.collect() == 0
    assert stored(other) == {kept.sha256}
    assert cache.collected == 1


def test_over_its_bound_the_cache_evicts_the_least_recently_used_artifact_first(
    tmp_path, sandbox, caplog
):
    sources = {name: greeting_module(name) for name in ("one", "two", "three")}
    digests = {name: hashlib.sha256(source).hexdigest() for name, source in sources.items()}
    probe = ArtifactCache(tmp_path / "probe", sandbox.engine, sandbox.settings)
    probe.load(sources["one"], name="one.wat")
    one_artifact = sum(path.stat().st_size for path in probe.directory.iterdir())
    # Room for two artifacts (with their records), not three: the greetings differ by a byte.
    bound = int(2.5 * one_artifact)
    cache = ArtifactCache(tmp_path, sandbox.engine, sandbox.settings, max_bytes=bound)

    cache.load(sources["one"], name="one.wat")
    cache.load(sources["two"], name="two.wat")
    # Nothing holds them now; "one" is loaded again, from its artifact: "two" is older.
    again = ArtifactCache(tmp_path, sandbox.engine, sandbox.settings)
    assert again.load(sources["one"], name="one.wat").cache_hit
    del again
    held = cache.load(sources["three"], name="three.wat")  # a third is stored: over the bound
    assert stored(cache) == {digests["one"], digests["three"]}
    assert cache.collected == 1

    # What this process holds is never evicted, even over the bound: it would free no disk
    # (the process keeps it mapped). The pass says so once.
    cache.max_bytes = 1
    with caplog.at_level(logging.WARNING, logger="supervisor.modules"):
        assert cache.collect() == 1  # "one": nobody holds it
        assert cache.collect() == 0
    assert stored(cache) == {held.sha256}
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "over its bound" in caplog.records[0].message
    assert answer(sandbox, held).rstrip(b"\0") == b"three\n"


def test_another_engine_builds_artifacts_are_collected_then_its_folder(tmp_path, sandbox):
    """After an upgrade of wasmtime (or a change of engine settings) the old folder is garbage."""
    code = CodeSettings(consume_fuel=False, epoch_interruption=False)
    other = ArtifactCache(tmp_path, wasmtime.Engine(code.config()), "no-fuel,no-epochs", code)
    old_sha = other.load(HELLO, name="hello.wat").sha256
    cache = new_cache(tmp_path, sandbox)
    assert cache.directory != other.directory
    cache.collect()
    assert stored(other) == {old_sha}  # used just now, maybe by a process of that build

    age(other, old_sha, DEFAULT_MIN_AGE_S + 1)
    cache.collect()
    assert list(other.directory.iterdir()) == []
    then = time.time_ns() - int((DEFAULT_MIN_AGE_S + 1) * 1e9)
    os.utime(other.directory, ns=(then, then))  # and empty that long
    cache.collect()
    assert not other.directory.exists()
    assert cache.directory.exists()


def test_a_crashed_writes_temp_file_is_removed_once_stale(tmp_path, sandbox):
    cache = new_cache(tmp_path, sandbox)
    leftover = cache.directory / f".{HELLO_SHA}{ARTIFACT_SUFFIX}.abc123.tmp"
    fresh = cache.directory / f".{HELLO_SHA}{RECORD_SUFFIX}.def456.tmp"
    leftover.write_bytes(b"half an artifact")
    fresh.write_bytes(b"being written")
    then = time.time_ns() - int((STALE_TEMP_S + 1) * 1e9)
    os.utime(leftover, ns=(then, then))
    cache.collect()
    assert (leftover.exists(), fresh.exists()) == (False, True)


# Private to the server (issue 10, item 11) ----------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_engine_folder_is_created_private_and_an_open_one_is_made_private(
    tmp_path, sandbox, caplog
):
    root = tmp_path / "not-yet"
    cache = new_cache(root, sandbox)
    assert (mode_of(root), mode_of(cache.directory)) == (0o700, 0o700)
    cache.load(HELLO, name="hello.wat")

    cache.directory.chmod(0o777)  # a wide umask, an operator's chmod, or someone else's mkdir
    with caplog.at_level(logging.WARNING, logger="supervisor.modules"):
        reopened = new_cache(root, sandbox)
    assert mode_of(reopened.directory) == 0o700
    assert "was open to other users (mode 777); made private (0700)" in caplog.text
    assert reopened.load(HELLO, name="hello.wat").cache_hit


def test_an_engine_folder_of_another_user_or_a_link_is_never_read(tmp_path, sandbox, caplog):
    new_cache(tmp_path / "elsewhere", sandbox).load(HELLO, name="hello.wat")
    planted = new_cache(tmp_path / "elsewhere", sandbox).directory
    root = tmp_path / "cache"
    root.mkdir(mode=0o777)
    engine_folder = root / planted.name
    engine_folder.symlink_to(planted)  # someone who can write the mount planted artifacts
    with caplog.at_level(logging.ERROR, logger="supervisor.modules"):
        linked = new_cache(root, sandbox)
    assert "is not a folder (a link?): not used" in caplog.text
    loaded = linked.load(HELLO, name="hello.wat")
    assert (loaded.cache_hit, linked.hits, linked.misses) == (False, 0, 1)
    assert list(planted.iterdir()) and not linked.usable

    if os.geteuid() != 0:
        return  # only root can give a folder to another uid
    engine_folder.unlink()
    shutil.copytree(planted, engine_folder)
    os.chown(engine_folder, 4242, 4242)
    engine_folder.chmod(0o700)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="supervisor.modules"):
        foreign = new_cache(root, sandbox)
    assert f"belongs to uid 4242, not this server's ({os.geteuid()}): not used" in caplog.text
    assert not foreign.load(HELLO, name="hello.wat").cache_hit
    assert foreign.hits == 0
