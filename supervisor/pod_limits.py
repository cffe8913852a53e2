"""Pod-wide running counts per tenant, shared by the worker processes of one supervisor.

Admission (admission.py) caps a tenant's running guests per process; with `--workers N` the
cap must hold for the pod, or a tenant with `max_concurrency = 4` could run 4 x N guests. The
supervisor creates one small file (`PodCounters.create`), maps it into every worker
(`PodCounters(path, column)`) and gives each worker its own *column*:

    header      magic, columns, capacity
    keys        capacity x u64   a tenant's 64-bit name hash; 0 = free entry
    counts      capacity x columns x i32   guests running, per tenant and per column

A tenant's pod-wide count is the sum of its row. Each process writes only its own column, so
when a worker dies the supervisor zeroes that column (`clear_column`) and no count leaks;
the new worker gets a clean column. The table is open addressing with linear probing and
entries are never removed (a tenant keeps its entry at zero), so a tenant's entry never moves
and each process looks it up once.

`try_acquire` (check the row's sum against the cap, then add one) holds an exclusive `flock`
on the file: two processes must not both see room for the last guest. `flock` locks belong to
an open file description, so each process opens the file itself, and the kernel drops the
lock of a process that dies holding it. `release` takes no lock: only this process writes its
column, and a reader that sees the count a moment late is only conservative.

Only the worker's trio thread uses a `PodCounters`; it is not thread-safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("supervisor.pod_limits")

MAGIC = b"wsupcnt1"
_HEADER = struct.Struct("<8sII")  # magic, columns, capacity
_KEY = struct.Struct("<Q")
_COUNT_BYTES = 4

DEFAULT_CAPACITY = 1 << 15
"""Tenants the table can hold: every tenant ever admitted keeps its entry. Beyond a few
thousand tenants per pod the registry's reload costs more than anything here; 32,768 leaves
room. A tenant that finds the table full is capped per process only (logged once)."""


def _tenant_key(tenant: str) -> int:
    """A nonzero 64-bit hash of the name: collisions among 2^15 names are ~1e-10 likely."""
    key = int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest(), "little")
    return key or 1


class PodCounters:
    """One process's view of the shared table; `column` is the one it writes (a worker's), or
    None for the supervisor, which only clears the columns of workers that exited."""

    def __init__(self, path: Path, column: int | None) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, self.columns, self.capacity = _HEADER.unpack_from(self._map)
        if magic != MAGIC or (column is not None and not 0 <= column < self.columns):
            self.close()
            raise ValueError(f"{path} is not a pod counter file with column {column}")
        self.column = column
        view = memoryview(self._map)
        keys_end = _HEADER.size + self.capacity * _KEY.size
        self._keys = view[_HEADER.size : keys_end].cast("Q")
        self._counts = view[keys_end:].cast("i")
        self._rows: dict[str, int] = {}  # tenant -> entry index, or -1 if the table is full

    @classmethod
    def create(cls, path: Path, *, columns: int, capacity: int = DEFAULT_CAPACITY) -> None:
        """Write a zeroed table at `path` (the supervisor, before it starts any worker)."""
        size = _HEADER.size + capacity * (_KEY.size + columns * _COUNT_BYTES)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)  # a sparse file of zeros: untouched pages cost nothing
            os.pwrite(fd, _HEADER.pack(MAGIC, columns, capacity), 0)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._map.closed:
            return
        if hasattr(self, "_keys"):
            self._keys.release()
            self._counts.release()
        self._map.close()
        os.close(self._fd)

    def try_acquire(self, tenant: str, max_concurrency: int) -> bool:
        """Count one more running guest of `tenant` unless the pod already runs its cap."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            row = self._row(tenant)
            if row < 0:
                return True  # table full: the per-process cap is all that holds
            start = row * self.columns
            if sum(self._counts[start : start + self.columns]) >= max_concurrency:
                return False
            self._counts[start + self.column] += 1
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def release(self, tenant: str) -> None:
        """One guest of `tenant` acquired by this process has ended."""
        row = self._rows[tenant]
        if row >= 0:
            self._counts[row * self.columns + self.column] -= 1

    def running(self, tenant: str) -> int:
        """The tenant's guests running in the whole pod now."""
        key = _tenant_key(tenant)
        for row in self._probe(key):
            if self._keys[row] == key:
                start = row * self.columns
                return sum(self._counts[start : start + self.columns])
            if self._keys[row] == 0:
                break
        return 0

    def clear_column(self, column: int) -> None:
        """Forget every count of `column` (the supervisor, after its worker has exited)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for row in range(self.capacity):
                if self._keys[row]:
                    self._counts[row * self.columns + column] = 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _row(self, tenant: str) -> int:
        """The tenant's entry, inserted if new (call holding the lock)."""
        row = self._rows.get(tenant)
        if row is not None:
            return row
        key = _tenant_key(tenant)
        row = -1
        for candidate in self._probe(key):
            found = self._keys[candidate]
            if found == key:
                row = candidate
                break
            if found == 0:
                self._keys[candidate] = key
                row = candidate
                break
        else:
            log.warning("pod counter table full: tenant %r is capped per process only", tenant)
        self._rows[tenant] = row
        return row

    def _probe(self, key: int) -> Iterator[int]:
        start = key % self.capacity
        return itertools.chain(range(start, self.capacity), range(start))
