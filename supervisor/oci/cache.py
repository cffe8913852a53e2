"""`oci:` modules for the tenant registry: pulled, verified and kept on the pod's disk.

Manifests and layers are stored under the pod's cache folder by digest (`sha256/<hex>`), and
checked against that digest again whenever they are read. So:

- a reference by digest is served from disk once pulled: no registry is asked again, and a
  restart does not depend on the registry being up;
- a reference by tag is resolved by the registry each time a tenant is (re)loaded, and pinned
  to the digest it resolved to until the next reload (WAGI caches a tag forever, so a moved
  tag is never seen). The digest is logged. The layer itself is read from disk if it is there.
  The pin is also written down (`tags/<sha256 of the reference>`): when the registry does not
  answer at all, a reload or a restart keeps the digest last resolved, with a warning, instead
  of failing the tenant. A refusal (404, 401) or content that fails verification is not masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from .client import (
    DIGEST,
    Manifest,
    PulledModule,
    PullError,
    RegistryClient,
    RegistryUnreachable,
    parse_manifest,
    sha256_digest,
)
from .reference import InvalidReference, Reference, parse_reference

__all__ = ["PulledModules"]

log = logging.getLogger("supervisor.oci")

TAGS_DIR = "tags"
"""Beside `sha256/`: one file per tag reference, holding the digest it last resolved to."""


class PulledModules:
    """Resolves `oci:` references to module bytes, through a content-addressed disk cache."""

    def __init__(self, directory: Path, *, insecure_registries: Collection[str] = ()) -> None:
        self.directory = directory
        self.insecure_registries = frozenset(insecure_registries)

    def fetch(self, text: str, *, max_bytes: int) -> PulledModule:
        """The module `text` (an `oci:` reference) names now; raises PullError. Blocking."""
        try:
            reference = parse_reference(text)
        except InvalidReference as exc:
            raise PullError(str(exc)) from exc
        if reference.digest is not None:
            pulled = self._from_disk(reference, max_bytes)
            if pulled is not None:
                return pulled
        try:
            pulled = self._pull(reference, max_bytes)
        except RegistryUnreachable:
            pinned = self._pinned(text, reference, max_bytes)
            if pinned is None:
                raise
            log.warning(
                "%s: registry unreachable; serving %s, the digest it last resolved to",
                reference,
                pinned.manifest_digest,
            )
            return pinned
        if reference.digest is None:
            self._write_pin(text, pulled.manifest_digest)
        return pulled

    def stored(self, pulled: PulledModule, *, max_bytes: int) -> PulledModule | None:
        """The module `pulled` resolved to, from disk alone (a lazy load after its tenant was
        loaded: the same content, no registry round trip), or None if it is gone."""
        return self._from_disk(replace(pulled.reference, digest=pulled.manifest_digest), max_bytes)

    def _pull(self, reference: Reference, max_bytes: int) -> PulledModule:
        with RegistryClient(insecure_registries=self.insecure_registries) as client:
            named, image = client.resolve(reference)
            layer = image.wasm_layer(reference)
            content = self._read(layer["digest"])
            if content is None or len(content) > max_bytes:
                content = client.blob(reference, layer, max_bytes=max_bytes)
                self._write(layer["digest"], content)
        for manifest in {named.digest: named, image.digest: image}.values():
            self._write(manifest.digest, manifest.raw)
        if reference.digest is None:
            log.info("%s resolved to %s (layer %s)", reference, named.digest, layer["digest"])
        return PulledModule(reference, named.digest, layer["digest"], layer["mediaType"], content)

    def _from_disk(self, reference: Reference, max_bytes: int) -> PulledModule | None:
        named = image = self._manifest_from_disk(reference)
        if named is not None and named.is_index:
            image = self._manifest_from_disk(named.wasm_entry(reference))
        if image is None or image.is_index:
            return None
        layer = image.wasm_layer(reference)
        content = self._read(layer["digest"])
        if content is None or len(content) > max_bytes:
            return None
        return PulledModule(reference, named.digest, layer["digest"], layer["mediaType"], content)

    def _pin_path(self, text: str) -> Path:
        return self.directory / TAGS_DIR / hashlib.sha256(text.encode()).hexdigest()

    def _pinned(self, text: str, reference: Reference, max_bytes: int) -> PulledModule | None:
        """The module a tag reference was last resolved to, from disk, if all of it is there."""
        if reference.digest is not None:
            return None
        try:
            digest = self._pin_path(text).read_text().strip()
        except OSError:
            return None
        if not DIGEST.fullmatch(digest):
            return None
        pulled = self._from_disk(replace(reference, digest=digest), max_bytes)
        return None if pulled is None else replace(pulled, reference=reference)

    def _write_pin(self, text: str, digest: str) -> None:
        self._write_file(self._pin_path(text), digest.encode())

    def _manifest_from_disk(self, reference: Reference) -> Manifest | None:
        raw = self._read(reference.digest)
        return None if raw is None else parse_manifest(reference, raw)

    def _path(self, digest: str) -> Path:
        algorithm, _, hex_digest = digest.partition(":")
        return self.directory / algorithm / hex_digest

    def _read(self, digest: str) -> bytes | None:
        """The stored content of `digest`, if present and still matching it."""
        try:
            content = self._path(digest).read_bytes()
        except OSError:
            return None
        if sha256_digest(content) != digest:
            log.warning("oci cache: %s does not match its content; pulling it again", digest)
            return None
        return content

    def _write(self, digest: str, content: bytes) -> None:
        """Store verified content atomically; a cache that cannot be written costs pulls."""
        self._write_file(self._path(digest), content)

    def _write_file(self, path: Path, content: bytes) -> None:
        temporary: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as file:
                temporary = file.name
                file.write(content)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("oci cache %s not written: %s", path, exc)
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
