"""Unknown keys in a WAGI `modules.toml`: a likely typo is an error, anything else a warning.

WAGI ignores keys it does not know, so a file written for it may carry extra ones (its own
example has a top-level `default_host`); refusing them would refuse WAGI users' files. A key
within TYPO_DISTANCE edits of a known one is almost surely a misspelling that would otherwise
silently drop a setting (`entrypiont`), so that one is an error naming the key meant.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger("supervisor.tenants")

TYPO_DISTANCE = 2
"""Edits (insert, delete, substitute) within which an unknown key counts as a typo."""

_warned: set[tuple[str, str]] = set()  # (real path, key) already warned about, per process
_warned_lock = threading.Lock()  # tenants load in threads


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between `a` and `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key within TYPO_DISTANCE of `key` (the nearest, then the first by name)."""
    distance, name = min(((edit_distance(key, name), name) for name in known), default=(99, ""))
    return name if distance <= TYPO_DISTANCE else None


def warn_once(source: str, key: str, reason: str) -> None:
    """Log `reason` for `key` of file `source` the first time only, not on every reload (nor
    again when the file is read through a link, as `wagi` mode reads it)."""
    seen = (os.path.realpath(source), key)
    with _warned_lock:
        if seen in _warned:
            return
        _warned.add(seen)
    log.warning("%s: %s: %s", source, key, reason, extra={"file": source, "key": key})
