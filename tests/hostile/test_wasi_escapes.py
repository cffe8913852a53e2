"""WASI escapes a guest tries from its sandbox, kept as regression tests (hostile review).

A guest gets read-only preopens for its tenant's volumes and nothing else: no other file,
no socket, stdin to read and stdout/stderr to write. A hostile review tried to get out of
that through WASI and could not; these tests keep its probes, so that a change to the
sandbox (supervisor/sandbox.py, supervisor/wasmtime_ext.py), to how volumes are resolved
(supervisor/tenants.py) or a wasmtime upgrade that reopens one of them fails here.

One guest (guests/escape_probes.wat), in one request, tries each escape and answers one
line per probe with the WASI errno it got, or "opened" and the first bytes of the file:
`..` out of the volume, a link in the volume to a folder outside it, a link to an absolute
path outside it, opening for writing or creating in the read-only volume, socket calls on
the volume's fd and on a made-up fd, writing stdin and reading stdout, and enumerating the
preopens. The same request reads a file inside the volume, so a broken guest (or a volume
that is not there) fails the tests rather than passing them by errno.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

GUESTS = Path(__file__).parent / "guests"
GUEST = "escape_probes.wat"
SECRET_BESIDE = "beside-the-volume: 5f1c0e"
"""In the tenant's folder, one level above the volume (`../secret.txt`)."""
SECRET_OUTSIDE = "outside-the-tenant: 9a7d33"
"""In a folder outside the tenants' tree, that links in the volume point to."""
HELLO = "hello from the volume"

FILE_SYSTEM_ESCAPES = ("traversal", "traversal-deep", "symlink-dir", "symlink-abs")
WRITES = ("write-existing", "create", "write-volume-fd")
SOCKETS_AND_STDIO = (
    "sock-accept-volume",
    "sock-accept-bogus",
    "sock-recv-volume",
    "sock-recv-bogus",
    "write-stdin",
    "read-stdout",
)


@dataclass
class Probes:
    status: int
    body: str
    results: dict[str, str]  # probe -> "errno N" | "opened ..." | "ok"
    preopens: list[str]  # "preopen N NAME" lines
    volume: Path


async def run_probes(workspace, start_supervisor) -> Probes:
    """Set up the tenant, its volume, the links and secrets; run the guest once."""
    folder = workspace.add_tenant("t")
    shutil.copyfile(GUESTS / GUEST, folder / GUEST)
    (folder / "modules.toml").write_text(
        f'[[module]]\nroute = "/probe"\nmodule = "{GUEST}"\nvolumes = {{ "/static" = "static" }}\n'
    )
    (folder / "secret.txt").write_text(SECRET_BESIDE)
    volume = folder / "static"
    volume.mkdir()
    (volume / "hello.txt").write_text(HELLO)
    outside = workspace.root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET_OUTSIDE)
    os.symlink(outside, volume / "link")  # a folder outside, by absolute path
    os.symlink(outside / "secret.txt", volume / "abs")  # a file outside, by absolute path

    running = await start_supervisor()
    response = await running.client.get("/t/probe")
    results, preopens = {}, []
    for line in response.text.splitlines():
        if line.startswith("preopen "):
            preopens.append(line)
        elif ": " in line:
            probe, _, result = line.partition(": ")
            results[probe] = result
    return Probes(response.status_code, response.text, results, preopens, volume)


def assert_failed_with_errno(probes: Probes, names: tuple[str, ...]) -> None:
    for name in names:
        result = probes.results.get(name)
        assert result is not None, f"probe {name} did not report:\n{probes.body}"
        assert result.startswith("errno "), f"probe {name} escaped: {result!r}"
        assert int(result.removeprefix("errno ")) != 0, name


async def test_the_guest_runs_and_reads_its_volume(workspace, start_supervisor):
    """The control: without it, a guest that never ran its probes would pass the rest."""
    probes = await run_probes(workspace, start_supervisor)
    assert probes.status == 200, probes.body
    assert probes.results.get("legit") == f"opened {HELLO}", probes.body


async def test_no_path_leaves_the_volume_by_dot_dot_or_by_links(workspace, start_supervisor):
    probes = await run_probes(workspace, start_supervisor)
    assert probes.results.get("legit") == f"opened {HELLO}", probes.body
    assert_failed_with_errno(probes, FILE_SYSTEM_ESCAPES)
    assert SECRET_BESIDE not in probes.body
    assert SECRET_OUTSIDE not in probes.body


async def test_the_volume_is_read_only(workspace, start_supervisor):
    probes = await run_probes(workspace, start_supervisor)
    assert probes.results.get("legit") == f"opened {HELLO}", probes.body
    assert_failed_with_errno(probes, WRITES)
    assert sorted(os.listdir(probes.volume)) == ["abs", "hello.txt", "link"]
    assert (probes.volume / "hello.txt").read_text() == HELLO


async def test_sockets_and_stdio_tricks_fail_with_an_errno(workspace, start_supervisor):
    probes = await run_probes(workspace, start_supervisor)
    assert probes.status == 200, probes.body  # an errno each, not a trap
    assert probes.results.get("legit") == f"opened {HELLO}", probes.body
    assert_failed_with_errno(probes, SOCKETS_AND_STDIO)
    assert "stdin!" not in probes.body  # what was written to fd 0 never reaches the response


async def test_only_the_volume_is_preopened(workspace, start_supervisor):
    probes = await run_probes(workspace, start_supervisor)
    assert probes.status == 200, probes.body
    assert probes.preopens == ["preopen 3 /static"], probes.body
