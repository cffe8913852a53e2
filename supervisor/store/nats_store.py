"""`--store nats://...`: manifests in a JetStream KV bucket, module bytes in an Object Store.

    <prefix>-manifests   KV, one key per tenant; the value is the manifest's JSON (store
                         format 2, unknown keys kept); the KV revision is the CAS revision
    <prefix>-modules     Object Store, one object per module, named by its sha256

Both buckets keep the layouts nats-py and the `nats` CLI use, so operators can inspect them.

Every process watches the KV bucket (no polling). What the watch delivers is written to a
local copy the registry loads from, as it loads a file store (`manifest_dir`): a folder of
this process's own under `--cache`, one `<tenant>/manifest.json` each, written atomically,
so the registry's incremental reload sees a changed manifest as a changed file. Before a
manifest is written its module bytes are fetched into `<cache>/store/modules/<sha256>.wasm`
(shared by the pod's processes: content-addressed, verified, renamed into place whole), so
the reload that follows never waits for the network on a request's path. Listeners
(`on_change`) are then told, from the store's loop thread.

A watch is re-created on every reconnection, and its first pass replays every key: whatever
changed while the connection was down (including deletions: a local copy whose key the
replay did not name is removed) is reconciled then.

Module bytes are read with a pull consumer over the object's chunks (nats-py's
`ObjectStore.get` took 780-870 ms for 18 MB through a push consumer; a pull fetch 35-49 ms),
and their sha256 is checked before anything uses them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import Conflict
from ..files import write_atomically
from . import MANIFEST_FILE, Manifest, read_manifest_bytes
from .nats_client import NatsConnection, NatsSettings, StoreUnavailable
from .uploads import GC_MIN_AGE_S, MAX_CAS_ATTEMPTS, Change, Stored, UploadStore, referenced

__all__ = ["NatsStore"]

log = logging.getLogger("supervisor.store.nats")

KV_HISTORY = 5
"""Revisions the KV bucket keeps per tenant: enough to see a recent change by hand."""
CHUNK_BYTES = 1024 * 1024
"""Object chunk size: 1 MiB chunks fetched in 26-29 ms for 18 MB (128 KiB: 35-49 ms)."""
FETCH_BATCH = 64
"""Chunks asked for per pull request (64 MiB at most in flight)."""
FETCH_TIMEOUT_S = 5.0
LOCAL_DIR = "store"
"""Under `--cache`: module bytes fetched from the store, and each process's manifests."""


class NatsStore(UploadStore):
    """The store of uploads on NATS JetStream, with a local copy this process loads from."""

    def __init__(
        self,
        settings: NatsSettings,
        cache_dir: Path,
        *,
        replicas: int = 1,
        prefix: str = "wasm-supervisor",
    ) -> None:
        self.url = ",".join(settings.servers)
        self.kv_bucket = f"{prefix}-manifests"
        self.object_bucket = f"{prefix}-modules"
        self.replicas = replicas
        local = cache_dir / LOCAL_DIR
        self._modules_dir = local / "modules"
        self._modules_dir.mkdir(parents=True, exist_ok=True)
        self._manifests_dir = Path(tempfile.mkdtemp(prefix="manifests-", dir=local))
        self._revisions: dict[str, int] = {}  # tenant -> revision of its local copy
        # Copies of a replay not written yet (tenant -> revision, value), of tenants whose
        # folder nobody asked for yet: the pod is ready once the replay is read, and each copy
        # is written when its folder is first asked for (its tenant's first build). A tenant
        # already asked for is installed at once, so the registry's next poll sees the change.
        self._unwritten: dict[str, tuple[int, bytes]] = {}
        self._asked: set[str] = set()
        self._install_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._synced = threading.Event()  # the first replay of the bucket is done
        self._kv: Any = None
        self._objects: Any = None
        self._watch_task: asyncio.Task | None = None
        self.connection = NatsConnection(settings)
        self.connection.on_connect(self._on_connect)
        self.connection.start()

    # -- readiness ---------------------------------------------------------------------------

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the manifests have been read once (a pod is ready only then)."""
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    # -- UploadStore -------------------------------------------------------------------------

    def read(self, tenant: str) -> Stored:
        async def get() -> Stored:
            entry = await self._get_entry(tenant)
            if entry is None:
                return Stored(Manifest(), 0)
            return Stored(self._parse(tenant, entry.value), entry.revision)

        return self.connection.call(get)

    def update(self, tenant: str, change: Change) -> tuple[Manifest, bool]:
        from nats.js.errors import KeyWrongLastSequenceError

        for _ in range(MAX_CAS_ATTEMPTS):
            stored = self.read(tenant)
            new = change(stored.manifest)
            if new is None:
                return stored.manifest, False
            value = new.to_json()

            async def write(value: bytes = value, revision: int = stored.revision) -> int:
                if revision == 0:
                    return await self._kv.create(tenant, value)
                return await self._kv.update(tenant, value, last=revision)

            try:
                revision = self.connection.call(write)
            except KeyWrongLastSequenceError:
                continue  # another writer won: apply the change to what it wrote
            except Exception as exc:
                if _already_exists(exc):
                    continue  # another writer created the key first
                raise
            self._install(tenant, revision, value)
            return new, True
        raise Conflict(
            f"tenant {tenant!r} changed {MAX_CAS_ATTEMPTS} times while this change was"
            " applied; retry"
        )

    def write(self, tenant: str, manifest: Manifest) -> None:
        value = manifest.to_json()
        revision = self.connection.call(lambda: self._kv.put(tenant, value))
        self._install(tenant, revision, value)

    def put_module(self, tenant: str, binary: bytes) -> str:
        """Store the bytes, or refresh an old copy: bytes no manifest named for a while may be
        swept by a GC that marked before this upload names them, unless they are young."""
        digest = hashlib.sha256(binary).hexdigest()
        age = self._object_age(digest)
        if age is None or age > GC_MIN_AGE_S / 2:

            async def put() -> None:
                from nats.js.api import ObjectMeta, ObjectMetaOptions

                meta = ObjectMeta(
                    name=digest, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)
                )
                await self._objects.put(digest, bytes(binary), meta=meta)

            self.connection.call(put, timeout=max(10.0, len(binary) / 10e6))
        self._keep_local(digest, binary)
        return digest

    def get_module(self, tenant: str, sha256: str) -> bytes:
        data = self.connection.call(lambda: self._fetch(sha256), timeout=60.0)
        if data is None:
            raise KeyError(sha256)
        return data

    def has_module(self, tenant: str, sha256: str) -> bool:
        return self._object_age(sha256) is not None

    def _object_age(self, sha256: str) -> float | None:
        """Seconds since the object was stored; None when there is none."""

        async def age() -> float | None:
            from nats.js.errors import ObjectNotFoundError

            try:
                info = await self._objects.get_info(sha256)
            except ObjectNotFoundError:
                return None
            if info.deleted:
                return None
            return time.time() - _timestamp(info.mtime) if info.mtime else 0.0

        return self.connection.call(age)

    def module_path(self, tenant: str, sha256: str, *, fetch: bool = True) -> Path:
        path = self._modules_dir / f"{sha256}.wasm"
        if fetch and not path.exists():
            with contextlib.suppress(KeyError, StoreUnavailable):
                self._keep_local(sha256, self.get_module(tenant, sha256))
        return path

    def manifest_dir(self, tenant: str) -> Path:
        if tenant not in self._asked or tenant in self._unwritten:
            with self._install_lock:
                self._asked.add(tenant)
                self._write_unwritten(tenant)
        return self._manifests_dir / tenant

    def tenants(self) -> list[str]:
        async def keys() -> list[str]:
            from nats.js.errors import NoKeysError

            try:
                return sorted(await self._kv.keys())
            except NoKeysError:
                return []

        return self.connection.call(keys)

    def collect_garbage(self, *, min_age_s: float = GC_MIN_AGE_S) -> list[str]:
        """Mark every sha256 a manifest names, then sweep objects older than `min_age_s`."""
        keep = referenced(self.read(tenant).manifest for tenant in self.tenants())

        async def sweep() -> list[str]:
            removed = []
            now = time.time()
            for info in await self._list_objects():
                if info.name in keep or info.deleted or info.mtime is None:
                    continue
                if now - _timestamp(info.mtime) >= min_age_s:
                    await self._objects.delete(info.name)
                    removed.append(info.name)
            return removed

        return self.connection.call(sweep, timeout=60.0)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        self.connection.close()
        shutil.rmtree(self._manifests_dir, ignore_errors=True)

    # -- local copies ------------------------------------------------------------------------

    def _install(self, tenant: str, revision: int, value: bytes | None) -> None:
        """Write (or remove, for None) the local copy of a revision newer than the one here."""
        with self._install_lock:  # the watch and this process's own writes both install
            if revision <= self._revisions.get(tenant, 0):
                return
            self._revisions[tenant] = revision
            self._unwritten.pop(tenant, None)
            self._write_copy(tenant, revision, value)

    def _write_copy(self, tenant: str, revision: int, value: bytes | None) -> None:
        folder = self._manifests_dir / tenant
        if value is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        folder.mkdir(exist_ok=True)
        # Not synced: every start replays the whole bucket and writes each copy again
        # (an fsync each made 1,000 tenants' start 3 s longer).
        write_atomically(folder / MANIFEST_FILE, value, durable=False)
        # The file's mtime is the revision: two revisions written within one clock tick,
        # the same size, on a reused inode still differ in the `stat` the registry keys
        # its reload on.
        os.utime(folder / MANIFEST_FILE, ns=(revision, revision))

    def _write_unwritten(self, tenant: str) -> None:
        """Under the install lock: write the replay's copy of `tenant` if it is still due."""
        due = self._unwritten.get(tenant)
        if due is not None:
            self._write_copy(tenant, *due)
            del self._unwritten[tenant]

    def _keep_replayed(self, tenant: str, revision: int, value: bytes) -> bool:
        """A manifest of a replay, kept to be written when its folder is asked for, unless it
        already was (then False: install it now). It is parsed (and a broken one reported) by
        its tenant's build, not twice; its modules' bytes are not fetched: a module is fetched
        when it loads (by its shared artifact alone when there is one), so a new pod of a
        store with 10,000 tenants does not fetch 10,000 modules."""
        with self._install_lock:
            if tenant in self._asked:
                return False
            if revision > self._revisions.get(tenant, 0):
                self._revisions[tenant] = revision
                self._unwritten[tenant] = (revision, value)
            return True

    def _keep_local(self, sha256: str, binary: bytes) -> None:
        path = self._modules_dir / f"{sha256}.wasm"
        if not path.exists():
            write_atomically(path, binary)

    def _parse(self, tenant: str, value: bytes) -> Manifest:
        return read_manifest_bytes(value, source=f"{self.kv_bucket}/{tenant}")

    # -- inside the loop ---------------------------------------------------------------------

    async def _on_connect(self) -> None:
        """(Re)open the buckets and (re)start the watch: its replay reconciles what was missed."""
        from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

        js = self.connection.jetstream
        try:
            self._kv = await js.key_value(self.kv_bucket)
        except Exception:
            self._kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=self.kv_bucket,
                    history=KV_HISTORY,
                    replicas=self.replicas,
                    storage=StorageType.FILE,
                )
            )
        try:
            self._objects = await js.object_store(self.object_bucket)
        except Exception:
            self._objects = await js.create_object_store(
                self.object_bucket,
                config=ObjectStoreConfig(
                    bucket=self.object_bucket,
                    replicas=self.replicas,
                    storage=StorageType.FILE,
                ),
            )
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Follow the bucket until cancelled (a reconnect starts a new watch)."""
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection closed or was lost: the reconnect restarts it
            log.info("store: watch ended (%r); restarted on reconnect", exc)

    async def _follow(self) -> None:
        watcher = await self._kv.watchall()
        replayed: set[str] | None = set()
        try:
            async for entry in watcher:
                if entry is None:  # the replay of every key is done
                    self._forget_missing(replayed or set())
                    replayed = None
                    self._synced.set()
                    self._notify()
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                if replayed is not None and not deleted:
                    replayed.add(entry.key)
                    if self._keep_replayed(entry.key, entry.revision, entry.value):
                        continue
                await self._apply_entry(entry.key, entry.revision, None if deleted else entry.value)
                if replayed is None:
                    self._notify()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await watcher.stop()
            raise

    async def _apply_entry(self, tenant: str, revision: int, value: bytes | None) -> None:
        if revision <= self._revisions.get(tenant, 0):
            return
        if value is not None:
            try:
                manifest = self._parse(tenant, value)
            except Exception as exc:
                log.error("store: %s", exc)
            else:
                for digest in manifest.referenced():
                    if not (self._modules_dir / f"{digest}.wasm").exists():
                        data = await self._fetch(digest)
                        if data is not None:
                            await asyncio.to_thread(self._keep_local, digest, data)
        await asyncio.to_thread(self._install, tenant, revision, value)

    def _forget_missing(self, present: set[str]) -> None:
        with self._install_lock:
            for tenant in list(self._revisions):
                if tenant not in present:
                    self._revisions.pop(tenant, None)
                    self._unwritten.pop(tenant, None)
                    shutil.rmtree(self._manifests_dir / tenant, ignore_errors=True)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("store: a change listener failed")

    async def _get_entry(self, tenant: str) -> Any:
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            return await self._kv.get(tenant)
        except (KeyNotFoundError, KeyDeletedError):
            return None

    async def _list_objects(self) -> list[Any]:
        from nats.js.errors import NotFoundError

        try:
            return await self._objects.list(ignore_deletes=True)
        except NotFoundError:
            return []

    async def _fetch(self, sha256: str) -> bytes | None:
        """The object's bytes through a pull consumer over its chunks, digest verified."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import ObjectNotFoundError

        try:
            info = await self._objects.get_info(sha256)
        except ObjectNotFoundError:
            return None
        if info.deleted:
            return None
        chunks: list[bytes] = []
        if info.size:
            subject = f"$O.{self.object_bucket}.C.{info.nuid}"
            subscription = await self.connection.jetstream.pull_subscribe(
                subject,
                stream=f"OBJ_{self.object_bucket}",
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=FETCH_TIMEOUT_S,
                    mem_storage=True,
                ),
            )
            try:
                while len(chunks) < info.chunks:
                    batch = min(FETCH_BATCH, info.chunks - len(chunks))
                    messages = await subscription.fetch(batch, timeout=FETCH_TIMEOUT_S)
                    chunks += [message.data for message in messages]
            finally:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        data = b"".join(chunks)
        digest = hashlib.sha256(data).digest()  # once: 18 MB hash in ~10 ms
        if digest.hex() != sha256 or not _digest_matches(info, digest):
            log.error("store: object %s does not hold its sha256; not used", sha256)
            return None
        return data


def _digest_matches(info: Any, digest: bytes) -> bool:
    """The Object Store's own `SHA-256=<base64url>` digest agrees, when the object has one."""
    if not info.digest:
        return True
    encoded = info.digest.split("=", 1)[-1]
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        return base64.urlsafe_b64decode(padded) == digest
    except ValueError:
        return False


def _already_exists(exc: BaseException) -> bool:
    """`kv.create` on a key another writer created meanwhile (wrong last sequence)."""
    from nats.js.errors import BadRequestError

    return isinstance(exc, BadRequestError) and exc.err_code == 10071


def _timestamp(mtime: str) -> float:
    """An Object Store RFC 3339 mtime (nanosecond fraction, `Z` or an offset) as Unix time."""
    match = _RFC3339.fullmatch(mtime)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {mtime!r}")
    whole, fraction, zone = match.groups()
    offset = "+00:00" if zone in (None, "Z") else zone
    value = datetime.fromisoformat(whole + offset).timestamp()
    return value + (float(fraction) if fraction else 0.0)


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?")
