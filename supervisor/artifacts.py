"""Compiled artifacts shared by every pod through the store, authenticated before loading.

A new pod should not compile what another pod compiled already (CPython for WASI: ~3 s; a
99 MB runtime: 69 s). So the first pod that compiles a module publishes the artifact under
(engine fingerprint, module sha256), and every other pod of the same engine downloads,
verifies and deserializes it. Two pods starting together claim the compile with a create-only
key that expires: the loser waits while the claim stands, then takes the artifact, or compiles
itself if the claimer died without publishing.

An artifact is native code that wasmtime maps without checking: write access to the bucket
must never become code execution in every pod. So each artifact is sealed with an
HMAC-SHA256 made with a key from a Secret (`--artifact-key-file` or `$SUPERVISOR_ARTIFACT_KEY`)
and tagged with that key's id. The MAC covers the fingerprint and the module's sha256 too, so
a valid artifact of one module cannot be passed off as another's. The key file may list several
keys: the first seals, all of them open (rotation). An artifact that is missing its seal, has a
wrong one, is truncated or names a key this pod lacks is never deserialized: it is logged,
counted and rebuilt; it is deleted from the bucket only when it claims one of this pod's own
key ids (one this pod cannot judge may be a newer key's, sealed by a newer pod). Without a key
the shared bucket is not used at all.

The bucket is collected by mark-and-sweep: whatever no manifest names any more, and that is
older than a minimum age (so a sweep never races an upload), is deleted.

Backends: `FileArtifactBucket`, a folder shared by pods (the `file:` store's own folder, never
a tenant's), and `store.nats_artifacts.NatsArtifactBucket` (a JetStream Object Store bucket).
Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .files import fsync_directory, write_atomically

__all__ = [
    "ARTIFACT_KEY_ENV",
    "ArtifactBucket",
    "ArtifactKeys",
    "ArtifactRefused",
    "BucketUnavailable",
    "FileArtifactBucket",
    "SharedArtifacts",
    "Unsealer",
    "load_artifact_keys",
]

log = logging.getLogger("supervisor.artifacts")

ARTIFACT_KEY_ENV = "SUPERVISOR_ARTIFACT_KEY"
"""The key list itself, for a Secret mapped to an environment variable."""
MIN_SECRET_CHARS = 32
"""A key shorter than this is refused: 32 characters of `openssl rand -base64 32` carry
~190 bits, well over HMAC-SHA256's 128-bit security target."""
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX16_RE = re.compile(r"[0-9a-f]{16}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

TEMP_SUFFIX = ".tmp"  # files.write_atomically's temp files

_MAGIC = b"WSART1\n\0"
"""Opens every sealed artifact: format 1. Anything else is an unsealed (or foreign) object."""
_HEAD = struct.Struct(">B")  # the key id's length
_LENGTH = struct.Struct(">Q")  # the payload's length: a truncated object is told from a short one
_MAC_BYTES = hashlib.sha256().digest_size
_MAX_SEAL = len(_MAGIC) + _HEAD.size + 255 + _LENGTH.size + _MAC_BYTES
"""The longest seal (a key id's length is one byte): what `Unsealer` buffers at most."""
_DOMAIN = b"wasm-supervisor compiled artifact v1\0"
"""Prefixes every MAC input: a key used for something else never makes a valid seal here."""

CLAIM_TTL_S = 120.0
"""A compile claim lapses after this: a claimer that died frees the compile by then. A NATS
claim is renewed while its holder lives, so a longer compile keeps it; a folder's claim is not,
and a compile that takes longer may then run on a second pod too: wasted, never wrong."""
CLAIM_POLL_S = 0.1
"""How often a pod that lost a claim looks for the artifact (a listing-free read of one key)."""
READ_BLOCK_BYTES = 1024 * 1024
"""A folder bucket's artifact is read in blocks of this, as a store's arrive in chunks."""
DEFAULT_SWEEP_MIN_AGE_S = 3600.0
"""An artifact younger than this is never swept: its manifest may not be committed yet."""


class BucketUnavailable(Exception):
    """The shared bucket cannot be reached now. Like a failing disk, it costs this pod a
    compile, never service: every caller here catches it (with OSError)."""


BUCKET_ERRORS = (OSError, BucketUnavailable)


class ArtifactRefused(Exception):
    """A shared artifact failed authentication. `own_key`: it names one of this pod's key ids
    (so this pod can tell it is bad, and may delete it)."""

    def __init__(self, reason: str, *, own_key: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.own_key = own_key


@dataclass(frozen=True)
class ArtifactKeys:
    """Named HMAC keys: the first seals, all open. `repr` never shows a secret."""

    keys: tuple[tuple[str, bytes], ...]

    def __repr__(self) -> str:
        return f"ArtifactKeys(ids={[key_id for key_id, _ in self.keys]})"

    @property
    def signing_id(self) -> str:
        return self.keys[0][0]

    @classmethod
    def parse(cls, text: str, *, source: str) -> ArtifactKeys:
        """One key a line, `KEY_ID:SECRET`; blank lines and `#` comments are skipped.
        Raises ValueError naming the line that is wrong."""
        keys: list[tuple[str, bytes]] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key_id, colon, secret = line.partition(":")
            key_id, secret = key_id.strip(), secret.strip()
            where = f"{source} line {number}"
            if not colon or not _KEY_ID_RE.fullmatch(key_id):
                raise ValueError(
                    f"{where}: expected KEY_ID:SECRET with a key id of letters, digits, '.', '_'"
                    " or '-' (at most 64)"
                )
            if len(secret) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"{where}: key {key_id!r} is {len(secret)} characters; at least"
                    f" {MIN_SECRET_CHARS} are needed (e.g. `openssl rand -base64 32`)"
                )
            if any(key_id == known for known, _ in keys):
                raise ValueError(f"{where}: key id {key_id!r} is listed twice")
            keys.append((key_id, secret.encode()))
        if not keys:
            raise ValueError(f"{source}: no key (expected lines of KEY_ID:SECRET)")
        return cls(tuple(keys))

    def seal(self, artifact: bytes, *, fingerprint: str, digest: str) -> bytes:
        """`artifact` with its seal: magic, key id, length, MAC, then the artifact itself."""
        key_id, secret = self.keys[0]
        tag = key_id.encode()
        length = _LENGTH.pack(len(artifact))
        mac = _mac(secret, tag, length, artifact, fingerprint=fingerprint, digest=digest)
        return b"".join((_MAGIC, _HEAD.pack(len(tag)), tag, length, mac, artifact))

    def open(self, sealed: bytes, *, fingerprint: str, digest: str) -> memoryview:
        """The artifact inside `sealed` (no copy), once its MAC checks. Raises ArtifactRefused."""
        unsealer = self.unsealer(fingerprint=fingerprint, digest=digest)
        artifact = unsealer.feed(sealed)
        unsealer.finish()
        return artifact

    def unsealer(self, *, fingerprint: str, digest: str) -> Unsealer:
        """An `Unsealer` that opens one sealed artifact piece by piece, as it arrives."""
        return Unsealer(dict(self.keys), fingerprint=fingerprint, digest=digest)


class Unsealer:
    """Opens a sealed artifact fed in pieces: each piece's artifact bytes are handed back at
    once, so a caller can store them while the next piece is still in transit, and the MAC is
    computed along the way. Nothing handed back may be used before `finish` returns: only
    then is the whole artifact authenticated."""

    def __init__(self, secrets: Mapping[str, bytes], *, fingerprint: str, digest: str) -> None:
        self._secrets = secrets
        self._fingerprint = fingerprint
        self._digest = digest
        self._head = bytearray()  # the seal's bytes, until it is complete
        self._mac: hmac.HMAC | None = None  # once the seal is read
        self._key_id = ""
        self._expected_mac = b""
        self._expected_length = 0
        self.length = 0  # artifact bytes fed so far

    def feed(self, piece: bytes | memoryview) -> memoryview:
        """The artifact bytes in `piece` (a view of it, no copy; empty while the seal is
        still incomplete). Raises ArtifactRefused as soon as the seal shows it is bad."""
        view = memoryview(piece)
        if self._mac is None:
            taken = len(self._head)
            self._head += view[: _MAX_SEAL - taken]
            head = self._read_head(final=False)
            if head is None:
                return view[len(view) :]
            view = view[head - taken :]
            self._head = bytearray()
        self._mac.update(view)
        self.length += len(view)
        return view

    def finish(self) -> None:
        """Check the whole artifact's length and MAC. Raises ArtifactRefused."""
        if self._mac is None:  # the object ended inside its seal
            self._read_head(final=True)  # raises, naming what is missing
            raise ArtifactRefused("truncated seal", own_key=False)
        if self._expected_length != self.length:
            raise ArtifactRefused(
                f"truncated: {self.length} of {self._expected_length} bytes", own_key=True
            )
        if not hmac.compare_digest(self._mac.digest(), self._expected_mac):
            raise ArtifactRefused(f"wrong MAC for key id {self._key_id!r}", own_key=True)

    def _read_head(self, *, final: bool) -> int | None:
        """The seal's length once it is all in `_head` (and the MAC started), None while more
        is needed (`final`: nothing more comes, so refuse). Raises ArtifactRefused."""
        head = self._head
        if len(head) < len(_MAGIC) and not final and _MAGIC.startswith(bytes(head)):
            return None
        if bytes(head[: len(_MAGIC)]) != _MAGIC:
            raise ArtifactRefused("not sealed (no artifact seal at its start)", own_key=False)
        at = len(_MAGIC)
        if len(head) < at + _HEAD.size:
            return _more(final, "truncated seal", own_key=False)
        (tag_length,) = _HEAD.unpack_from(head, at)
        at += _HEAD.size
        if len(head) < at + tag_length:
            return _more(final, "truncated seal", own_key=False)
        tag = bytes(head[at : at + tag_length])
        at += tag_length
        key_id = tag.decode("ascii", "replace")
        secret = self._secrets.get(key_id)
        if len(head) < at + _LENGTH.size + _MAC_BYTES:
            return _more(final, f"truncated seal (key id {key_id!r})", own_key=secret is not None)
        if secret is None:
            raise ArtifactRefused(f"sealed with key id {key_id!r}, not one of ours", own_key=False)
        length = bytes(head[at : at + _LENGTH.size])
        at += _LENGTH.size
        self._key_id = key_id
        self._expected_length = _LENGTH.unpack(length)[0]
        self._expected_mac = bytes(head[at : at + _MAC_BYTES])
        self._mac = _mac_over(
            secret, tag, length, fingerprint=self._fingerprint, digest=self._digest
        )
        return at + _MAC_BYTES


def _more(final: bool, reason: str, *, own_key: bool) -> None:
    """More of the seal is needed: None while more may come, else the refusal."""
    if final:
        raise ArtifactRefused(reason, own_key=own_key)
    return None


def _mac(
    secret: bytes,
    tag: bytes,
    length: bytes,
    artifact: bytes | memoryview,
    *,
    fingerprint: str,
    digest: str,
) -> bytes:
    mac = _mac_over(secret, tag, length, fingerprint=fingerprint, digest=digest)
    mac.update(artifact)
    return mac.digest()


def _mac_over(
    secret: bytes, tag: bytes, length: bytes, *, fingerprint: str, digest: str
) -> hmac.HMAC:
    """The MAC of a seal's fields, ready to take the artifact's bytes."""
    mac = hmac.new(secret, _DOMAIN, hashlib.sha256)
    for part in (fingerprint.encode(), b"\0", digest.encode(), b"\0", tag, b"\0", length):
        mac.update(part)
    return mac


def load_artifact_keys(key_file: Path | None, environ: Mapping[str, str]) -> ArtifactKeys | None:
    """The keys from `key_file`, else from `$SUPERVISOR_ARTIFACT_KEY`; None if neither is set.
    Raises ValueError (or OSError) saying what is wrong."""
    if key_file is not None:
        return ArtifactKeys.parse(key_file.read_text(), source=str(key_file))
    text = environ.get(ARTIFACT_KEY_ENV, "")
    if not text.strip():
        return None
    return ArtifactKeys.parse(text, source=f"${ARTIFACT_KEY_ENV}")


class ArtifactBucket(Protocol):
    """Where sealed artifacts live, by name `<fingerprint>/<sha256>`; claims beside them."""

    def get(self, name: str) -> bytes | None: ...
    def read(self, name: str) -> Generator[bytes, None, None] | None:
        """The object's bytes in pieces, each as soon as it is here (None: absent), so a
        caller verifies and stores one while the next is in transit. A caller that stops
        early closes the generator."""
        ...

    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...
    def create_claim(self, name: str, ttl_s: float) -> bool:
        """Create the claim on `name` unless a live one exists (create-only, expiring)."""
        ...

    def claimed(self, name: str, ttl_s: float) -> bool: ...
    def drop_claim(self, name: str) -> None: ...
    def ages(self) -> dict[str, float]:
        """Every stored artifact's name and age in seconds."""
        ...

    def tidy(self, older_than_s: float) -> None:
        """Remove leftovers older than `older_than_s`: crashed writes, lapsed claims."""
        ...


class FileArtifactBucket:
    """A folder shared by pods: `<fingerprint>/<sha256>.sealed`, and `claims/<name>.claim`,
    an empty file whose mtime is the claim's creation. Writes are atomic (temp file, rename);
    a claim is an O_EXCL create, so exactly one process of those racing gets it (two taking
    over one lapsed claim at the same instant may both compile: wasted, never wrong)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.claims = folder / "claims"

    def _path(self, name: str) -> Path:
        fingerprint, digest = _split(name)
        return self.folder / fingerprint / f"{digest}.sealed"

    def _claim_path(self, name: str) -> Path:
        fingerprint, digest = _split(name)
        return self.claims / f"{fingerprint}-{digest}.claim"

    def get(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def read(self, name: str) -> Generator[bytes, None, None] | None:
        try:
            file = self._path(name).open("rb")
        except FileNotFoundError:
            return None
        return _blocks(file)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
        fsync_directory(path.parent)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def create_claim(self, name: str, ttl_s: float) -> bool:
        path = self._claim_path(name)
        self.claims.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a lapsed claim is removed, then the create is tried once more
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                if self.claimed(name, ttl_s):
                    return False
                path.unlink(missing_ok=True)
                continue
            return True
        return False

    def claimed(self, name: str, ttl_s: float) -> bool:
        """A claim lives `ttl_s` from its creation (its mtime): one left by a pod that died,
        however it died, lapses by then."""
        try:
            created = self._claim_path(name).stat().st_mtime
        except FileNotFoundError:
            return False
        return created + ttl_s > time.time()

    def drop_claim(self, name: str) -> None:
        self._claim_path(name).unlink(missing_ok=True)

    def ages(self) -> dict[str, float]:
        now = time.time()
        found: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            for folder in self.folder.iterdir():
                if not _HEX16_RE.fullmatch(folder.name):
                    continue
                for item in folder.glob("*.sealed"):
                    with contextlib.suppress(FileNotFoundError):
                        found[f"{folder.name}/{item.stem}"] = now - item.stat().st_mtime
        return found

    def tidy(self, older_than_s: float) -> None:
        before = time.time() - older_than_s
        leftovers = [*self.claims.glob("*.claim"), *self.folder.glob(f"*/*{TEMP_SUFFIX}")]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < before:
                    path.unlink()


def _blocks(file: BinaryIO) -> Generator[bytes, None, None]:
    with file:
        while block := file.read(READ_BLOCK_BYTES):
            yield block


def _split(name: str) -> tuple[str, str]:
    fingerprint, _, digest = name.partition("/")
    if not (_HEX16_RE.fullmatch(fingerprint) and _SHA256_RE.fullmatch(digest)):
        raise ValueError(f"not an artifact name (fingerprint/sha256): {name!r}")
    return fingerprint, digest


class SharedArtifacts:
    """The artifacts of one engine (`fingerprint`) in a shared bucket, sealed with `keys`."""

    def __init__(
        self,
        bucket: ArtifactBucket,
        keys: ArtifactKeys,
        fingerprint: str,
        *,
        claim_ttl_s: float = CLAIM_TTL_S,
    ) -> None:
        self.bucket = bucket
        self.keys = keys
        self.fingerprint = fingerprint
        self.claim_ttl_s = claim_ttl_s
        self.downloaded = 0  # artifacts taken from the bucket, verified
        self.refused = 0  # artifacts that failed verification: never loaded
        self.published = 0  # artifacts this process compiled and sealed into the bucket
        self.swept = 0  # artifacts deleted by `sweep`
        self._foreign: set[str] = set()  # digests whose artifact claims a key we lack

    def _name(self, digest: str) -> str:
        return f"{self.fingerprint}/{digest}"

    def fetch(self, digest: str) -> memoryview | None:
        """The verified artifact of `digest`, or None (absent, unreachable, or refused)."""
        pieces: list[memoryview] = []
        if not self.fetch_into(digest, pieces.append):
            return None
        return memoryview(b"".join(pieces))

    def fetch_into(self, digest: str, write: Callable[[memoryview], None]) -> bool:
        """Hand the artifact of `digest` to `write` piece by piece, as it arrives from the
        bucket, and authenticate it along the way: storing an 18 MB artifact then overlaps
        its transfer. True once all of it is verified; on False (absent, unreachable or
        refused) what `write` took must be discarded, never loaded. `write` must not raise."""
        name = self._name(digest)
        unsealer = self.keys.unsealer(fingerprint=self.fingerprint, digest=digest)
        try:
            pieces = self.bucket.read(name)
            if pieces is None:
                return False
            with contextlib.closing(pieces):
                for piece in pieces:
                    write(unsealer.feed(piece))
            unsealer.finish()
        except BUCKET_ERRORS as exc:
            log.warning("shared artifact %s unreadable (%s): compiling", digest[:16], exc)
            return False
        except ArtifactRefused as exc:
            self._refuse(name, digest, exc)
            return False
        self.downloaded += 1
        return True

    def _refuse(self, name: str, digest: str, exc: ArtifactRefused) -> None:
        """Count and log a refused artifact; delete it if it claims one of our key ids."""
        self.refused += 1
        if exc.own_key:
            log.error(
                "shared artifact %s refused (%s): never loaded; deleted and rebuilt",
                name,
                exc.reason,
            )
            with contextlib.suppress(*BUCKET_ERRORS):
                self.bucket.delete(name)
        else:
            self._foreign.add(digest)
            log.error(
                "shared artifact %s refused (%s): never loaded; rebuilt here, left in the"
                " bucket (it claims no key of this pod)",
                name,
                exc.reason,
            )

    def claim(self, digest: str) -> bool:
        """True if this process should compile `digest` (it holds the claim, or claims are
        unavailable: compiling twice is better than not at all)."""
        try:
            return self.bucket.create_claim(self._name(digest), self.claim_ttl_s)
        except BUCKET_ERRORS as exc:
            log.warning("could not claim the compile of %s (%s)", digest[:16], exc)
            return True

    def await_other(self, digest: str) -> memoryview | None:
        """While another pod holds the claim on `digest`, wait for its artifact. None: the
        claimer died or failed; compile here. A claim stands while its holder compiles (a
        NATS claim is renewed; a folder's lasts its lifetime) and lapses at most a lifetime
        after its holder died, so this wait ends."""
        name = self._name(digest)
        while True:
            artifact = self.fetch(digest)
            if artifact is not None:
                return artifact
            try:
                if not self.bucket.claimed(name, self.claim_ttl_s):
                    return self.fetch(digest)  # published just before the claim went
            except BUCKET_ERRORS:
                return None
            time.sleep(CLAIM_POLL_S)

    def publish(self, digest: str, artifact: bytes) -> None:
        """Seal `artifact` into the bucket and drop this process's claim. Never raises: a
        bucket that cannot be written costs other pods a compile, not service."""
        name = self._name(digest)
        if digest in self._foreign:  # a pod with a newer key made it: not ours to replace
            self.release(digest)
            return
        try:
            sealed = self.keys.seal(artifact, fingerprint=self.fingerprint, digest=digest)
            self.bucket.put(name, sealed)
            self.published += 1
            log.info(
                "published artifact %s (%d bytes, key %s)",
                name,
                len(artifact),
                self.keys.signing_id,
            )
        except BUCKET_ERRORS as exc:
            log.warning("could not publish artifact %s: %s", name, exc)
        finally:
            self.release(digest)

    def release(self, digest: str) -> None:
        with contextlib.suppress(*BUCKET_ERRORS):
            self.bucket.drop_claim(self._name(digest))

    def sweep(self, live: Iterable[str], *, min_age_s: float = DEFAULT_SWEEP_MIN_AGE_S) -> int:
        """Mark-and-sweep: delete every artifact (of any engine) whose module sha256 is not in
        `live` (every module any manifest names) and that is older than `min_age_s`. Returns
        how many were deleted."""
        marked = set(live)
        deleted = 0
        try:
            ages = self.bucket.ages()
        except BUCKET_ERRORS as exc:
            log.warning("could not list the shared artifacts to sweep them: %s", exc)
            return 0
        for name, age in ages.items():
            if name.partition("/")[2] in marked or age < min_age_s:
                continue
            try:
                self.bucket.delete(name)
            except BUCKET_ERRORS as exc:
                log.warning("could not sweep artifact %s: %s", name, exc)
                continue
            deleted += 1
            log.info("swept shared artifact %s (no manifest names it)", name)
        self.swept += deleted
        try:
            self.bucket.tidy(max(min_age_s, self.claim_ttl_s))
        except BUCKET_ERRORS as exc:
            log.warning("could not tidy the shared artifacts: %s", exc)
        return deleted
