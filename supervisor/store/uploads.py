"""The interface every store of uploads implements (`--store file:PATH` or `nats://...`).

The admin API and the tenant registry see one interface, so the guarantees issue 10 fixed
(manifest format 2 and its kept keys, routes stored per version, compile never on a request)
hold whichever store holds the uploads:

- `update(tenant, change)` is a compare-and-set on the manifest's revision. `change` gets
  the manifest as stored now and returns the new one (or None: no change); it may raise a
  SupervisorError (Conflict, ModuleRejected...), which is passed on and changes nothing. A
  writer that loses the race re-applies `change` to the manifest that won, up to
  `MAX_CAS_ATTEMPTS` times, so two pods changing one tenant at once never lose an update;
  a change that really conflicts raises Conflict from `change` itself.
- Module bytes are content-addressed by sha256: `put_module`, `get_module` (verifies the
  digest), `has_module`, and `module_path`: a local file holding them, which is what the
  registry loads (the artifact cache is keyed by the same sha256).
- `manifest_dir(tenant)`: a local folder whose `manifest.json` is the tenant's manifest as
  this process last saw it; its `stat` changes when the manifest does, which is what the
  registry's incremental reload watches. `on_change` wakes the registry at once (a watch on
  the store; the file store leaves this to the pod's ChangeCounter and the poll).
- `collect_garbage(min_age_s)`: mark-and-sweep of module bytes no manifest names, sparing
  anything younger than `min_age_s` (an upload's bytes are stored before its manifest names
  them).

Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import Manifest

__all__ = [
    "GC_MIN_AGE_S",
    "MAX_CAS_ATTEMPTS",
    "Change",
    "Stored",
    "UploadStore",
]

MAX_CAS_ATTEMPTS = 64
"""Compare-and-set attempts of one change: 50 writers racing on one tenant each win within
this many tries (every round has a winner), and a change can't spin forever."""
GC_MIN_AGE_S = 3600.0
"""Module bytes younger than this are never swept: an upload stores its bytes, then compiles
for seconds (69 s for a 99 MB runtime) before its manifest names them."""

Change = Callable[[Manifest], Manifest | None]


@dataclass(frozen=True, slots=True)
class Stored:
    """A tenant's manifest and the revision it was read at (0: the tenant has none)."""

    manifest: Manifest
    revision: int


class UploadStore(abc.ABC):
    """Manifests per tenant with a revision, and content-addressed module bytes."""

    url: str

    @abc.abstractmethod
    def read(self, tenant: str) -> Stored:
        """The tenant's manifest now (empty, revision 0, when there is none)."""

    @abc.abstractmethod
    def update(self, tenant: str, change: Change) -> tuple[Manifest, bool]:
        """Apply `change` by compare-and-set; returns the manifest in force and whether it
        changed."""

    @abc.abstractmethod
    def write(self, tenant: str, manifest: Manifest) -> None:
        """Store `manifest` as is, whatever is there (`store copy`; never the admin API)."""

    @abc.abstractmethod
    def put_module(self, tenant: str, binary: bytes) -> str:
        """Store `binary` durably under its sha256 and return it."""

    @abc.abstractmethod
    def get_module(self, tenant: str, sha256: str) -> bytes:
        """The bytes stored under `sha256`, verified. Raises KeyError when absent."""

    @abc.abstractmethod
    def has_module(self, tenant: str, sha256: str) -> bool: ...

    @abc.abstractmethod
    def module_path(self, tenant: str, sha256: str, *, fetch: bool = True) -> Path:
        """A local file holding the module's bytes (fetched first if the store is remote and
        `fetch`); the path, absent, when they are not here."""

    @abc.abstractmethod
    def manifest_dir(self, tenant: str) -> Path:
        """The local folder whose manifest.json is this process's view of the manifest."""

    @abc.abstractmethod
    def tenants(self) -> list[str]:
        """Every tenant that has a manifest."""

    @abc.abstractmethod
    def collect_garbage(self, *, min_age_s: float = GC_MIN_AGE_S) -> list[str]:
        """Remove module bytes no manifest names, older than `min_age_s`; return their names."""

    def on_change(self, listener: Callable[[], None]) -> None:  # noqa: B027 (optional)
        """Call `listener()` (from any thread; it must not block) when a manifest changes."""

    def close(self) -> None:  # noqa: B027 (optional)
        """Release connections and local copies."""


def referenced(manifests: Iterable[Manifest]) -> set[str]:
    """The sha256 of every module some version of these manifests names (the GC's mark)."""
    digests: set[str] = set()
    for manifest in manifests:
        digests |= manifest.referenced()
    return digests
