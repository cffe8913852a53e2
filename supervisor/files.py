"""Durable file writes: what the artifact cache and the module store both rely on.

A reader (another thread, another pod on the same volume, this process after kill -9) sees
the old file or the whole new one, never a part of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` through a temp file in the same folder: fsync, then rename.

    Temp files are named ".<final name>.<random>.tmp", so a crash leaves only those behind.
    `durable=False` skips the fsync (~3 ms each here), for a copy that is written again from
    its source after any restart: readers still see the old file or the whole new one.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (the entry itself is folder data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
