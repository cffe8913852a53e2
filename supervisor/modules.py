"""Compiled modules: compile once per content and engine settings, load from disk after that.

Compiling is the cold start (about a second per MB); loading a compiled artifact with
`Module.deserialize_file` (mmap) takes milliseconds. An artifact is native code that wasmtime
loads without checking, and a flipped byte loads without error (FACTS.md), so:

- artifacts live in the cache directory only (never under `tenants/`, where tenants write);
- each is written atomically (temp file, fsync, rename, fsync the folder), and its size and
  CRC-32 are recorded beside it *after* it is complete (one downloaded from the store is not
  fsync'd: a torn one fails its record's check and is downloaded again);
- before an artifact is trusted, its size and checksum are checked against that record; a
  mismatch, a missing record or a failed load means it is rebuilt, never loaded.

The checksum guards against corruption (a torn or truncated write, a flipped bit), which is
the threat here: tenants cannot write the cache, and whoever can could rewrite the record as
well, so a cryptographic digest would add nothing but time. CRC-32 over the memory-mapped file
takes ~4.5 ms for CPython's 18 MB artifact where reading it and hashing it with SHA-256 took
~11 ms, over the 10 ms a cold start of that guest may take.

The cache is bounded and collected (issue 10, item 9). Last use is an artifact's mtime: set
when it is written, loaded from disk, or leased: every `collect` pass re-stamps what this
process holds, so processes sharing the folder (a pod's workers, pods on one volume) see what
any of them uses. A pass deletes what nobody held or loaded for `min_age_s`, then, while the
folder is over `max_bytes`, what this process does not hold, least recently used first; a
store over the bound evicts the same way at once. Files are only ever unlinked or renamed over,
never changed in place: a process that has one mapped keeps its pages (unlinked data lives
until unmapped), and one about to load it finds no record and compiles again. Deleting an
artifact some process holds frees nothing, so held artifacts are never evicted; what one
tenant holds is bounded by its policy's `max_artifact_bytes` (tenants.py).

The cache folder is native code that wasmtime maps without checking: whoever can write it can
run code in the server, and an artifact changed under a running worker crashes it (SIGBUS).
The engine's folder is therefore private to the server: created 0700, and at start one owned
by this uid but open to others is made 0700 again; one that is not a real folder or belongs to
another uid is never read (every module compiles, as with a read-only cache).

A module is compiled in a child process with the tenant's limits (compiler.py), never in the
worker: the child hands back the serialized artifact, which is stored as above and loaded.

A module this cache lacks is first looked for in the store's shared artifacts (artifacts.py),
sealed with the pod's HMAC keys and verified before anything deserializes it; only if it is
not there (or fails verification) is it compiled, once per cluster, and then published. The
store's artifact is found by the module's digest alone (`load_cached`: a 20 MB module is then
neither read nor hashed), and streamed into this cache as it arrives, its MAC, checksum and
write overlapping the transfer; it is renamed into place and mapped only once the MAC checks.
The cache folder is named by the engine fingerprint (fingerprint.py), as the store's are.

Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import tempfile
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import wasmtime

from .artifacts import ArtifactBucket, ArtifactKeys, SharedArtifacts
from .compiler import (
    COMPILER,
    DEFAULT_COMPILE_LIMITS,
    SERVING_CODE,
    CodeSettings,
    CompileLimits,
    check_compile_bounds,
)
from .errors import ModuleRejected
from .files import fsync_directory, write_atomically
from .fingerprint import engine_fingerprint

log = logging.getLogger("supervisor.modules")

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
"""An artifact's name: its module's SHA-256."""

ARTIFACT_SUFFIX = ".cwasm"
RECORD_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"  # files.write_atomically's temp files

DEFAULT_MAX_BYTES = 2 * 1024**3
"""The cache's bound (`--cache-max-bytes`): a fraction of a node's disk, 100 times the artifact of
a large language runtime (CPython for WASI: 18 MB)."""
DEFAULT_MIN_AGE_S = 600.0
"""An artifact written, loaded or leased this recently is never collected (`--cache-min-age`):
another process may be about to load it, or use it without this process knowing. It must
exceed the collect interval, or a lease would lapse between two passes."""
COLLECT_INTERVAL_S = 60.0
"""How often a process leases what it holds and collects (at most; see `collect_interval`)."""
MIN_COLLECT_INTERVAL_S = 0.25
"""A floor: a pass lists the folder, so it never runs in a tight loop."""
STALE_TEMP_S = 3600.0
"""A temp file this old is a crashed write's leftover (a write takes seconds at most)."""
ENGINE_FOLDER_RE = re.compile(r"[0-9a-f]{16}")
"""`engine_fingerprint`'s names: the only folders beside ours a pass may collect from."""
PRIVATE_MODE = 0o700
"""The engine's cache folder: the server's uid alone may list, read or write it."""


@dataclass(frozen=True, slots=True)
class CompiledModule:
    sha256: str  # of the module's binary (WAT is converted first)
    size: int  # bytes of the binary
    module: wasmtime.Module
    compile_s: float  # time to compile or, on a cache hit, to verify and load
    cache_hit: bool


def to_binary(source: bytes, *, name: str) -> bytes:
    """The module's binary: `.wat` text is converted; anything else must be a binary."""
    if source[:4] == b"\0asm":
        return source
    if name.endswith(".wat") or source.lstrip()[:1] == b"(":
        try:
            return wasmtime.wat2wasm(source.decode("utf-8"))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise ModuleRejected(f"{name}: invalid WebAssembly text: {first}") from exc
    return source


class ArtifactCache:
    """A folder of compiled artifacts for one engine, safe to share between processes."""

    def __init__(
        self,
        directory: Path,
        engine: wasmtime.Engine,
        engine_settings: str,
        code: CodeSettings = SERVING_CODE,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_age_s: float = DEFAULT_MIN_AGE_S,
        bucket: ArtifactBucket | None = None,
        keys: ArtifactKeys | None = None,
    ) -> None:
        """`code`: the settings `engine` was built with that change code (compiler.py).
        `bucket` and `keys`: the store's shared artifacts, used only with both (artifacts.py)."""
        self.fingerprint = engine_fingerprint(engine, engine_settings)
        self.directory = directory / self.fingerprint
        self.shared = SharedArtifacts(bucket, keys, self.fingerprint) if bucket and keys else None
        self.usable = _private_folder(self.directory)
        self.engine = engine
        self.max_bytes = max_bytes
        self.min_age_s = min_age_s
        self._sizes: dict[str, int] = {}  # sha256 -> bytes of its artifact, once stored or read
        self._over_bound = False  # the last pass could not get under max_bytes (logged once)
        self.code = code
        self._locks: dict[str, threading.Lock] = {}
        # Modules loaded by this process, while anything uses them: 1,000 tenants serving
        # the same module verify and map its artifact once.
        self._in_memory: weakref.WeakValueDictionary[str, wasmtime.Module] = (
            weakref.WeakValueDictionary()
        )
        self._locks_guard = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.compiled = 0  # modules this process compiled (not found here nor in the store)
        self.collected = 0  # artifacts deleted: unused for min_age_s, or evicted over max_bytes

    def load(
        self,
        binary: bytes,
        *,
        name: str,
        limits: CompileLimits = DEFAULT_COMPILE_LIMITS,
        not_cached: bool = False,
    ) -> CompiledModule:
        """Compile `binary` within `limits` (the tenant's policy), or load its verified
        artifact. A module over the policy's bounds is refused even if another tenant's
        upload compiled it already. `not_cached`: `load_cached` just found no valid artifact,
        here nor in the store (a corrupt one is then neither verified nor counted twice, and
        the store is not asked twice). Raises ModuleRejected."""
        check_compile_bounds(binary, limits, name=name)
        digest = hashlib.sha256(binary).hexdigest()
        with self._lock_for(digest):
            started = time.perf_counter()
            if not not_cached:
                cached = self._cached(digest, len(binary), started) or self._downloaded(
                    digest, len(binary), started
                )
                if cached is not None:
                    return cached
            self.misses += 1
            module = self._from_claimed(digest)
            from_store = module is not None
            if module is None:
                module = self._compile(binary, digest, name=name, limits=limits)
            compile_s = time.perf_counter() - started
            self._in_memory[digest] = module
            return CompiledModule(digest, len(binary), module, compile_s, from_store)

    def _downloaded(self, digest: str, size: int, started: float) -> CompiledModule | None:
        """The module from the store's verified artifact (then kept in this cache too), or
        None: no store, or no valid artifact there yet."""
        if self.shared is None:
            return None
        module = self._download(self.shared, digest)
        if module is None:
            return None
        self.misses += 1
        self._in_memory[digest] = module
        return CompiledModule(digest, size, module, time.perf_counter() - started, True)

    def _download(self, shared: SharedArtifacts, digest: str) -> wasmtime.Module | None:
        """Stream the store's artifact of `digest` into this cache while it is verified, then
        map it: the transfer, the MAC, the write and the checksum overlap, and nothing is
        loaded before the whole artifact checks. None if there is none or it is refused."""
        if not self.usable:
            artifact = shared.fetch(digest)
            return None if artifact is None else self._deserialize(digest, artifact)
        with _Download(self.directory / f"{digest}{ARTIFACT_SUFFIX}") as download:
            if not shared.fetch_into(digest, download.write):
                return None
            if not download.commit():  # the disk failed: load it from memory
                return self._deserialize(digest, download.joined())
        try:
            write_atomically(
                self._paths(digest)[1],
                json.dumps({"size": download.size, "crc32": download.crc32}).encode(),
            )
            fsync_directory(self.directory)
        except OSError as exc:  # without its record it is rebuilt later, never trusted
            log.warning("could not store the record of artifact %s: %s", digest[:16], exc)
        else:
            self._note_stored(digest, download.size)
        try:
            return wasmtime.Module.deserialize_file(self.engine, str(download.path))
        except wasmtime.WasmtimeError as exc:  # sealed by us, yet refused: an engine mismatch
            log.warning("shared artifact %s did not load (%s); compiling", digest[:16], exc)
            return None

    def _deserialize(self, digest: str, artifact: memoryview | bytes) -> wasmtime.Module | None:
        try:
            return self._keep(digest, artifact)
        except wasmtime.WasmtimeError as exc:  # sealed by us, yet refused: an engine mismatch
            log.warning("shared artifact %s did not load (%s); compiling", digest[:16], exc)
            return None

    def _from_claimed(self, digest: str) -> wasmtime.Module | None:
        """When another pod holds the claim on compiling `digest`, the module from its
        artifact once published; None (compile here) with no store, with the claim won, or
        when the claimer did not finish."""
        if self.shared is None or self.shared.claim(digest):
            return None
        log.info("module %s: another pod is compiling it; waiting", digest[:16])
        artifact = self.shared.await_other(digest)
        return None if artifact is None else self._deserialize(digest, artifact)

    def _compile(
        self, binary: bytes, digest: str, *, name: str, limits: CompileLimits
    ) -> wasmtime.Module:
        """Compile in a child process (compiler.py), keep the artifact here and publish it to
        the store; the store's claim on it is released whatever happens."""
        try:
            artifact = COMPILER.compile(binary, name=name, settings=self.code, limits=limits)
        except BaseException:
            if self.shared is not None:
                self.shared.release(digest)
            raise
        self.compiled += 1
        if self.shared is not None:
            self.shared.publish(digest, artifact)
        return self._keep(digest, artifact)

    def _keep(self, digest: str, artifact: bytes | memoryview) -> wasmtime.Module:
        """Store a verified artifact locally and load it: mapped from the stored file, as every
        later load is (no copy; the pod's workers share its pages), or from memory if it could
        not be stored. Raises WasmtimeError if wasmtime refuses it."""
        self._store_artifact(digest, artifact)
        return self._load_artifact(digest) or wasmtime.Module.deserialize(
            self.engine, bytes(artifact)
        )

    def load_cached(self, digest: str, *, size: int) -> CompiledModule | None:
        """The verified artifact of the module whose SHA-256 is `digest`, or None.

        For a caller that knows the digest without reading the module: a content-addressed
        file, verified when it was written. A 20 MB module then loads without being read,
        from this cache or else from the store's shared artifact (authenticated by the MAC,
        which names `digest`): only a module found in neither needs its bytes, to compile.
        """
        with self._lock_for(digest):
            started = time.perf_counter()
            return self._cached(digest, size, started) or self._downloaded(digest, size, started)

    def _cached(self, digest: str, size: int, started: float) -> CompiledModule | None:
        module = self._in_memory.get(digest) or self._load_artifact(digest)
        if module is None:
            return None
        self._in_memory[digest] = module
        self.hits += 1
        return CompiledModule(digest, size, module, time.perf_counter() - started, True)

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(digest, threading.Lock())

    def _paths(self, digest: str) -> tuple[Path, Path]:
        return (
            self.directory / f"{digest}{ARTIFACT_SUFFIX}",
            self.directory / f"{digest}{RECORD_SUFFIX}",
        )

    def _load_artifact(self, digest: str) -> wasmtime.Module | None:
        if not self.usable:
            return None
        artifact, record_path = self._paths(digest)
        try:
            record = json.loads(record_path.read_bytes())
            expected_size, expected_crc = int(record["size"]), int(record["crc32"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("artifact record %s is unreadable; rebuilding", record_path)
            self.rebuilt += 1
            return None
        try:
            with artifact.open("rb") as file:
                if os.fstat(file.fileno()).st_size != expected_size:
                    raise ValueError("size differs from its record")
                if _file_crc32(file) != expected_crc:
                    raise ValueError("checksum differs from its record")
            _stamp_last_use(artifact)  # before it maps: a concurrent pass sees it in use
            module = wasmtime.Module.deserialize_file(self.engine, str(artifact))
            self._sizes[digest] = expected_size
            return module
        except (OSError, ValueError, wasmtime.WasmtimeError) as exc:
            log.warning("artifact %s rejected (%s); rebuilding", artifact.name, _reason(exc))
            self.rebuilt += 1
            return None

    def _store_artifact(self, digest: str, data: bytes | memoryview) -> None:
        if not self.usable:
            return
        artifact, record_path = self._paths(digest)
        record = {"size": len(data), "crc32": zlib.crc32(data)}
        try:
            write_atomically(artifact, data)
            write_atomically(record_path, json.dumps(record).encode())
            fsync_directory(self.directory)
        except OSError as exc:  # a read-only or full cache costs speed, not service
            log.warning("could not store artifact %s: %s", artifact.name, exc)
            return
        self._note_stored(digest, len(data))

    def _note_stored(self, digest: str, size: int) -> None:
        """After an artifact of `size` bytes is in place (under `digest`'s lock): count it,
        stamp its first use, and evict over the bound. Whatever writes an artifact calls it."""
        self._sizes[digest] = size
        _stamp_last_use(self._paths(digest)[0])  # the clock of every later use: exact LRU order
        self._evict_over_bound(_scan(self.directory), held=self._held())

    # Bounds and collection -------------------------------------------------------------------

    def artifact_bytes(self, digest: str) -> int:
        """Bytes the artifact of `digest` takes in the cache, as this process stored or read it
        (0 if it never did: an artifact that could not be stored takes no disk)."""
        return self._sizes.get(digest, 0)

    def collect_interval(self) -> float:
        """Seconds between passes: well inside `min_age_s`, so leases never lapse."""
        return min(COLLECT_INTERVAL_S, max(MIN_COLLECT_INTERVAL_S, self.min_age_s / 4))

    def collect(self) -> int:
        """One pass: lease what this process holds, delete what nobody used for `min_age_s`,
        then evict over `max_bytes`. Returns the artifacts deleted. Blocking; never raises
        OSError (a pass that cannot list the folder deletes nothing)."""
        if not self.usable:
            return 0
        held = self._held()
        for digest in held:
            _stamp_last_use(self._paths(digest)[0])
        entries = _scan(self.directory)
        old_before = time.time_ns() - int(self.min_age_s * 1e9)
        deleted = 0
        for digest, entry in list(entries.items()):
            unused = digest not in held and entry.last_use_ns < old_before
            if unused and self._remove(digest, entry):
                deleted += 1
                del entries[digest]
        deleted += self._evict_over_bound(entries, held=held)
        return deleted + self._collect_other_engines(old_before)

    def _held(self) -> set[str]:
        """Digests this process holds a module of (list() snapshots the weak mapping)."""
        return set(list(self._in_memory.keys()))

    def _collect_other_engines(self, old_before_ns: int) -> int:
        """Artifacts of other engine builds (an older wasmtime, other settings) that nobody
        used since `old_before_ns`; a folder goes once it has been empty as long. Processes of
        that build, sharing the folder, lease theirs as this one does."""
        deleted = 0
        try:
            with os.scandir(self.directory.parent) as listing:
                folders = [
                    Path(item.path)
                    for item in listing
                    if ENGINE_FOLDER_RE.fullmatch(item.name)
                    and item.name != self.directory.name
                    and item.is_dir(follow_symlinks=False)
                    and item.stat(follow_symlinks=False).st_uid == os.geteuid()
                ]
        except OSError:
            return 0
        for folder in folders:
            for digest, entry in _scan(folder).items():
                if entry.last_use_ns < old_before_ns and all(
                    _unlink(folder / f"{digest}{suffix}")
                    for suffix in (RECORD_SUFFIX, ARTIFACT_SUFFIX)
                ):
                    deleted += 1
            with contextlib.suppress(OSError):
                if os.lstat(folder).st_mtime_ns < old_before_ns:  # emptied a pass ago, at least
                    folder.rmdir()  # fails unless empty
        return deleted

    def _evict_over_bound(self, entries: dict[str, _Entry], *, held: set[str]) -> int:
        """Delete artifacts this process does not hold, least recently used first, until the
        folder is within `max_bytes`. Returns how many were deleted."""
        total = sum(entry.bytes for entry in entries.values())
        deleted = 0
        by_last_use = sorted(entries.items(), key=lambda item: (item[1].last_use_ns, item[0]))
        for digest, entry in by_last_use:
            if total <= self.max_bytes:
                break
            if digest not in held and self._remove(digest, entry):
                total -= entry.bytes
                deleted += 1
        over = total > self.max_bytes
        if over and not self._over_bound:
            log.warning(
                "artifact cache %s holds %d bytes of artifacts in use, over its bound of %d"
                " (--cache-max-bytes): raise it, or lower tenants' max_artifact_bytes",
                self.directory,
                total,
                self.max_bytes,
            )
        self._over_bound = over
        return deleted

    def _remove(self, digest: str, seen: _Entry) -> bool:
        """Delete one artifact and its record, unless it was used since `seen` was taken.

        Under its lock, without waiting: a digest being loaded or stored in this process now
        is in use. The record goes first: a reader then finds a plain miss.
        """
        lock = self._lock_for(digest)
        if not lock.acquire(blocking=False):
            return False
        try:
            artifact, record_path = self._paths(digest)
            if digest in self._in_memory:
                return False
            try:
                if os.stat(artifact).st_mtime_ns != seen.last_use_ns:
                    return False  # loaded, leased or rewritten since the scan
            except FileNotFoundError:
                pass  # a record alone
            except OSError:
                return False
            if not (_unlink(record_path) and _unlink(artifact)):
                return False
            self._sizes.pop(digest, None)
            self.collected += 1
            log.info("artifact %s collected (%d bytes)", digest[:16], seen.bytes)
            return True
        finally:
            lock.release()


@dataclass(slots=True)
class _Entry:
    """One digest's files as a pass saw them: bytes of artifact and record, last use (mtime)."""

    bytes: int = 0
    last_use_ns: int = 0


def _scan(folder: Path) -> dict[str, _Entry]:
    """Every artifact in `folder` with its bytes and last use; old temp files removed."""
    entries: dict[str, _Entry] = {}
    stale_before = time.time_ns() - int(STALE_TEMP_S * 1e9)
    try:
        with os.scandir(folder) as listing:
            for item in listing:
                digest, suffix = os.path.splitext(item.name)
                try:
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue  # deleted meanwhile
                if suffix == TEMP_SUFFIX:
                    if info.st_mtime_ns < stale_before:
                        _unlink(Path(item.path))
                    continue
                if suffix not in (ARTIFACT_SUFFIX, RECORD_SUFFIX) or not _DIGEST_RE.fullmatch(
                    digest
                ):
                    continue  # not an artifact: the routes cache shares the folder
                entry = entries.setdefault(digest, _Entry())
                entry.bytes += info.st_size
                if suffix == ARTIFACT_SUFFIX:
                    entry.last_use_ns = info.st_mtime_ns
                elif entry.last_use_ns == 0:
                    entry.last_use_ns = info.st_mtime_ns  # a record alone: a torn write
    except OSError as exc:
        log.warning("artifact cache %s could not be listed: %s", folder, exc)
    return entries


def _private_folder(folder: Path) -> bool:
    """Create `folder` (and its parent, if missing) 0700, or check an existing one is private.

    True if the cache may use it. One owned by this uid but open to others is made 0700 (a
    wider umask or an operator's chmod); one that is a link, not a folder, or another uid's
    is refused: its artifacts would be native code someone else could have written.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_MODE)
        folder.mkdir(exist_ok=True, mode=PRIVATE_MODE)
        info = os.lstat(folder)
    except OSError as exc:  # a read-only cache costs speed, not service
        log.warning("artifact cache %s unusable (%s); compiling every module", folder, exc)
        return False
    if not stat.S_ISDIR(info.st_mode):
        log.error(
            "artifact cache %s is not a folder (a link?): not used; compiling every module", folder
        )
        return False
    if info.st_uid != os.geteuid():
        log.error(
            "artifact cache %s belongs to uid %d, not this server's (%d): not used, compiling"
            " every module; the cache must be writable by the server alone",
            folder,
            info.st_uid,
            os.geteuid(),
        )
        return False
    if info.st_mode & 0o077:
        try:
            os.chmod(folder, PRIVATE_MODE)
        except OSError as exc:
            log.error(
                "artifact cache %s is open to other users (mode %o) and could not be made"
                " private (%s): not used; compiling every module",
                folder,
                stat.S_IMODE(info.st_mode),
                exc,
            )
            return False
        log.warning(
            "artifact cache %s was open to other users (mode %o); made private (0700): only"
            " the server may write compiled artifacts",
            folder,
            stat.S_IMODE(info.st_mode),
        )
    return True


class _Download:
    """An artifact being written to `path` as it arrives: a temp file beside it (named as
    `files.write_atomically` names its own, so a crash's leftover is collected the same way)
    and its CRC-32, renamed into place by `commit` once the store's MAC checked it. Its pieces
    are kept too: if the disk fails, the artifact still loads from memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.crc32 = 0
        self._pieces: list[memoryview] = []
        self._file: BinaryIO | None = None
        self._temp: Path | None = None
        try:
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            log.warning("could not store artifact %s: %s", path.name, exc)
            return
        self._temp = Path(temp)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> _Download:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()
        if self._temp is not None:  # not committed: unverified, or the disk failed
            self._temp.unlink(missing_ok=True)

    def write(self, piece: memoryview) -> None:
        """Take one piece (never raises: a failing disk only means loading from memory)."""
        self._pieces.append(piece)
        self.size += len(piece)
        self.crc32 = zlib.crc32(piece, self.crc32)
        if self._file is not None:
            try:
                self._file.write(piece)
            except OSError as exc:
                log.warning("could not store artifact %s: %s", self.path.name, exc)
                self._close()

    def commit(self) -> bool:
        """Put the written artifact in place; False if the disk failed.

        Not fsync'd (8-10 ms for 18 MB, on a first request's path): the store keeps the
        artifact, and the record written after it holds its size and CRC-32, checked at every
        load, so an artifact torn by a power cut costs a download, never a bad load."""
        if self._file is None or self._temp is None:
            return False
        try:
            self._file.flush()
            self._close()
            os.replace(self._temp, self.path)
        except OSError as exc:
            log.warning("could not store artifact %s: %s", self.path.name, exc)
            return False
        self._temp = None
        return True

    def joined(self) -> bytes:
        return b"".join(self._pieces)

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def _stamp_last_use(artifact: Path) -> None:
    """Set the artifact's mtime to now: its last use (a metadata write, no data)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):  # gone, or a read-only cache: it is then simply older
        os.utime(artifact, ns=(now, now))


def _unlink(path: Path) -> bool:
    """True if `path` is gone (deleted now, or already)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not delete %s: %s", path.name, exc)
        return False
    return True


def _file_crc32(file: BinaryIO) -> int:
    """CRC-32 of a whole file, through a memory map: no copy of the artifact is made."""
    if os.fstat(file.fileno()).st_size == 0:
        return zlib.crc32(b"")
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return zlib.crc32(mapped)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
