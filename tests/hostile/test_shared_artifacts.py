"""Compiled artifacts shared through the store, authenticated before loading (issue 11, §3).

Pods are `ArtifactCache`s with their own local folders over one shared bucket (the `file:`
store's artifact folder), with the real engine of a `Sandbox` and real compiles in the compile
child; two processes race for one compile; full supervisors share a store. An attacker with
write access to the bucket flips a byte, truncates, strips the seal or re-seals with a key of
their own: nothing they wrote is ever deserialized.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import wasmtime
from conftest import REPO, Workspace

from supervisor.artifacts import (
    ArtifactBucket,
    ArtifactKeys,
    ArtifactRefused,
    FileArtifactBucket,
    SharedArtifacts,
    load_artifact_keys,
)
from supervisor.compiler import CodeSettings
from supervisor.fingerprint import engine_fingerprint
from supervisor.modules import ArtifactCache, to_binary
from supervisor.sandbox import Sandbox

ECHO = to_binary((REPO / "tenants" / "demo" / "echo.wat").read_bytes(), name="echo.wat")
HELLO = to_binary((REPO / "tenants" / "demo" / "hello.wat").read_bytes(), name="hello.wat")
OLD = ArtifactKeys.parse("old:" + "o" * 40, source="test")
NEW = ArtifactKeys.parse("new:" + "n" * 40, source="test")
ROTATED = ArtifactKeys.parse(f"new:{'n' * 40}\nold:{'o' * 40}", source="test")
ATTACKER = ArtifactKeys.parse("old:" + "a" * 40, source="test")  # our key id, not our secret
STRANGER = ArtifactKeys.parse("theirs:" + "t" * 40, source="test")


NATS_SERVER = Path(
    os.environ.get("NATS_SERVER", REPO / ".cache" / "nats" / "usr" / "sbin" / "nats-server")
)
"""Debian's nats-server, unpacked by `make test` (or named by $NATS_SERVER)."""
NATS_CLAIM_TTL_S = 1.0  # the claims bucket's TTL in these tests: a dead pod's claim lapses fast


def require_nats() -> None:
    """Skip without nats-py or the nats-server binary; in CI a missing binary is a failure."""
    pytest.importorskip("nats", reason="nats-py is not installed")
    if not NATS_SERVER.exists():
        if os.environ.get("CI"):  # `make test` unpacks it
            pytest.fail(f"no nats-server at {NATS_SERVER}: `make test` should have unpacked it")
        pytest.skip(f"no nats-server at {NATS_SERVER} (make test unpacks Debian's)")


@pytest.fixture
def sandbox() -> Sandbox:
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture(params=["file", "nats"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], ArtifactBucket]:
    """A shared artifact bucket: each call is one more pod's handle on the same bucket."""
    if request.param == "file":
        return lambda: FileArtifactBucket(tmp_path / "store")
    require_nats()
    from supervisor.store.nats_artifacts import NatsArtifactBucket

    connection, _ = request.getfixturevalue("nats_connection")
    handed: list[object] = []  # the first pod has the fixture's connection, each other its own

    def bucket() -> ArtifactBucket:
        pod_connection = connect_like(connection) if handed else connection
        if handed:
            request.addfinalizer(pod_connection.close)
        handed.append(pod_connection)
        return NatsArtifactBucket(pod_connection, claim_ttl_s=NATS_CLAIM_TTL_S)

    return bucket


def connect_like(connection):
    """Another pod's connection to the same nats-server (its claims are its own)."""
    from supervisor.store.nats_client import NatsConnection

    other = NatsConnection(connection.settings)
    other.start()
    assert other.wait_connected(10), other.last_error
    return other


def kill(bucket: ArtifactBucket) -> None:
    """The pod holding `bucket` dies: a NATS one's connection closes (its renewals of the
    claims it held stop with it); a folder's claims are files, left as they are."""
    connection = getattr(bucket, "_connection", None)
    if connection is not None:
        connection.close()


@pytest.fixture
def nats_connection(tmp_path: Path):
    """A real nats-server with JetStream on a free loopback port and a temporary store
    folder: the process's NatsConnection to it (its own asyncio loop thread), and the server.

    (A fixture of this file's own: the store's shared nats-server fixture may replace it.)"""
    from supervisor.store.nats_client import NatsConnection, parse_nats_url

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    connection = NatsConnection(parse_nats_url(f"nats://127.0.0.1:{port}"))
    try:
        connection.start()
        assert connection.wait_connected(10), connection.last_error
        yield connection, server
    finally:
        connection.close()
        server.terminate()
        server.wait(timeout=10)


def pod(
    tmp_path: Path,
    store: Callable[[], ArtifactBucket],
    sandbox: Sandbox,
    name: str,
    keys: ArtifactKeys | None,
) -> ArtifactCache:
    """A pod: its own local cache folder, and a handle on the shared bucket."""
    return ArtifactCache(
        tmp_path / f"cache-{name}",
        sandbox.engine,
        sandbox.settings,
        sandbox.code,
        bucket=store(),
        keys=keys,
    )


def name_of(cache: ArtifactCache, binary: bytes = HELLO) -> str:
    return f"{cache.fingerprint}/{hashlib.sha256(binary).hexdigest()}"


def stored(cache: ArtifactCache, binary: bytes = HELLO) -> bytes | None:
    return cache.shared.bucket.get(name_of(cache, binary))


def replace(cache: ArtifactCache, data: bytes, binary: bytes = HELLO) -> None:
    cache.shared.bucket.put(name_of(cache, binary), data)


def test_fingerprint_is_stable_across_processes_and_names_code_settings(sandbox: Sandbox) -> None:
    here = engine_fingerprint(sandbox.engine, sandbox.settings)
    code = (
        "from supervisor.sandbox import Sandbox\n"
        "from supervisor.fingerprint import engine_fingerprint\n"
        "with Sandbox() as s: print(engine_fingerprint(s.engine, s.settings))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    assert here == there
    plain = CodeSettings()
    assert engine_fingerprint(wasmtime.Engine(plain.config())) == engine_fingerprint(
        wasmtime.Engine(plain.config())
    )
    for changed in (
        CodeSettings(cranelift_opt_level="none"),
        CodeSettings(consume_fuel=False),
        CodeSettings(epoch_interruption=False),
    ):
        assert engine_fingerprint(wasmtime.Engine(changed.config())) != engine_fingerprint(
            wasmtime.Engine(plain.config())
        ), changed


def test_second_pod_loads_from_the_store_without_compiling(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    first = pod(tmp_path, store, sandbox, "a", OLD)
    assert not first.load(HELLO, name="hello.wat").cache_hit
    assert (first.compiled, first.shared.published) == (1, 1)
    second = pod(tmp_path, store, sandbox, "b", OLD)
    assert second.load(HELLO, name="hello.wat").cache_hit
    assert (second.compiled, second.shared.downloaded, second.shared.refused) == (0, 1, 0)
    # and it is kept in the second pod's own cache: a restart needs no store
    again = pod(tmp_path, store, sandbox, "b", OLD)
    assert again.load(HELLO, name="hello.wat").cache_hit
    assert (again.compiled, again.hits, again.shared.downloaded) == (0, 1, 0)


def test_a_module_loads_from_the_store_by_digest_without_its_bytes(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    """A pod that knows a module's sha256 (from a manifest) takes its artifact from the store
    without the module's bytes: the MAC names the digest, so nothing needs reading or hashing.
    The artifact is streamed into the pod's own cache while it is verified: a restart of the
    pod then loads it from disk, with no store."""
    first = pod(tmp_path, store, sandbox, "a", OLD)
    compiled = first.load(HELLO, name="hello.wat")
    second = pod(tmp_path, store, sandbox, "b", OLD)
    loaded = second.load_cached(compiled.sha256, size=compiled.size)
    assert loaded is not None and loaded.cache_hit
    assert (second.compiled, second.shared.downloaded, second.shared.refused) == (0, 1, 0)
    restarted = ArtifactCache(tmp_path / "cache-b", sandbox.engine, sandbox.settings, sandbox.code)
    assert restarted.load_cached(compiled.sha256, size=compiled.size) is not None
    assert restarted.hits == 1
    assert not list((tmp_path / "cache-b").rglob("*.tmp"))  # the download's temp file is gone


@pytest.mark.parametrize("piece", [1, 7, 64, 1 << 20])
def test_an_artifact_opens_the_same_fed_in_pieces(sandbox: Sandbox, piece: int) -> None:
    """A store hands an artifact over in chunks as they arrive: opened piece by piece (the
    seal split anywhere), it is the artifact; a flipped byte in its last piece or a missing
    tail is refused at the end, and an unsealed object at its first piece."""
    raw = wasmtime.Module(sandbox.engine, HELLO).serialize()
    digest = hashlib.sha256(HELLO).hexdigest()
    sealed = OLD.seal(raw, fingerprint="f" * 16, digest=digest)

    def feed(data: bytes) -> bytes:
        unsealer = OLD.unsealer(fingerprint="f" * 16, digest=digest)
        out = b"".join(
            bytes(unsealer.feed(data[at : at + piece])) for at in range(0, len(data), piece)
        )
        unsealer.finish()
        return out

    assert feed(sealed) == raw
    with pytest.raises(ArtifactRefused, match="wrong MAC"):
        feed(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(ArtifactRefused, match="truncated"):
        feed(sealed[: len(sealed) - 10])
    with pytest.raises(ArtifactRefused, match="truncated seal"):
        feed(sealed[:20])
    unsealer = OLD.unsealer(fingerprint="f" * 16, digest=digest)
    with pytest.raises(ArtifactRefused, match="not sealed"):
        unsealer.feed(raw[:piece])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), id="flipped-byte"),
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:40], id="truncated-seal"),
    ],
)
def test_damaged_artifact_of_our_key_is_refused_deleted_and_rebuilt(
    tmp_path: Path, store, sandbox: Sandbox, damage, caplog: pytest.LogCaptureFixture
) -> None:
    first = pod(tmp_path, store, sandbox, "a", OLD)
    first.load(HELLO, name="hello.wat")
    replace(first, damage(stored(first)))
    second = pod(tmp_path, store, sandbox, "b", OLD)
    assert not second.load(HELLO, name="hello.wat").cache_hit
    assert (second.shared.refused, second.shared.downloaded, second.compiled) == (1, 0, 1)
    assert "refused" in caplog.text and "deleted and rebuilt" in caplog.text
    # the bad object was deleted and replaced by the rebuilt one, which a third pod takes
    third = pod(tmp_path, store, sandbox, "c", OLD)
    assert third.load(HELLO, name="hello.wat").cache_hit
    assert (third.compiled, third.shared.refused) == (0, 0)


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        pytest.param(
            lambda raw, fp, digest: ATTACKER.seal(raw, fingerprint=fp, digest=digest),
            "wrong MAC for key id 'old'",
            id="resealed-under-our-key-id",
        ),
        pytest.param(
            lambda raw, fp, digest: STRANGER.seal(raw, fingerprint=fp, digest=digest),
            "not one of ours",
            id="resealed-with-their-key",
        ),
        pytest.param(lambda raw, fp, digest: raw, "not sealed", id="unsealed"),
    ],
)
def test_forged_artifact_is_never_deserialized(
    tmp_path: Path, store, sandbox: Sandbox, forge, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The attacker's artifact is a valid one for this very engine (so deserializing it would
    succeed): only the seal stops it."""
    first = pod(tmp_path, store, sandbox, "a", OLD)
    loaded = first.load(HELLO, name="hello.wat")
    forged = forge(loaded.module.serialize(), first.fingerprint, loaded.sha256)
    replace(first, forged)
    second = pod(tmp_path, store, sandbox, "b", OLD)
    assert not second.load(HELLO, name="hello.wat").cache_hit
    assert (second.shared.refused, second.shared.downloaded, second.compiled) == (1, 0, 1)
    assert reason in caplog.text
    if reason.startswith("wrong MAC"):  # claims our key id: deleted, rebuilt, republished
        assert OLD.open(stored(first), fingerprint=first.fingerprint, digest=loaded.sha256)
    else:  # claims no key of ours: left alone (a newer pod's, maybe), neither deleted nor replaced
        assert stored(first) == forged


def test_a_valid_artifact_of_another_module_is_refused(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    """The MAC binds the module's sha256: a bucket writer cannot swap two sealed artifacts."""
    first = pod(tmp_path, store, sandbox, "a", OLD)
    first.load(HELLO, name="hello.wat")
    first.load(ECHO, name="echo.wat")
    replace(first, stored(first, ECHO), HELLO)
    second = pod(tmp_path, store, sandbox, "b", OLD)
    assert not second.load(HELLO, name="hello.wat").cache_hit
    assert (second.shared.refused, second.compiled) == (1, 1)


def test_key_rotation_old_key_verifies_new_key_signs(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    before = pod(tmp_path, store, sandbox, "before", OLD)
    before.load(HELLO, name="hello.wat")
    rotated = pod(tmp_path, store, sandbox, "rotated", ROTATED)
    assert rotated.load(HELLO, name="hello.wat").cache_hit  # sealed with old: still verifies
    assert (rotated.compiled, rotated.shared.downloaded) == (0, 1)
    digest = rotated.load(ECHO, name="echo.wat").sha256
    sealed = stored(rotated, ECHO)
    assert NEW.open(sealed, fingerprint=rotated.fingerprint, digest=digest)  # new key signs
    with pytest.raises(ArtifactRefused, match="not one of ours"):
        OLD.open(sealed, fingerprint=rotated.fingerprint, digest=digest)


def test_without_a_key_the_store_is_not_used(tmp_path: Path, store, sandbox: Sandbox) -> None:
    pod(tmp_path, store, sandbox, "a", OLD).load(HELLO, name="hello.wat")
    keyless = pod(tmp_path, store, sandbox, "b", None)
    assert keyless.shared is None
    assert not keyless.load(HELLO, name="hello.wat").cache_hit
    assert keyless.compiled == 1


def test_key_file_errors_name_the_line() -> None:
    with pytest.raises(ValueError, match="line 2: key 'short' is 5 characters"):
        ArtifactKeys.parse(f"# comment\nshort:12345\nok:{'x' * 40}", source="keys")
    with pytest.raises(ValueError, match="line 1: expected KEY_ID:SECRET"):
        ArtifactKeys.parse("no colon here at all, just a long enough secret", source="keys")
    with pytest.raises(ValueError, match="listed twice"):
        ArtifactKeys.parse(f"a:{'x' * 40}\na:{'y' * 40}", source="keys")
    with pytest.raises(ValueError, match="no key"):
        ArtifactKeys.parse("# nothing\n", source="keys")
    assert load_artifact_keys(None, {}) is None
    keys = load_artifact_keys(None, {"SUPERVISOR_ARTIFACT_KEY": f"k1:{'s' * 40}"})
    assert keys is not None and keys.signing_id == "k1" and "s" * 40 not in repr(keys)


def test_sweep_deletes_what_no_module_names_past_the_minimum_age(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    cache = pod(tmp_path, store, sandbox, "a", OLD)
    hello = cache.load(HELLO, name="hello.wat").sha256
    cache.load(ECHO, name="echo.wat")
    assert cache.shared.sweep(set(), min_age_s=3600) == 0  # unnamed, but younger than that
    assert stored(cache, HELLO) and stored(cache, ECHO)
    assert cache.shared.sweep({hello}, min_age_s=0) == 1  # echo: named by no module
    assert stored(cache, ECHO) is None and stored(cache, HELLO)


def test_a_lapsed_claim_of_a_dead_pod_does_not_block_compiling(
    tmp_path: Path, store, sandbox: Sandbox
) -> None:
    """The claim lapses by itself (nobody deletes it), and the waiting pod then compiles."""
    cache = pod(tmp_path, store, sandbox, "a", OLD)
    cache.shared.claim_ttl_s = NATS_CLAIM_TTL_S
    dead, survivor = store(), store()
    other = f"{cache.fingerprint}/{'2' * 64}"
    assert dead.create_claim(name_of(cache), NATS_CLAIM_TTL_S)
    assert dead.create_claim(other, NATS_CLAIM_TTL_S)
    assert not survivor.create_claim(other, NATS_CLAIM_TTL_S)  # while it stands
    kill(dead)
    started = time.monotonic()
    assert not cache.load(HELLO, name="hello.wat").cache_hit
    assert cache.compiled == 1 and time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while not survivor.create_claim(other, NATS_CLAIM_TTL_S):  # lapses without a drop
        assert time.monotonic() < deadline, "a dead pod's claim never lapsed"
        time.sleep(0.05)


def test_one_claim_wins_among_racing_pods(tmp_path: Path, store, sandbox: Sandbox) -> None:
    """Eight threads create one claim at once (each a pod's handle): exactly one gets it."""
    name = f"{pod(tmp_path, store, sandbox, 'a', OLD).fingerprint}/{'1' * 64}"
    buckets = [store() for _ in range(8)]
    start = threading.Barrier(len(buckets))
    won: list[ArtifactBucket] = []

    def race(bucket: ArtifactBucket) -> None:
        start.wait()
        if bucket.create_claim(name, 60):
            won.append(bucket)

    threads = [threading.Thread(target=race, args=(bucket,)) for bucket in buckets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1
    loser = next(bucket for bucket in buckets if bucket is not won[0])
    assert loser.claimed(name, 60)
    won[0].drop_claim(name)  # the holder's drop frees it for the others
    assert not loser.claimed(name, 60) and loser.create_claim(name, 60)


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from supervisor.artifacts import ArtifactKeys, FileArtifactBucket
    from supervisor.modules import ArtifactCache
    from supervisor.sandbox import Sandbox

    root, name = Path(sys.argv[1]), sys.argv[2]
    binary = (root / "slow.wasm").read_bytes()
    keys = ArtifactKeys.parse("k:" + "k" * 40, source="test")
    with Sandbox() as sandbox:
        cache = ArtifactCache(root / f"cache-{name}", sandbox.engine, sandbox.settings,
                              sandbox.code, bucket=FileArtifactBucket(root / "store"), keys=keys)
        (root / f"ready-{name}").touch()
        while not (root / "go").exists():  # both load at the same instant
            time.sleep(0.005)
        cache.load(binary, name="slow.wasm")
        print(cache.compiled, cache.shared.downloaded)
    """
)


def slow_module(functions: int = 3000) -> bytes:
    """Valid and distinct code that takes about a second to compile."""
    body = " ".join(
        f"(func (param i32) (result i32) local.get 0 i32.const {n} i32.mul i32.const {n + 1}"
        " i32.add i32.const 7 i32.rem_u)"
        for n in range(functions)
    )
    return wasmtime.wat2wasm(f"(module {body})")


def test_two_processes_compiling_one_module_at_once_compile_once(tmp_path: Path) -> None:
    (tmp_path / "slow.wasm").write_bytes(slow_module())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):
        assert time.monotonic() < deadline and all(r.poll() is None for r in racers)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        compiled, downloaded = map(int, out.split())
        results.append((compiled, downloaded))
    assert sorted(results) == [(0, 1), (1, 0)], results


def test_second_serve_process_loads_from_the_store_without_compiling(
    workspace: Workspace, tmp_path: Path
) -> None:
    """Two `serve --workers 1` processes, the key in $SUPERVISOR_ARTIFACT_KEY, share the
    tenants folder's artifact area but not their caches: the second compiles nothing."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    key = f"pods:{'p' * 40}"
    for name in ("a", "b"):
        # Lazy loading: no module loads at start; the route's first request loads it.
        metrics = _serve_until_loaded(workspace, tmp_path / f"cache-{name}", key)
        if name == "a":
            assert "wasm_supervisor_modules_compiled_total 1.0" in metrics, metrics
            assert "wasm_supervisor_shared_artifacts_downloaded_total 0.0" in metrics, metrics
        else:
            assert "wasm_supervisor_modules_compiled_total 0.0" in metrics, metrics
            assert "wasm_supervisor_shared_artifacts_downloaded_total 1.0" in metrics, metrics


def _serve_until_loaded(workspace: Workspace, cache: Path, key: str) -> str:
    """Start a real server, wait (60 s at most) for its start-up lines, request its one route
    (its module loads then), stop it; its /metrics page as it was after that request."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "SUPERVISOR_ARTIFACT_KEY": key}
    log = cache.with_suffix(".log")
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "supervisor.cli", "serve", "--workers", "1"),
                *("--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
                *("--tenants", str(workspace.tenants), "--policies", str(workspace.policies)),
                *("--cache", str(cache)),
            ],
            stderr=output,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while not (
            re.search(r"serving on (http://\S+)", log.read_text())
            and re.search(r"metrics on (http://\S+)", log.read_text())
        ):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.02)
        text = log.read_text()
        serving = re.search(r"serving on (http://\S+)", text).group(1)
        metrics_url = re.search(r"metrics on (http://\S+)", text).group(1)
        assert httpx.get(f"{serving}/demo/hello", timeout=30).status_code == 200, log.read_text()
        metrics = httpx.get(metrics_url, timeout=30).text
    finally:
        process.terminate()
        process.wait(timeout=30)
    return metrics


async def test_second_pod_serves_the_artifact_of_the_first(
    workspace: Workspace, start_supervisor, tmp_path: Path
) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    pods = []
    for name in ("a", "b"):
        running = await start_supervisor(
            cache_dir=tmp_path / f"cache-{name}", artifact_keys=OLD, metrics_port=0
        )
        assert (await running.client.get("/demo/hello")).status_code == 200
        pods.append(running)
    first, second = (running.app.registry.cache for running in pods)
    assert (first.compiled, first.shared.published) == (1, 1)
    assert (second.compiled, second.shared.downloaded) == (0, 1)
    async with httpx.AsyncClient() as client:
        metrics = await client.get(f"http://127.0.0.1:{pods[1].app.metrics_port}/metrics")
    assert "wasm_supervisor_shared_artifacts_downloaded_total 1.0" in metrics.text
    assert "wasm_supervisor_modules_compiled_total 0.0" in metrics.text


def test_sweep_tidies_lapsed_claims_and_crashed_writes(tmp_path: Path, sandbox: Sandbox) -> None:
    cache = pod(tmp_path, lambda: FileArtifactBucket(tmp_path / "store"), sandbox, "a", OLD)
    bucket = cache.shared.bucket
    name = f"{cache.fingerprint}/{'0' * 64}"
    assert bucket.create_claim(name, 60)
    crashed = bucket.folder / cache.fingerprint / ".x.sealed.123.tmp"
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"half")
    old = time.time() - 7200
    for path in (crashed, bucket._claim_path(name)):
        os.utime(path, (old, old))
    cache.shared.sweep(set(), min_age_s=3600)
    assert not crashed.exists() and not bucket.claimed(name, 1e9)


def test_an_unreachable_store_costs_a_compile_not_service(
    tmp_path: Path, sandbox: Sandbox, request: pytest.FixtureRequest, caplog
) -> None:
    """NATS goes away: a pod that lacks the artifact compiles it, and says why in its log."""
    require_nats()
    from supervisor.store.nats_artifacts import NatsArtifactBucket

    connection, server = request.getfixturevalue("nats_connection")
    bucket = NatsArtifactBucket(connection, claim_ttl_s=NATS_CLAIM_TTL_S)
    pod(tmp_path, lambda: bucket, sandbox, "a", OLD).load(HELLO, name="hello.wat")
    server.terminate()
    server.wait(timeout=10)
    deadline = time.monotonic() + 10
    while connection.connected:
        assert time.monotonic() < deadline, "the connection never noticed"
        time.sleep(0.02)
    second = pod(tmp_path, lambda: bucket, sandbox, "b", OLD)
    assert not second.load(HELLO, name="hello.wat").cache_hit
    assert (second.compiled, second.shared.downloaded, second.shared.published) == (1, 0, 0)
    assert "unreadable (NATS: store unreachable" in caplog.text
    assert "could not publish artifact" in caplog.text


def test_a_compile_that_outlasts_its_claims_lifetime_keeps_the_claim(
    request: pytest.FixtureRequest,
) -> None:
    """Pod A claims a compile and takes three claim lifetimes over it; pod B, which lost the
    claim, sees it held all along and waits (it never compiles the same module too), then
    takes A's artifact. A's claim is renewed while A lives, and dropped when A publishes."""
    pytest.importorskip("nats", reason="nats-py is not installed")
    if not NATS_SERVER.exists():
        pytest.skip(f"no nats-server at {NATS_SERVER} (make test unpacks Debian's)")
    from supervisor.store.nats_artifacts import NatsArtifactBucket

    connection, _ = request.getfixturevalue("nats_connection")
    other = connect_like(connection)
    request.addfinalizer(other.close)
    fingerprint, digest = "0" * 16, "1" * 64
    compiling, waiting = (
        SharedArtifacts(
            NatsArtifactBucket(pod, claim_ttl_s=NATS_CLAIM_TTL_S),
            OLD,
            fingerprint,
            claim_ttl_s=NATS_CLAIM_TTL_S,
        )
        for pod in (connection, other)
    )
    assert compiling.claim(digest)
    assert not waiting.claim(digest)
    waited: list[memoryview | None] = []
    waiter = threading.Thread(target=lambda: waited.append(waiting.await_other(digest)))
    waiter.start()
    compile_ends = time.monotonic() + 3 * NATS_CLAIM_TTL_S
    while time.monotonic() < compile_ends:  # A compiles on; B must keep waiting
        assert waiting.bucket.claimed(f"{fingerprint}/{digest}", NATS_CLAIM_TTL_S), (
            "the claim of a compile still running lapsed"
        )
        assert waiter.is_alive(), "the waiting pod gave up on a compile still running"
        time.sleep(NATS_CLAIM_TTL_S / 10)  # sampling the claim through the compile
    compiling.publish(digest, b"compiled code")
    waiter.join(10)
    assert [bytes(artifact) for artifact in waited if artifact is not None] == [b"compiled code"]
    assert not waiting.bucket.claimed(f"{fingerprint}/{digest}", NATS_CLAIM_TTL_S)  # dropped
