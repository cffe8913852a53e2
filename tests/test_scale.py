"""Scale: one tenant with 200 modules, and one pod with 1,000 tenants, start and serve.

Each case starts `wasm-supervisor serve` twice on the same folders: cold (empty artifact cache)
and warm (artifacts stored), requests a sample of routes, and prints the startup time and the
resident memory (visible with `-s`, or in the captured output of a failure). No module loads
before the pod is ready: each requested module loads on its first request, compiled when cold,
from its artifact when warm. The assertions are on what was served and on the loads the server
logs; the figures are printed, not asserted, since they depend on the machine.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import httpx
from conftest import DEMO, Workspace
from test_lifecycle import serve_process
from test_reload import greeting_wat

from supervisor.modules import ArtifactCache
from supervisor.sandbox import Sandbox
from supervisor.tenants import TenantRegistry

MODULES = 200
TENANTS = 1000
SAMPLE = 20
"""Routes (or tenants) requested per start: spread over the whole range."""

LOADED = re.compile(
    r"read (?P<tenants>\d+) tenants \((?P<routes>\d+) routes\) in (?P<load_s>[\d.]+)s, "
    r"no module loaded; (?P<errors>\d+) errors"
)
MODULE_LOADED = re.compile(r"module \S+ loaded in [\d.]+ms \((?P<how>compiled|from its artifact)")


@dataclass(frozen=True)
class Start:
    """One start of the server, as its operator sees it."""

    ready_s: float  # spawn to the first 200 from /healthz (includes Python's own start)
    load_s: float  # the registry's first read of policies and tenants, from the server's log
    compiled: int
    hits: int
    rss_mib: float  # after serving the sample

    def __str__(self) -> str:
        return (
            f"ready in {self.ready_s:.2f}s (registry read {self.load_s:.2f}s), modules loaded"
            f" on request: compiled {self.compiled}, from artifacts {self.hits},"
            f" RSS {self.rss_mib:.0f} MiB"
        )


async def start_and_sample(
    workspace: Workspace, expected: dict[str, str], *, tenants: int, routes: int
) -> Start:
    """Start the server, check every path of `expected` answers its body, then stop it."""
    async with serve_process(workspace) as server, httpx.AsyncClient(base_url=server.url) as http:
        for path, body in expected.items():
            response = await http.get(path)
            assert (response.status_code, response.text) == (200, body), path
        rss = server.rss_bytes()
    loaded = LOADED.search(server.log())
    assert loaded, server.log()
    assert (int(loaded["tenants"]), int(loaded["routes"]), int(loaded["errors"])) == (
        tenants,
        routes,
        0,
    )
    return Start(
        ready_s=server.ready_s,
        load_s=float(loaded["load_s"]),
        compiled=[m["how"] for m in MODULE_LOADED.finditer(server.log())].count("compiled"),
        hits=[m["how"] for m in MODULE_LOADED.finditer(server.log())].count("from its artifact"),
        rss_mib=rss / 2**20,
    )


def sample(count: int) -> list[int]:
    """SAMPLE indexes spread evenly over range(count), first and last included."""
    return sorted({round(i * (count - 1) / (SAMPLE - 1)) for i in range(SAMPLE)})


async def test_a_tenant_with_200_modules_starts_and_serves(workspace, capsys):
    folder = workspace.tenants / "big"
    folder.mkdir()
    workspace.write_policy("big", f"max_modules = {MODULES}\n")
    entries = []
    for index in range(MODULES):
        (folder / f"m{index:03}.wat").write_text(greeting_wat(f"module {index}"))
        entries.append(f'[[module]]\nroute = "/m{index}"\nmodule = "m{index:03}.wat"\n')
    (folder / "modules.toml").write_text("\n".join(entries))
    expected = {f"/big/m{index}": f"module {index}\n" for index in sample(MODULES)}

    cold = await start_and_sample(workspace, expected, tenants=1, routes=MODULES)
    warm = await start_and_sample(workspace, expected, tenants=1, routes=MODULES)
    assert (cold.compiled, cold.hits) == (len(expected), 0)  # only what was requested loads
    assert (warm.compiled, warm.hits) == (0, len(expected))
    with capsys.disabled():
        print(f"\n{MODULES} modules, cold: {cold}")
        print(f"{MODULES} modules, warm: {warm}")


async def test_a_pod_with_1000_tenants_starts_and_serves(workspace, capsys):
    hello = (DEMO / "hello.wat").read_bytes()
    for index in range(TENANTS):
        folder = workspace.tenants / f"t{index}"
        folder.mkdir()
        (folder / "hello.wat").write_bytes(hello)
        (folder / "modules.toml").write_text('[[module]]\nroute = "/hello"\nmodule = "hello.wat"\n')
        workspace.write_policy(f"t{index}", "")
    expected = {f"/t{index}/hello": "hello from wasm\n" for index in sample(TENANTS)}

    cold = await start_and_sample(workspace, expected, tenants=TENANTS, routes=TENANTS)
    warm = await start_and_sample(workspace, expected, tenants=TENANTS, routes=TENANTS)
    # One module shared by every tenant: loaded once per start, for every tenant's requests.
    assert (cold.compiled, cold.hits) == (1, 0)
    assert (warm.compiled, warm.hits) == (0, 1)

    # What each file poll costs the running server when nothing changed (every
    # watch_interval_s: 1 s in `serve`), measured in this process on the same folders.
    with Sandbox() as sandbox:
        cache = ArtifactCache(workspace.cache, sandbox.engine, sandbox.settings)
        registry = TenantRegistry(workspace.tenants, workspace.policies, sandbox, cache)
        registry.reload()
        started = time.perf_counter()
        state = registry.reload()
        poll_s = time.perf_counter() - started
    assert len(state.tenants) == TENANTS
    with capsys.disabled():
        print(f"\n{TENANTS} tenants, cold: {cold}")
        print(f"{TENANTS} tenants, warm: {warm}")
        print(f"{TENANTS} tenants, one file poll with nothing changed: {poll_s * 1000:.0f} ms")
