"""Compiled modules: compile once per content and engine settings, load from disk after that.

Compiling is the cold start (about a second per MB); loading a compiled artifact with
`Module.deserialize_file` (mmap) takes milliseconds. An artifact is native code that wasmtime
loads without checking, and a flipped byte loads without error (FACTS.md), so:

- artifacts live in the cache directory only (never under `tenants/`, where tenants write);
- each is written atomically (temp file, fsync, rename, fsync the folder), and its size and
  CRC-32 are recorded beside it *after* it is complete;
- before an artifact is trusted, its size and checksum are checked against that record; a
  mismatch, a missing record or a failed load means it is rebuilt, never loaded.

The checksum guards against corruption (a torn or truncated write, a flipped bit), which is
the threat here: tenants cannot write the cache, and whoever can could rewrite the record as
well, so a cryptographic digest would add nothing but time. CRC-32 over the memory-mapped file
takes ~4.5 ms for CPython's 18 MB artifact where reading it and hashing it with SHA-256 took
~11 ms, over the 10 ms a cold start of that guest may take.

A module is compiled in a child process with the tenant's limits (compiler.py), never in the
worker: the child hands back the serialized artifact, which is stored as above and loaded.

Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import mmap
import os
import platform
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import wasmtime

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

log = logging.getLogger("supervisor.modules")

ARTIFACT_SUFFIX = ".cwasm"
RECORD_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class CompiledModule:
    sha256: str  # of the module's binary (WAT is converted first)
    size: int  # bytes of the binary
    module: wasmtime.Module
    compile_s: float  # time to compile or, on a cache hit, to verify and load
    cache_hit: bool


def engine_fingerprint(engine_settings: str) -> str:
    """Names the cache folder: artifacts only load into an engine built the same way."""
    version = importlib.metadata.version("wasmtime")
    text = f"wasmtime-{version}|{platform.machine()}|{engine_settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    ) -> None:
        """`code`: the settings `engine` was built with that change code (compiler.py)."""
        self.directory = directory / engine_fingerprint(engine_settings)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:  # a read-only cache costs speed, not service
            log.warning("artifact cache %s unusable (%s); compiling every module", directory, exc)
        self.engine = engine
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

    def load(
        self, binary: bytes, *, name: str, limits: CompileLimits = DEFAULT_COMPILE_LIMITS
    ) -> CompiledModule:
        """Compile `binary` within `limits` (the tenant's policy), or load its verified
        artifact. A module over the policy's bounds is refused even if another tenant's
        upload compiled it already. Raises ModuleRejected."""
        check_compile_bounds(binary, limits, name=name)
        digest = hashlib.sha256(binary).hexdigest()
        with self._lock_for(digest):
            started = time.perf_counter()
            cached = self._cached(digest, len(binary), started)
            if cached is not None:
                return cached
            self.misses += 1
            artifact = COMPILER.compile(binary, name=name, settings=self.code, limits=limits)
            self._store_artifact(digest, artifact)
            # Mapped from the stored file once verified, as every later load is (no copy; the
            # pod's workers share its pages); from memory if it could not be stored.
            module = self._load_artifact(digest) or wasmtime.Module.deserialize(
                self.engine, artifact
            )
            compile_s = time.perf_counter() - started
            self._in_memory[digest] = module
            return CompiledModule(digest, len(binary), module, compile_s, False)

    def load_cached(self, digest: str, *, size: int) -> CompiledModule | None:
        """The verified artifact of the module whose SHA-256 is `digest`, or None.

        For a caller that knows the digest without reading the module: a content-addressed
        file, verified when it was written. A 20 MB module then loads without being read.
        """
        with self._lock_for(digest):
            return self._cached(digest, size, time.perf_counter())

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
            return wasmtime.Module.deserialize_file(self.engine, str(artifact))
        except (OSError, ValueError, wasmtime.WasmtimeError) as exc:
            log.warning("artifact %s rejected (%s); rebuilding", artifact.name, _reason(exc))
            self.rebuilt += 1
            return None

    def _store_artifact(self, digest: str, data: bytes) -> None:
        artifact, record_path = self._paths(digest)
        record = {"size": len(data), "crc32": zlib.crc32(data)}
        try:
            write_atomically(artifact, data)
            write_atomically(record_path, json.dumps(record).encode())
            fsync_directory(self.directory)
        except OSError as exc:  # a read-only or full cache costs speed, not service
            log.warning("could not store artifact %s: %s", artifact.name, exc)


def _file_crc32(file: BinaryIO) -> int:
    """CRC-32 of a whole file, through a memory map: no copy of the artifact is made."""
    if os.fstat(file.fileno()).st_size == 0:
        return zlib.crc32(b"")
    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return zlib.crc32(mapped)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
