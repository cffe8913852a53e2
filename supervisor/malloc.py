"""glibc's allocator, told to give large buffers back to the system when they are freed.

A guest's output (up to `max_response_bytes`, 8 MiB by default) is copied a few times on its
way out. glibc serves such a buffer with mmap and returns it on free, but after the first free
it raises its mmap threshold to that size ("dynamic threshold"), so every later buffer of that
size comes from the heap of the thread that asked, and freed heap memory stays with the
process. With guest threads coming and going, each with its own arena, a worker serving big
responses kept ~216 MiB resident where it needed ~60 (320 responses of 8 MB each,
`serve --workers 1`). Fixing the threshold turns the dynamic rule off: buffers over it are
mapped and unmapped every time, which costs a few µs per such buffer and nothing for small
ones.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("supervisor.malloc")

MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's own starting value: buffers from here up are always mapped, never kept."""
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold for this process (call once, at start)."""
    libc = ctypes.CDLL(None)
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: large buffers may stay resident")
