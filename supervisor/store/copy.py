"""`wasm-supervisor store copy SRC DST`: every tenant's uploads from one store to another.

Either direction (`file:tenants` to `nats://...` when a deployment moves to NATS, or back).
For each tenant the module bytes every version names are copied first, verified by their
sha256 on the way, and only then the manifest, as it is (keys of other revisions kept): a
manifest never names bytes the target lacks. What the target holds for other tenants stays.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .settings import StoreSettings
from .uploads import UploadStore

__all__ = ["CopyReport", "copy_store", "copy_urls"]

log = logging.getLogger("supervisor.store.copy")

CONNECT_S = 5.0
"""How long `store copy` waits for a NATS store before it gives up, naming it."""


@dataclass(slots=True)
class CopyReport:
    tenants: int = 0
    modules: int = 0  # module bytes copied (those the target already held are not)


def copy_store(source: UploadStore, target: UploadStore) -> CopyReport:
    """Copy every tenant's manifest and the module bytes it names. Blocking."""
    report = CopyReport()
    for tenant in source.tenants():
        manifest = source.read(tenant).manifest
        for digest in sorted(manifest.referenced()):
            if not target.has_module(tenant, digest):
                stored = target.put_module(tenant, source.get_module(tenant, digest))
                if stored != digest:  # get_module verified it: a bug if reached
                    raise ConfigError(source.url, tenant, f"module {digest} changed in transit")
                report.modules += 1
        target.write(tenant, manifest)
        report.tenants += 1
        log.info("copied tenant %s (%d modules)", tenant, len(manifest.modules))
    return report


def copy_urls(source: StoreSettings, target: StoreSettings) -> CopyReport:
    """Open both stores (local copies in a temp folder), copy, close."""
    with tempfile.TemporaryDirectory(prefix="store-copy-") as scratch:
        stores = []
        try:
            for index, settings in enumerate((source, target)):
                store = settings.open(Path(scratch) / str(index))
                stores.append(store)
                if not settings.is_file and not store.connection.wait_connected(CONNECT_S):
                    raise ConfigError(
                        settings.url, None, f"unreachable: {store.connection.last_error}"
                    )
            return copy_store(stores[0], stores[1])
        finally:
            for store in stores:
                store.close()
