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
import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import wasmtime
from conftest import DEMO, Workspace
from test_lifecycle import serve_process

from supervisor.compiler import CodeSettings
from supervisor.modules import ARTIFACT_SUFFIX, RECORD_SUFFIX, ArtifactCache, CompiledModule
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
    first = await start_supervisor()
    assert (first.app.registry.cache.misses, first.app.registry.cache.hits) == (2, 0)
    assert (await first.client.get("/demo/hello")).text == "hello from wasm\n"

    second = await start_supervisor()  # a new engine and registry on the same folders
    assert (second.app.registry.cache.misses, second.app.registry.cache.hits) == (0, 2)
    assert (await second.client.get("/demo/hello")).text == "hello from wasm\n"
    assert (await second.client.get("/demo/echo/")).status_code == 200

    hello_sha = second.app.registry.state.tenants["demo"].modules["hello.wat"].sha256
    _flip_greeting(artifact_of(second.app.registry.cache, hello_sha)[0])
    third = await start_supervisor()
    cache = third.app.registry.cache
    assert (cache.rebuilt, cache.misses, cache.hits) == (1, 1, 1)
    assert (await third.client.get("/demo/hello")).text == "hello from wasm\n"


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
    assert "compiled 1, cache hits 1" in log
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
