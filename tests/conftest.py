"""Shared fixtures: a real supervisor on 127.0.0.1 over temp folders, and an httpx client.

`workspace` lays out tenants/, policies/ and a cache in a temp dir; `start_supervisor` runs the
production assembly (`supervisor.app.run`) in the test's nursery and gives back a `Running`
handle with the bound port and an `httpx.AsyncClient` pointed at it.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
import trio

from supervisor import app

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "tests" / "guests"
DEMO = REPO / "tenants" / "demo"
HOSTILE_GUESTS = REPO / "tests" / "hostile" / "guests"


@dataclass
class Workspace:
    root: Path
    tenants: Path = field(init=False)
    policies: Path = field(init=False)
    cache: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tenants = self.root / "tenants"
        self.policies = self.root / "policies"
        self.cache = self.root / "cache"
        for folder in (self.tenants, self.policies, self.cache):
            folder.mkdir(parents=True, exist_ok=True)

    def add_tenant(
        self,
        name: str,
        routes: dict[str, str | tuple[str, dict]] | None = None,
        policy: str = "",
    ) -> Path:
        """Create a tenant: `routes` maps route -> guest file name (from tests/guests or the
        demo), or -> (guest, extra modules.toml keys). `policy` is the policy file's TOML."""
        folder = self.tenants / name
        folder.mkdir(exist_ok=True)
        self.write_policy(name, policy)
        entries = []
        for route, spec in (routes or {}).items():
            guest, extra = (spec, {}) if isinstance(spec, str) else spec
            source = GUESTS / guest if (GUESTS / guest).exists() else DEMO / guest
            shutil.copyfile(source, folder / guest)
            lines = [f'route = "{route}"', f'module = "{guest}"']
            lines += [f"{key} = {_toml_value(value)}" for key, value in extra.items()]
            entries.append("[[module]]\n" + "\n".join(lines))
        (folder / "modules.toml").write_text("\n\n".join(entries) + "\n")
        return folder

    def write_policy(self, name: str, text: str) -> None:
        (self.policies / f"{name}.toml").write_text(textwrap.dedent(text))

    def config(self, **overrides: object) -> app.AppConfig:
        base = app.AppConfig(
            host="127.0.0.1",
            port=0,
            tenants_dir=self.tenants,
            policies_dir=self.policies,
            cache_dir=self.cache,
            handle_signals=False,
            watch_interval_s=0.05,
        )
        return replace(base, **overrides)


def _toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def unpacked_binary(unpacked: Path, name: str) -> Path:
    """The server `make test` unpacked from Debian's package `name` (else `name` on PATH); a
    missing one skips locally and fails in CI, where `make test` should have unpacked it."""
    if unpacked.exists():
        return unpacked
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    if os.environ.get("CI"):
        pytest.fail(f"{unpacked} is missing: `make test` unpacks Debian's {name}")
    pytest.skip(f"{name} not unpacked (run `make test` once, or apt-get {name})")


def add_hostile_tenant(
    workspace: Workspace, name: str, routes: dict[str, str], policy: str = ""
) -> None:
    """A tenant serving guests of tests/hostile/guests (the workspace knows tests/guests)."""
    workspace.add_tenant(name, {}, policy)
    folder = workspace.tenants / name
    entries = []
    for route, guest in routes.items():
        shutil.copyfile(HOSTILE_GUESTS / guest, folder / guest)
        entries.append(f'[[module]]\nroute = "{route}"\nmodule = "{guest}"\n')
    (folder / "modules.toml").write_text("\n".join(entries))


def printing_guest(output: bytes) -> str:
    """WAT of a guest that writes `output` to stdout in one call and returns (every byte is
    written as a WAT escape, so any output will do)."""
    data = "".join(f"\\{byte:02x}" for byte in output)
    return f"""
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{data}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const {len(output)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def leb(value: int) -> bytes:
    """An unsigned LEB128 number, as WebAssembly binaries write sizes and counts."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def section(section_id: int, body: bytes) -> bytes:
    """One section of a hand-built module: its id, its size, then its bytes."""
    return bytes([section_id]) + leb(len(body)) + body


@dataclass
class Running:
    app: app.RunningApp
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
async def start_supervisor(
    workspace: Workspace, nursery: trio.Nursery
) -> AsyncIterator[Callable[..., object]]:
    """`await start_supervisor(**AppConfig overrides)` -> Running; stopped at test end."""
    clients: list[httpx.AsyncClient] = []
    running_apps: list[app.RunningApp] = []

    async def start(**overrides: object) -> Running:
        running = await nursery.start(app.run, workspace.config(**overrides))
        running_apps.append(running)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}", timeout=30)
        clients.append(client)
        return Running(running, client)

    yield start
    for client in clients:
        await client.aclose()
    for running in running_apps:
        running.shutdown.set()
