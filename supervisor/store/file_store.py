"""`--store file:PATH`: the uploads in a folder, one sub-folder per tenant (today's layout).

    PATH/<t>/manifest.json          the manifest (its revision: the file's mtime in ns, which
                                    every write moves forward, see `write_manifest`)
    PATH/<t>/modules/<sha256>.wasm  module bytes, content-addressed per tenant
    PATH/<t>/.manifest.lock         flock'd around every read-modify-write

PATH defaults to the tenants folder, so `make run` and every existing deployment keep their
files where they are. Every update holds the tenant's `flock` (across the processes and pods
that share the folder), so the compare-and-set never loses: the manifest read under the lock
is the one replaced. What the change stored but no manifest names (a refused upload) is
collected under the same lock, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

from ..errors import ConfigError
from ..policies import is_valid_tenant_name
from . import (
    MANIFEST_FILE,
    MODULES_DIR,
    Manifest,
    collect_garbage,
    folder_names,
    manifest_lock,
    module_path,
    read_manifest,
    store_module,
    write_manifest,
)
from .uploads import GC_MIN_AGE_S, Change, Stored, UploadStore, referenced

__all__ = ["FileStore"]


class FileStore(UploadStore):
    """Manifests and module bytes in a folder shared by the pod's processes (or pods)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file:{root}"

    def read(self, tenant: str) -> Stored:
        folder = self.root / tenant
        manifest = read_manifest(folder)
        try:
            revision = os.stat(folder / MANIFEST_FILE).st_mtime_ns
        except FileNotFoundError:
            revision = 0
        return Stored(manifest, revision)

    def update(self, tenant: str, change: Change) -> tuple[Manifest, bool]:
        folder = self.root / tenant
        with manifest_lock(folder):
            manifest = read_manifest(folder)
            try:
                new = change(manifest)
                if new is None:
                    return manifest, False
                write_manifest(folder, new)
            except BaseException:
                # A module file the change stored is named by no manifest: collect it.
                collect_garbage(folder, manifest)
                raise
            collect_garbage(folder, new)
            return new, True

    def write(self, tenant: str, manifest: Manifest) -> None:
        folder = self.root / tenant
        with manifest_lock(folder):
            write_manifest(folder, manifest)

    def put_module(self, tenant: str, binary: bytes) -> str:
        (self.root / tenant).mkdir(parents=True, exist_ok=True)
        return store_module(self.root / tenant, binary)

    def get_module(self, tenant: str, sha256: str) -> bytes:
        try:
            data = module_path(self.root / tenant, sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ConfigError(
                str(module_path(self.root / tenant, sha256)), None, "does not hold its sha256"
            )
        return data

    def has_module(self, tenant: str, sha256: str) -> bool:
        return module_path(self.root / tenant, sha256).is_file()

    def module_path(self, tenant: str, sha256: str, *, fetch: bool = True) -> Path:
        return module_path(self.root / tenant, sha256)

    def manifest_dir(self, tenant: str) -> Path:
        return self.root / tenant

    def tenants(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(
            name
            for name in names
            if is_valid_tenant_name(name) and (self.root / name / MANIFEST_FILE).is_file()
        )

    def collect_garbage(self, *, min_age_s: float = GC_MIN_AGE_S) -> list[str]:
        removed = []
        now = time.time()
        for tenant in self.tenants():
            folder = self.root / tenant
            with manifest_lock(folder):
                keep = referenced([read_manifest(folder)])
                for name in folder_names(folder / MODULES_DIR):
                    digest = name.removesuffix(".wasm")
                    path = folder / MODULES_DIR / name
                    if digest in keep or not name.endswith(".wasm"):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if now - path.stat().st_mtime >= min_age_s:
                            path.unlink()
                            removed.append(f"{tenant}/{name}")
        return removed
