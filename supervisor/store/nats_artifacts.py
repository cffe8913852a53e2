"""Shared artifacts in NATS JetStream: an Object Store bucket, and a KV bucket for claims.

The `nats:` store's `artifacts.ArtifactBucket`. Sealed artifacts are objects named
`<fingerprint>/<sha256>` in an Object Store bucket; a compile claim is the key
`<fingerprint>.<sha256>`, made with `KeyValue.create` (create-only: exactly one of the pods
racing gets it) in a KV bucket whose `ttl` is the claims' lifetime, so the claim of a pod that
died expires with no one to delete it. While its holder lives, a claim is renewed a few times
per lifetime (a compare-and-set on the revision it wrote), so a compile that outlasts the
lifetime (a 99 MB runtime at nice 19 on a busy node) is not started again by another pod; it
is dropped, by the same compare-and-set, when the compile ends.

Calls go through the process's `NatsConnection` (nats_client.py) from worker threads. Any
failure (NATS unreachable, a call timing out, a JetStream error) becomes `BucketUnavailable`,
which costs the pod a compile, never service. nats is imported only where the `nats:` store is
used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)

from ..artifacts import CLAIM_TTL_S, BucketUnavailable
from .nats_client import NatsConnection, StoreUnavailable

__all__ = ["NatsArtifactBucket"]

log = logging.getLogger("supervisor.artifacts")

DEFAULT_PREFIX = "wasm-supervisor"
"""The store's bucket prefix (`--store-prefix`): `<prefix>-artifacts` (Object Store) and
`<prefix>-artifact-claims` (KV), beside the store's `<prefix>-manifests` and `-modules`."""
TRANSFER_TIMEOUT_S = 60.0
"""One artifact's upload or download: a 100 MB runtime's artifact over a slow link."""
CLAIM_CALL_TIMEOUT_S = 5.0
"""A claim or a lookup: one small message each way."""

CHUNK_BYTES = 1024 * 1024
"""Object chunks written here, as the store's module bytes (nats_store.py): nats-py's default
of 128 KiB makes 140 messages of an 18 MB artifact, and a pull fetch of 1 MiB chunks took
26-29 ms where 128 KiB ones took 35-49 ms (issue 11). Chunks are published without headers,
so 1 MiB fits nats-server's default max_payload (1 MiB)."""
STREAM_BATCH = 4
"""Chunks asked for per pull request. A request returns once all of them are here, so a few
MiB at a time lets the caller store and verify while the rest is in transit, for one more
round trip per 4 MiB."""
CONSUMER_IDLE_S = 30.0
"""A download's ephemeral consumer is removed by the server after this long unused (if the pod
died mid-download)."""
RENEWALS_PER_TTL = 4
"""A held claim is rewritten this often per lifetime: one or two renewals lost to a slow or
briefly absent server still leave it standing."""

T = TypeVar("T")


@dataclass(slots=True)
class _Held:
    """A claim this process holds: the KV revision it last wrote, and the task renewing it."""

    revision: int
    renewal: asyncio.Task | None = None


class NatsArtifactBucket:
    """`artifacts.ArtifactBucket` over JetStream. Every method blocks: worker threads only."""

    def __init__(
        self,
        connection: NatsConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        replicas: int = 1,
        claim_ttl_s: float = CLAIM_TTL_S,
    ) -> None:
        self._connection = connection
        self._names = (f"{prefix}-artifacts", f"{prefix}-artifact-claims")
        self._replicas = replicas
        self._claim_ttl_s = claim_ttl_s
        self._handles: tuple[Any, Any, Any] | None = None  # (jetstream, objects, claims)
        self._held: dict[str, _Held] = {}  # claim key -> its state; touched on the loop only
        self._feeding: set[asyncio.Task] = set()  # transfers in progress (`read`)
        connection.on_connect(self._open)

    async def _open(self) -> None:
        """Open the buckets at every (re)connection, so that a new pod's first download, on
        its first request's path, does not wait for two more lookups (~10 ms)."""
        with contextlib.suppress(nats.errors.Error):  # the first call that needs them retries
            await self._buckets()

    async def _buckets(self) -> tuple[Any, Any]:
        """The Object Store and KV handles, opened (created, file-backed, if absent) once per
        JetStream context."""
        js = self._connection.jetstream
        if self._handles is None or self._handles[0] is not js:
            bucket, claims_bucket = self._names
            try:
                objects = await js.object_store(bucket)
            except nats.js.errors.NotFoundError:
                objects = await js.create_object_store(
                    bucket,
                    config=ObjectStoreConfig(
                        bucket=bucket, storage=StorageType.FILE, replicas=self._replicas
                    ),
                )
            try:
                claims = await js.key_value(claims_bucket)
            except nats.js.errors.NotFoundError:
                claims = await js.create_key_value(
                    KeyValueConfig(
                        bucket=claims_bucket,
                        ttl=self._claim_ttl_s,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self._replicas,
                    )
                )
            self._handles = (js, objects, claims)
        return self._handles[1], self._handles[2]

    def _call(self, make_coro: Callable[[], Awaitable[T]], timeout: float) -> T:
        try:
            return self._connection.call(make_coro, timeout=timeout)
        except (StoreUnavailable, nats.errors.Error) as exc:
            raise BucketUnavailable(f"NATS: {exc}") from exc

    def get(self, name: str) -> bytes | None:
        pieces = self.read(name)
        return None if pieces is None else b"".join(pieces)

    def read(self, name: str) -> Generator[bytes, None, None] | None:
        """The object's chunks as they arrive, fetched with a pull consumer.

        nats-py's `ObjectStore.get` reads through a push consumer and joins chunks with `+=`:
        780-870 ms for an 18 MB artifact (issue 11). Here a task on the store's loop pulls
        `STREAM_BATCH` chunks a request and hands each to the caller's thread through a queue,
        so the caller verifies and stores one while the next are in transit. The Object
        Store's layout is kept: any client still reads what this one wrote.
        """
        arrived: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()

        async def start() -> bool:
            objects, _ = await self._buckets()
            try:
                info = await objects.get_info(name)
            except nats.js.errors.NotFoundError:
                return False
            task = asyncio.get_running_loop().create_task(self._feed(info, arrived, stop))
            self._feeding.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._feeding.discard)
            return True

        if not self._call(start, CLAIM_CALL_TIMEOUT_S):
            return None
        return _drain(arrived, stop)

    async def _feed(self, info: Any, arrived: queue.SimpleQueue, stop: threading.Event) -> None:
        """Pull the object's chunks into `arrived`, then None (or the error that ended it)."""
        bucket = self._names[0]
        try:
            subscription = await self._connection.jetstream.pull_subscribe(
                f"$O.{bucket}.C.{info.nuid}",
                stream=f"OBJ_{bucket}",
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=CONSUMER_IDLE_S,
                    mem_storage=True,
                    num_replicas=1,
                ),
            )
            try:
                received = 0
                while received < info.chunks and not stop.is_set():
                    wanted = min(STREAM_BATCH, info.chunks - received)
                    messages = await subscription.fetch(batch=wanted, timeout=TRANSFER_TIMEOUT_S)
                    for message in messages:
                        arrived.put(message.data)
                    received += len(messages)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()
            arrived.put(None)  # a short object fails its seal's length check: refused, rebuilt
        except asyncio.CancelledError:
            arrived.put(BucketUnavailable("NATS: the connection closed mid-transfer"))
            raise
        except Exception as exc:
            arrived.put(exc)

    def put(self, name: str, data: bytes) -> None:
        async def put() -> None:
            objects, _ = await self._buckets()
            meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
            await objects.put(name, bytes(data), meta=meta)

        self._call(put, TRANSFER_TIMEOUT_S)

    def delete(self, name: str) -> None:
        async def delete() -> None:
            objects, _ = await self._buckets()
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await objects.delete(name)

        self._call(delete, CLAIM_CALL_TIMEOUT_S)

    def create_claim(self, name: str, ttl_s: float) -> bool:
        """`ttl_s` is ignored: a claim lives the claims bucket's TTL, set at its creation, and
        is renewed until `drop_claim` (or until this process dies)."""

        async def create() -> bool:
            _, claims = await self._buckets()
            key = _claim_key(name)
            try:
                revision = await claims.create(key, b"")
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
            self._hold(key, revision)
            return True

        return self._call(create, CLAIM_CALL_TIMEOUT_S)

    def claimed(self, name: str, ttl_s: float) -> bool:
        async def claimed() -> bool:
            _, claims = await self._buckets()
            try:
                await claims.get(_claim_key(name))
            except nats.js.errors.NotFoundError:  # absent, expired or deleted
                return False
            return True

        return self._call(claimed, CLAIM_CALL_TIMEOUT_S)

    def drop_claim(self, name: str) -> None:
        """Stop renewing the claim and delete it, unless it lapsed and another pod took it."""

        async def drop() -> None:
            key = _claim_key(name)
            held = self._held.pop(key, None)
            if held is None:
                return
            if held.renewal is not None:
                held.renewal.cancel()
            _, claims = await self._buckets()
            with contextlib.suppress(
                nats.js.errors.NotFoundError, nats.js.errors.KeyWrongLastSequenceError
            ):
                await claims.delete(key, last=held.revision)

        self._call(drop, CLAIM_CALL_TIMEOUT_S)

    def _hold(self, key: str, revision: int) -> None:
        """Record a claim just created and start renewing it (on the loop)."""
        previous = self._held.pop(key, None)
        if previous is not None and previous.renewal is not None:
            previous.renewal.cancel()
        held = _Held(revision)
        held.renewal = asyncio.get_running_loop().create_task(self._renew(key, held))
        self._held[key] = held

    async def _renew(self, key: str, held: _Held) -> None:
        """Rewrite the claim every lifetime / RENEWALS_PER_TTL while it is held. Each renewal
        is a compare-and-set on the revision this process wrote last, so a claim that lapsed
        (NATS away longer than its lifetime) and was taken by another pod is never taken back;
        one that lapsed and was not taken is created again."""
        interval = self._claim_ttl_s / RENEWALS_PER_TTL
        while self._held.get(key) is held:
            await asyncio.sleep(interval)
            try:
                _, claims = await self._buckets()
                try:
                    held.revision = await claims.update(key, b"", last=held.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    held.revision = await claims.create(key, b"")  # lapsed: take it again
            except nats.js.errors.KeyWrongLastSequenceError:
                log.warning("compile claim %s lapsed and another pod took it", key)
                self._held.pop(key, None)
                return
            except (StoreUnavailable, nats.errors.Error) as exc:  # try again next interval
                log.info("compile claim %s not renewed now (%r)", key, exc)

    def ages(self) -> dict[str, float]:
        async def ages() -> dict[str, float]:
            objects, _ = await self._buckets()
            try:
                infos = await objects.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:  # an empty bucket
                return {}
            now = datetime.datetime.now(datetime.UTC)
            return {
                info.name: (now - created).total_seconds()
                for info in infos
                if not info.deleted and (created := _parse_time(info.mtime)) is not None
            }

        return self._call(ages, TRANSFER_TIMEOUT_S)

    def tidy(self, older_than_s: float) -> None:
        """Nothing to do: claims expire with their bucket's TTL, and a put is atomic."""


def _drain(arrived: queue.SimpleQueue, stop: threading.Event) -> Generator[bytes, None, None]:
    """The chunks `_feed` puts in `arrived`, in the caller's thread; closing it stops the feed."""
    try:
        while True:
            try:
                item = arrived.get(timeout=TRANSFER_TIMEOUT_S)
            except queue.Empty:
                raise BucketUnavailable(f"NATS: no chunk within {TRANSFER_TIMEOUT_S:g} s") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise BucketUnavailable(f"NATS: {item!r}") from item
            yield item
    finally:
        stop.set()


def _claim_key(name: str) -> str:
    return name.replace("/", ".")  # KV keys are subject tokens: `<fingerprint>.<sha256>`


def _parse_time(text: str | None) -> datetime.datetime | None:
    """An object's mtime (RFC 3339; Go clients write nanoseconds, Python takes at most
    microseconds). None if absent or unreadable: such an object is never swept."""
    if not text:
        return None
    head, dot, fraction = text.replace("Z", "+00:00").partition(".")
    if dot:
        digits = len(fraction) - len(fraction.lstrip("0123456789"))
        text = f"{head}.{fraction[:digits][:6]}{fraction[digits:]}"
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
