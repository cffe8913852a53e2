"""`file:` store: every manifest change is seen by the workers watching the folder, even two
changes within one tick of the filesystem's clock.

Workers reload a tenant when its manifest.json's (mtime, size, inode) changes (tenants.py's
`_stat_key`). A manifest is replaced by a rename, and ext4 hands the inode the version before
the previous one freed to the next temp file; on a filesystem with coarse timestamps two
changes within one tick then give the newest manifest the same stat as one a worker already
read, and the worker misses both. A real coarse filesystem: ext4 made with 128-byte inodes
(whole-second timestamps), on a loop device (needs root; skipped where it cannot be mounted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.store import MANIFEST_FILE, ModuleRecord
from supervisor.store.file_store import FileStore
from supervisor.tenants import _stat_key
from tests.test_store_contract import version

IMAGE_BYTES = 8 * 1024 * 1024


@contextlib.contextmanager
def coarse_filesystem(folder: Path) -> Iterator[Path]:
    """A freshly made ext4 with 128-byte inodes (timestamps in whole seconds), mounted."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("mounting a loop filesystem needs root and mkfs.ext4")
    image, mount_point = folder / "coarse.img", folder / "coarse"
    mount_point.mkdir()
    with image.open("wb") as file:
        file.truncate(IMAGE_BYTES)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True
    )
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop filesystem here: {mounted.stderr.strip()}")
    try:
        probe = mount_point / "probe"
        probe.write_bytes(b"x")
        assert probe.stat().st_mtime_ns % 1_000_000_000 == 0, "timestamps are not coarse"
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False, capture_output=True)


@pytest.fixture(params=["ordinary", "whole-seconds"])
def uploads_folder(request, tmp_path: Path) -> Iterator[Path]:
    if request.param == "ordinary":
        yield tmp_path / "uploads"
    else:
        with coarse_filesystem(tmp_path) as mount_point:
            yield mount_point / "uploads"


def test_two_changes_within_one_tick_both_change_what_workers_watch(uploads_folder):
    store = FileStore(uploads_folder)
    binaries = [bytes([0, 97, 115, 109, 1, 0, 0, 0, n]) for n in range(4)]  # one size each
    store.update("acme", lambda m: m.with_module("a", ModuleRecord(version(binaries[0]))))
    manifest_file = str(uploads_folder / "acme" / MANIFEST_FILE)
    seen = [_stat_key(manifest_file)]  # a worker reloads: it keys on this
    revisions = [store.read("acme").revision]
    for binary in binaries[1:]:  # three changes, back to back: within one second
        store.update("acme", lambda m, b=binary: m.with_module("a", ModuleRecord(version(b))))
        key = _stat_key(manifest_file)
        assert key not in seen, f"a change left the manifest with a stat already seen: {key}"
        seen.append(key)
        revisions.append(store.read("acme").revision)
    assert revisions == sorted(set(revisions)), revisions  # each change moves the revision on
    assert store.read("acme").manifest.modules["a"].current.sha256 == version(binaries[3]).sha256
