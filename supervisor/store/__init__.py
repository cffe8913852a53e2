"""What the admin API stores per tenant: content-addressed module files and a manifest.

This module holds the manifest (its model, format and parsing) and the file layout's
primitives. The package around it is the store of uploads (`--store`): `uploads.py` the one
interface, `file_store.py` this folder layout behind it, `nats_store.py` NATS JetStream (on
the connection of `nats_client.py`), `settings.py` the flags, `copy.py` `store copy`.

`tenants/<t>/modules.toml` is the operator's hand-written file; the admin API never touches
it. Uploads live beside it:

    tenants/<t>/manifest.json          the named modules, replaced atomically
    tenants/<t>/modules/<sha256>.wasm  each module binary, named by its content
    tenants/<t>/.manifest.lock         flock'd around every read-modify-write

Crash safety comes from ordering: a module file is written (temp file, fsync, rename, fsync
the folder) before any manifest names it, and the manifest itself is replaced the same way,
so a kill -9 at any moment leaves the old manifest or the new one, each pointing only at
complete files. What a crash can leave behind (temp files, module files no manifest names) is
removed by `collect_garbage` under the lock.

Several processes and pods may share one tenants folder (a ReadWriteMany volume): every
read-modify-write of a manifest runs under `manifest_lock`, an exclusive `flock` on the
tenant's lock file. Readers (the registry) take no lock: a rename is atomic.

Manifest format (version 2):

    {"format": 2,
     "modules": {"<name>": {<version>, "previous": <version> | null}},
     "deleted": {"<name>": {<version>, "previous": <version> | null}}}

where a version is `{sha256, size, route, entrypoint, argv, volumes, uploaded_at,
compile_s, declared_routes}`. `deleted` keeps what DELETE removed, so a rollback can bring
it back. `declared_routes` is what the module's `_routes` export printed, run once when the
version was uploaded: `[[pattern, export], ...]` (`[]` without `_routes`), so no load ever
runs guest code to learn a module's routes.

Format 2 grows by adding keys, never by changing one: a reader keeps every key it does not
know, at the top level and in each version, and writes it back unchanged when it rewrites
that entry (old and new revisions share one store during a rolling upgrade; a later one adds
per-version outbound rules, say). A new version an upload makes holds only the keys this
revision knows. A format above 2 is an incompatible change and is refused.

Format 1 is format 2 without `declared_routes`; it is still read (the routes of such a
version are unknown: the registry learns them once per sha256 and caches them, see
tenants.py) and written back as format 2.

The processes of one pod (`serve --workers N`) learn of each other's commits at once through
a `ChangeCounter`, a shared mapped file that the admin API bumps after each commit; other pods
see the folder change on their next poll.

Everything here blocks (but `ChangeCounter.value`): call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .. import policies
from ..errors import ConfigError
from ..files import fsync_directory, write_atomically
from ..outbound.rules import PatternError, parse_allow_list
from ..routing import RouteError, validate_pattern

__all__ = [
    "CHANGES_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "MODULES_DIR",
    "MODULE_NAME_RE",
    "ChangeCounter",
    "DeclaredRoutes",
    "Manifest",
    "ModuleRecord",
    "ModuleVersion",
    "collect_garbage",
    "digest_of",
    "folder_names",
    "manifest_lock",
    "module_path",
    "open_change_counter",
    "parse_allowed_hosts",
    "read_manifest",
    "read_manifest_bytes",
    "store_module",
    "utc_now",
    "write_manifest",
]

log = logging.getLogger("supervisor.store")

MANIFEST_FILE = "manifest.json"
MODULES_DIR = "modules"
LOCK_FILE = ".manifest.lock"
MANIFEST_FORMAT = 2
READABLE_FORMATS = frozenset({1, 2})
CHANGES_FILE = "admin-changes"
"""The `ChangeCounter` file, in the compiled-artifact cache folder: every process of a pod
shares that folder, and tenants can never write it."""

MODULE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A named module: safe in a URL path segment and a file name, never hidden, never `..`."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_KEYS = frozenset(
    {"sha256", "size", "route", "entrypoint", "argv", "volumes", "uploaded_at", "compile_s"}
)
_DECLARED_ROUTES = "declared_routes"
_ALLOWED_HOSTS = "allowed_hosts"
"""A version's outbound HTTP patterns (the upload's `allowed_host=`); absent: no requests."""
_HTTP_MAX_CONCURRENCY = "http_max_concurrency"
"""Outbound responses a guest of the version may hold open at once (the upload's
`http_max_concurrency=`, modules.toml's key); absent: only the policy's caps."""
_OPTIONAL_KEYS = (_ALLOWED_HOSTS, _HTTP_MAX_CONCURRENCY)
"""Keys the admin API always shows (null when unset) but a manifest holds only when set."""
_TOP_KEYS = frozenset({"format", "modules", "deleted"})

DeclaredRoutes = tuple[tuple[str, str], ...]
"""What a module's `_routes` printed: (pattern under the module's route, export) pairs."""
# Temp files of `files.write_atomically` are ".<final name>.<random>.tmp".
_TEMP_RE = re.compile(r"\..+\.tmp")
_MANIFEST_TEMP_RE = re.compile(r"\.manifest\.json\..+\.tmp")


@dataclass(frozen=True, slots=True)
class ModuleVersion:
    """One uploaded version of a named module: its content and how it is served."""

    sha256: str
    size: int
    route: str
    entrypoint: str
    argv: str | None
    volumes: Mapping[str, str]
    uploaded_at: str  # RFC 3339, UTC
    compile_s: float
    declared_routes: DeclaredRoutes | None = None  # None: not known (a format 1 manifest)
    unknown: Mapping[str, Any] = field(default_factory=dict)  # keys of a newer revision
    allowed_hosts: tuple[str, ...] | None = None  # outbound HTTP patterns; None: no requests
    http_max_concurrency: int | None = None  # outbound responses held at once; None: no cap

    def __post_init__(self) -> None:
        object.__setattr__(self, "volumes", MappingProxyType(dict(self.volumes)))
        object.__setattr__(self, "unknown", MappingProxyType(dict(self.unknown)))

    @property
    def module_file(self) -> str:
        """The module's path relative to the tenant's folder."""
        return f"{MODULES_DIR}/{self.sha256}.wasm"

    def serves_like(self, other: ModuleVersion) -> bool:
        """Same content served the same way (an upload that would change nothing)."""
        return (
            self.sha256,
            self.route,
            self.entrypoint,
            self.argv,
            dict(self.volumes),
            self.allowed_hosts,
            self.http_max_concurrency,
        ) == (
            other.sha256,
            other.route,
            other.entrypoint,
            other.argv,
            dict(other.volumes),
            other.allowed_hosts,
            other.http_max_concurrency,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "route": self.route,
            "entrypoint": self.entrypoint,
            "argv": self.argv,
            "volumes": dict(self.volumes),
            "uploaded_at": self.uploaded_at,
            "compile_s": self.compile_s,
            _ALLOWED_HOSTS: None if self.allowed_hosts is None else list(self.allowed_hosts),
            _HTTP_MAX_CONCURRENCY: self.http_max_concurrency,
        }

    def stored(self) -> dict[str, Any]:
        """The version as the manifest holds it: `to_dict` without its unset optional keys,
        its routes, the keys kept."""
        document = {**self.unknown, **self.to_dict()}
        for key in _OPTIONAL_KEYS:
            if document[key] is None:
                del document[key]
        if self.declared_routes is not None:
            document[_DECLARED_ROUTES] = [list(pair) for pair in self.declared_routes]
        return document


@dataclass(frozen=True, slots=True)
class ModuleRecord:
    """A named module: the version served and the one before it (for rollback)."""

    current: ModuleVersion
    previous: ModuleVersion | None = None

    def to_dict(self) -> dict[str, Any]:
        """As the admin API shows it."""
        previous = self.previous.to_dict() if self.previous else None
        return {**self.current.to_dict(), "previous": previous}

    def stored(self) -> dict[str, Any]:
        """As the manifest holds it."""
        previous = self.previous.stored() if self.previous else None
        return {**self.current.stored(), "previous": previous}


@dataclass(frozen=True)
class Manifest:
    """One reading of a tenant's manifest.json; change it with `dataclasses.replace`."""

    modules: Mapping[str, ModuleRecord] = field(default_factory=dict)
    deleted: Mapping[str, ModuleRecord] = field(default_factory=dict)
    unknown: Mapping[str, Any] = field(default_factory=dict)  # top-level keys of a newer revision

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "deleted", MappingProxyType(dict(self.deleted)))
        object.__setattr__(self, "unknown", MappingProxyType(dict(self.unknown)))

    def with_module(self, name: str, record: ModuleRecord) -> Manifest:
        """`name` served as `record`; a tombstone of the same name is dropped."""
        deleted = {key: value for key, value in self.deleted.items() if key != name}
        return dataclasses.replace(self, modules={**self.modules, name: record}, deleted=deleted)

    def without_module(self, name: str, *, keep_deleted: int) -> Manifest:
        """`name` no longer served; kept as a tombstone (the newest `keep_deleted` are kept)."""
        modules = {key: value for key, value in self.modules.items() if key != name}
        deleted = {key: value for key, value in self.deleted.items() if key != name}
        deleted[name] = self.modules[name]
        kept = dict(list(deleted.items())[-keep_deleted:]) if keep_deleted > 0 else {}
        return dataclasses.replace(self, modules=modules, deleted=kept)

    def referenced(self) -> set[str]:
        """The sha256 of every module file some version here names."""
        digests = set()
        for record in (*self.modules.values(), *self.deleted.values()):
            digests.add(record.current.sha256)
            if record.previous is not None:
                digests.add(record.previous.sha256)
        return digests

    def to_json(self) -> bytes:
        document = {
            **self.unknown,
            "format": MANIFEST_FORMAT,
            "modules": {name: record.stored() for name, record in self.modules.items()},
            "deleted": {name: record.stored() for name, record in self.deleted.items()},
        }
        return json.dumps(document, indent=1, sort_keys=False).encode() + b"\n"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def digest_of(module_file: str) -> str | None:
    """The SHA-256 a content-addressed module file is named by (`modules/<sha256>.wasm`)."""
    folder, _, name = module_file.partition("/")
    digest = name.removesuffix(".wasm")
    if folder == MODULES_DIR and name.endswith(".wasm") and _SHA256_RE.fullmatch(digest):
        return digest
    return None


def module_path(tenant_dir: Path, sha256: str) -> Path:
    return tenant_dir / MODULES_DIR / f"{sha256}.wasm"


def read_manifest(tenant_dir: Path) -> Manifest:
    """The tenant's manifest, empty when there is none. Raises ConfigError naming the key."""
    path = tenant_dir / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Manifest()
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from exc
    return read_manifest_bytes(raw, source=str(path))


def read_manifest_bytes(raw: bytes, *, source: str) -> Manifest:
    """A manifest from its JSON; `source` names it in errors. Raises ConfigError."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(source, None, f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
        raise ConfigError(source, "format", "expected a manifest of format 1 or 2")
    sections = {}
    for section in ("modules", "deleted"):
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            raise ConfigError(source, section, "must be an object")
        sections[section] = {
            name: _parse_record(entry, source=source, key=f"{section}.{name}")
            for name, entry in entries.items()
        }
    for section, records in sections.items():
        for name in records:
            if not MODULE_NAME_RE.fullmatch(name):
                raise ConfigError(source, f"{section}.{name}", "not a valid module name")
    unknown = {key: value for key, value in data.items() if key not in _TOP_KEYS}
    return Manifest(sections["modules"], sections["deleted"], unknown)


def _parse_record(entry: object, *, source: str, key: str) -> ModuleRecord:
    if not isinstance(entry, dict):
        raise ConfigError(source, key, "must be an object")
    rest = {name: value for name, value in entry.items() if name != "previous"}
    previous = entry.get("previous")
    return ModuleRecord(
        current=_parse_version(rest, source=source, key=key),
        previous=None
        if previous is None
        else _parse_version(previous, source=source, key=f"{key}.previous"),
    )


def _parse_version(entry: object, *, source: str, key: str) -> ModuleVersion:
    if not isinstance(entry, dict):
        raise ConfigError(source, key, "must be an object")
    missing = sorted(_VERSION_KEYS - set(entry))
    if missing:
        raise ConfigError(source, key, f"missing keys {missing}")
    checks = (
        ("sha256", isinstance(entry["sha256"], str) and _SHA256_RE.fullmatch(entry["sha256"])),
        ("size", isinstance(entry["size"], int) and entry["size"] > 0),
        ("route", isinstance(entry["route"], str)),
        ("entrypoint", isinstance(entry["entrypoint"], str) and entry["entrypoint"]),
        ("argv", entry["argv"] is None or isinstance(entry["argv"], str)),
        ("uploaded_at", isinstance(entry["uploaded_at"], str)),
        ("compile_s", isinstance(entry["compile_s"], int | float)),
    )
    for name, ok in checks:
        if not ok:
            raise ConfigError(source, f"{key}.{name}", f"invalid value {entry[name]!r}")
    try:
        validate_pattern(entry["route"])
    except RouteError as exc:
        raise ConfigError(source, f"{key}.route", str(exc)) from exc
    return ModuleVersion(
        sha256=entry["sha256"],
        size=entry["size"],
        route=entry["route"],
        entrypoint=entry["entrypoint"],
        argv=entry["argv"],
        volumes=policies.parse_volumes(f"{source}: {key}", entry["volumes"]),
        uploaded_at=entry["uploaded_at"],
        compile_s=float(entry["compile_s"]),
        declared_routes=_parse_declared_routes(
            entry.get(_DECLARED_ROUTES), source=source, key=f"{key}.{_DECLARED_ROUTES}"
        ),
        unknown={
            name: value
            for name, value in entry.items()
            if name not in _VERSION_KEYS and name not in (_DECLARED_ROUTES, *_OPTIONAL_KEYS)
        },
        allowed_hosts=parse_allowed_hosts(
            entry.get(_ALLOWED_HOSTS), source=source, key=f"{key}.{_ALLOWED_HOSTS}"
        ),
        http_max_concurrency=_parse_http_max_concurrency(
            entry.get(_HTTP_MAX_CONCURRENCY), source=source, key=f"{key}.{_HTTP_MAX_CONCURRENCY}"
        ),
    )


def parse_allowed_hosts(value: object, *, source: str, key: str) -> tuple[str, ...] | None:
    """A module's `allowed_hosts` (a manifest entry's or a modules.toml one's): patterns as
    the policy's `outbound_hosts` takes them; None when unset."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError(source, key, "must be an array of strings")
    try:
        parse_allow_list(value)
    except PatternError as exc:
        raise ConfigError(source, key, str(exc)) from None
    return tuple(value)


def _parse_http_max_concurrency(value: object, *, source: str, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(source, key, f"must be an integer, at least 1, got {value!r}")
    return value


def _parse_declared_routes(value: object, *, source: str, key: str) -> DeclaredRoutes | None:
    """`[[pattern, export], ...]`, or None (absent: a format 1 version)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and all(isinstance(part, str) and part for part in pair)
        for pair in value
    ):
        raise ConfigError(source, key, "must be a list of [pattern, export] string pairs")
    return tuple((pattern, export) for pattern, export in value)


_MTIME_STEPS_NS = (1, 1_000, 1_000_000, 1_000_000_000, 2_000_000_000)
"""How far past the previous manifest's mtime a new one is set, smallest first, until the
filesystem keeps it: 1 ns where it stores nanoseconds, 1 s on ext4 with 128-byte inodes and
many NFS servers, 2 s on FAT."""


def write_manifest(tenant_dir: Path, manifest: Manifest) -> None:
    """Replace manifest.json atomically and durably. Call under `manifest_lock`.

    Readers (every worker of every pod sharing the folder) reload a tenant when the file's
    (mtime, size, inode) changes. A rename-based write gets the inode the version before the
    previous one freed (ext4 hands it out again), so where timestamps are coarse (1 s on the
    filesystems of `_MTIME_STEPS_NS`; a 4 ms tick on kernels before 6.13) two changes within
    one tick could give the newest manifest the very stat of one a reader already has, and
    that reader would miss both. So the mtime is a revision: each manifest's is above the one
    it replaces, in a step the filesystem keeps (ahead of the clock during a burst of changes
    on a coarse filesystem), and no reader ever holds the stat of a newer manifest.
    """
    path = tenant_dir / MANIFEST_FILE
    try:
        previous_ns: int | None = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        previous_ns = None
    write_atomically(path, manifest.to_json())
    if previous_ns is not None:
        _advance_mtime(path, previous_ns)
    fsync_directory(tenant_dir)


def _advance_mtime(path: Path, previous_ns: int) -> None:
    """Make `path`'s mtime greater than `previous_ns` (it usually is already)."""
    for step in _MTIME_STEPS_NS:
        if os.stat(path).st_mtime_ns > previous_ns:
            return
        target = max(time.time_ns(), previous_ns + step)
        os.utime(path, ns=(target, target))
    if os.stat(path).st_mtime_ns <= previous_ns:
        log.warning("%s: its mtime cannot be advanced: readers may miss this change", path)


def store_module(tenant_dir: Path, binary: bytes) -> str:
    """Write `binary` as modules/<sha256>.wasm, durably, and return its sha256.

    Content-addressed, so a file already there with the right size is that same content (it
    was renamed into place whole); it is not written again.
    """
    digest = hashlib.sha256(binary).hexdigest()
    path = module_path(tenant_dir, digest)
    path.parent.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == len(binary):
            return digest
    write_atomically(path, binary)
    fsync_directory(path.parent)
    return digest


def collect_garbage(tenant_dir: Path, manifest: Manifest) -> list[str]:
    """Remove module files `manifest` doesn't name and temp files a crash left behind.

    Only under `manifest_lock`: then no writer is between writing a module file and naming it
    in the manifest (both happen under the lock), and every temp file is a dead writer's.
    Returns the names removed.
    """
    removed = []
    keep = {f"{digest}.wasm" for digest in manifest.referenced()}
    modules_dir = tenant_dir / MODULES_DIR
    candidates = [(modules_dir, name) for name in folder_names(modules_dir)]
    candidates += [
        (tenant_dir, name) for name in folder_names(tenant_dir) if _MANIFEST_TEMP_RE.fullmatch(name)
    ]
    for folder, name in candidates:
        if name in keep or not (name.endswith(".wasm") or _TEMP_RE.fullmatch(name)):
            continue
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(name)
    return removed


def folder_names(folder: Path) -> list[str]:
    """The names in `folder`; a folder not made yet (a tenant with no uploads) holds none."""
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def manifest_lock(tenant_dir: Path) -> Iterator[None]:
    """Hold the tenant's manifest lock (exclusive `flock`), across processes and pods.

    Blocks until the lock is free: call it from a worker thread. The lock file is never
    deleted (deleting it would let two writers lock two different files).
    """
    tenant_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(tenant_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class ChangeCounter:
    """How many admin changes the processes of this pod committed, in one shared mapped page.

    The admin API bumps it after a commit; a process that sees it move reloads before it
    serves its next request, so every worker serves an upload at once, not at its next poll.
    Reading it is a memory load (no system call), cheap enough for every request. Lost
    increments (two processes bumping at once) do not matter: any movement means "reload".
    """

    _VALUE = struct.Struct("<Q")

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < self._VALUE.size:
                os.ftruncate(fd, self._VALUE.size)
            self._map = mmap.mmap(fd, self._VALUE.size)
        finally:
            os.close(fd)  # the mapping keeps the file

    def value(self) -> int:
        return self._VALUE.unpack_from(self._map)[0]

    def bump(self) -> None:
        self._VALUE.pack_into(self._map, 0, (self.value() + 1) % 2**64)

    def close(self) -> None:
        self._map.close()


def open_change_counter(folder: Path) -> ChangeCounter | None:
    """The pod's change counter in `folder`; None (the other workers then poll) if it can't be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return ChangeCounter(folder / CHANGES_FILE)
    except OSError as exc:
        log.warning(
            "no change counter in %s (%s): workers see uploads at their next poll", folder, exc
        )
        return None
