"""`--store URL` and its flags, parsed once; `open_store` builds the store they describe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .file_store import FileStore
from .uploads import UploadStore

__all__ = ["DEFAULT_PREFIX", "StoreSettings"]

DEFAULT_PREFIX = "wasm-supervisor"
"""Bucket names: `<prefix>-manifests` (KV) and `<prefix>-modules` (Object Store)."""
_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where uploads live: a folder (`file:PATH`) or NATS JetStream (`nats://`, `tls://`)."""

    url: str
    credentials: Path | None = None
    replicas: int = 1
    prefix: str = DEFAULT_PREFIX
    ca_file: Path | None = None

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        credentials: Path | None = None,
        replicas: int = 1,
        prefix: str = DEFAULT_PREFIX,
        ca_file: Path | None = None,
    ) -> StoreSettings:
        """Check the URL and flags now, so a typo stops `serve` with a message naming it."""
        if url.startswith("file:"):
            if not url.removeprefix("file:"):
                raise ConfigError("--store", None, "file: needs a folder (file:PATH)")
        else:
            from .nats_client import parse_nats_url

            parse_nats_url(url, credentials=credentials, ca_file=ca_file)
        if not prefix or not set(prefix) <= _PREFIX_CHARS:
            raise ConfigError("--store-prefix", None, f"{prefix!r}: use letters, digits, - and _")
        return cls(url, credentials, replicas, prefix, ca_file)

    @property
    def is_file(self) -> bool:
        return self.url.startswith("file:")

    def open(self, cache_dir: Path) -> UploadStore:
        """The store; a NATS one connects in the background (`cache_dir` holds local copies)."""
        if self.is_file:
            return FileStore(Path(self.url.removeprefix("file:")))
        from .nats_client import parse_nats_url
        from .nats_store import NatsStore

        settings = parse_nats_url(self.url, credentials=self.credentials, ca_file=self.ca_file)
        return NatsStore(settings, cache_dir, replicas=self.replicas, prefix=self.prefix)
