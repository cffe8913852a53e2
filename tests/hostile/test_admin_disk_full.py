"""An admin write on a full disk (issue 10, item 12e).

The tenant's folder is a real 1 MiB tmpfs, filled for real: a disk that is full answers the
API's JSON error, 507 Insufficient Storage, and leaves nothing half-written (the manifest as
it was, no module file or temp file left behind). Mounting needs root (we are root here and
in CI); without it the test is skipped and says why.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import wasmtime
from conftest import DEMO
from test_admin import admin_tenant, bearer, module_url, start_admin, token_of

from supervisor import store

HELLO = bytes(wasmtime.wat2wasm((DEMO / "hello.wat").read_text()))
DISK_BYTES = 1 << 20  # the smallest tmpfs the kernel gives in whole pages: 1 MiB is plenty
FILL_CHUNK = 64 * 1024


@pytest.fixture
def small_disk():
    """`small_disk(folder)` mounts a 1 MiB tmpfs over `folder`, keeping what it held."""
    mounted: list[Path] = []

    def mount(folder: Path) -> None:
        kept = folder.with_name(folder.name + ".kept")
        folder.rename(kept)
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        shutil.copytree(kept, folder, dirs_exist_ok=True)
        shutil.rmtree(kept)

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until the disk refuses one more byte (ENOSPC)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = FILL_CHUNK
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    return filler


def tenant_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize(
    "free_blocks",
    [0, 1],
    ids=["module-write-fails", "module-written-then-manifest-write-fails"],
)
async def test_an_upload_on_a_full_disk_is_a_507_json_error_and_writes_nothing(
    workspace, start_supervisor, small_disk, free_blocks
):
    """With one block free, the new module file fits and the manifest then does not: the
    module file must not stay behind, named by no manifest."""
    folder = admin_tenant(workspace, "acme")
    small_disk(folder)
    running = await start_admin(start_supervisor)
    headers = bearer(token_of("acme"))

    first = await running.client.put(
        module_url("acme", "hello"), params={"route": "/hello"}, content=HELLO, headers=headers
    )
    assert first.status_code == 201, first.text
    manifest = (folder / store.MANIFEST_FILE).read_bytes()

    filler = fill(folder)
    block = os.statvfs(folder).f_frsize
    os.truncate(filler, filler.stat().st_size - free_blocks * block)
    assert os.statvfs(folder).f_bavail == free_blocks
    before = tenant_files(folder)
    other = HELLO + b"\x00\x06\x05other"  # the same code and a custom section: a new module
    response = await running.client.put(
        module_url("acme", "other"), params={"route": "/other"}, content=other, headers=headers
    )
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == 507
    assert "disk" in body["error"] and str(folder) not in body["error"]
    assert (folder / store.MANIFEST_FILE).read_bytes() == manifest
    assert tenant_files(folder) == before  # no module file, no temp file left
    assert (await running.client.get("/acme/hello")).text.strip() == "hello from wasm"

    filler.unlink()  # space again: the same upload goes through
    again = await running.client.put(
        module_url("acme", "other"), params={"route": "/other"}, content=other, headers=headers
    )
    assert again.status_code == 201, again.text
