"""Big guest outputs do not stay resident: a worker gives their buffers back to the system.

Found by the soak (`make soak`): each round of 8 MB responses left a worker ~17 MiB larger,
because glibc's dynamic mmap threshold moved such buffers onto per-thread heaps that keep
freed memory (supervisor/malloc.py). Served by a real `serve` process, whose RSS is read from
/proc: the test process's own allocator is not the one under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import trio
from conftest import Workspace
from test_lifecycle import serve_process

GUESTS = Path(__file__).parent / "guests"
ROUNDS = 6
AT_ONCE = 8
MiB = 1024 * 1024
MAX_GROWTH = 48 * MiB
"""Measured: ~+10 MiB with the threshold fixed, ~+160 MiB without (8 MB outputs)."""


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_a_worker_serving_8_mb_outputs_does_not_keep_them_resident(workspace: Workspace):
    folder = workspace.tenants / "big"
    folder.mkdir()
    shutil.copyfile(GUESTS / "response_head_lines.wat", folder / "lines.wat")
    (folder / "modules.toml").write_text('[[module]]\nroute = "/lines"\nmodule = "lines.wat"\n')
    workspace.write_policy("big", "max_concurrency = 16\n")
    async with (
        serve_process(workspace, extra=["--workers", "1"]) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        assert (await client.get("/big/lines")).status_code == 502  # loaded, and one served
        before = resident_bytes(server.process.pid)
        statuses: list[int] = []

        async def ask() -> None:
            statuses.append((await client.get("/big/lines")).status_code)

        for _ in range(ROUNDS):
            async with trio.open_nursery() as nursery:
                for _ in range(AT_ONCE):
                    nursery.start_soon(ask)
        growth = resident_bytes(server.process.pid) - before
    assert statuses == [502] * (ROUNDS * AT_ONCE)  # each head over the bound: the output cap
    assert growth < MAX_GROWTH, f"RSS grew {growth / MiB:.0f} MiB over {len(statuses)} outputs"
