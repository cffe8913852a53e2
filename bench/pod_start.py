"""A new pod's cost (issue 11): exec to the first 200, and memory with many tenants.

Every figure is measured in one run, beside the floor it is compared with, measured just
before each store's rows (median of 5 or more): the bare import time of the serving
dependencies as issue 11 defines it,
`python -c "import trio, h11, wasmtime, prometheus_client, nats"` (nats-py: the NATS store's
client, which a pod on NATS imports).

- exec of `wasm-supervisor serve` to the first `200` on a hello route, the module's artifact
  already stored (the file store's shared artifact cache is the pod's disk cache, so "artifact
  in the store, empty local cache" is this case), with `--workers 1` and `--workers 2`, and
  with 1,000 tenants against one; the same with no artifact (compiled on the first request),
  for comparison;
- resident memory of a worker serving 10,000 tenants after their policies and modules.toml
  are read (per-tenant metadata), then after 100 of them, each with a module of its own,
  have served a request (loaded modules, within `--module-cache-bytes`).

With `--store nats` (or `both`, the default) the same on a NATS store: a real nats-server
(Debian's, unpacked by `make test` into .cache/nats) holds the tenants' uploads (the hello
module uploaded through the admin API of a `file:` pod, its manifest copied to the other
tenants, then `wasm-supervisor store copy` into NATS) and the hello module's artifact, sealed
with an `--artifact-key-file` key (published by a warm-up pod); each measured pod starts with
an empty `--cache`, so it reads every manifest from the KV bucket (one watch) and fetches,
verifies and deserializes the artifact on the first request. The pod's tenants folder holds
no modules.toml: every route is an upload. The 10,000 tenants' memory is measured the same
way, the 100 active ones with an upload of their own.

    .venv/bin/python bench/pod_start.py [--runs 3] [--store file|nats|both] [--work DIR]

The server's own modules are byte-compiled first (`compileall`), as `pip install` does in the
image (deploy/Containerfile): with PYTHONDONTWRITEBYTECODE set and no `__pycache__`, each start
would compile ~30 modules from source (~110 ms more here).

Targets: <= 1.5x the floor with --workers 1, <= 2x with --workers 2, 1,000 tenants at most
150 ms more than one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELLO = (REPO / "tenants" / "demo" / "hello.wat").read_text()
FLOOR_IMPORTS = "import trio, h11, wasmtime, prometheus_client, nats"
POLL_S = 0.002
METRICS_POLL_S = 0.1
"""Between scrapes of /metrics while a pod builds its tenants: each scrape takes the event loop
(and the GIL) from the build for a few ms; polled every 20 ms, 10,000 tenants took 60% longer."""
NATS_SERVER = REPO / ".cache" / "nats" / "usr" / "sbin" / "nats-server"
TOKEN = "pod-start-benchmark-operator-token"
ARTIFACT_KEY = "bench:pod-start-benchmark-artifact-key-0123456789"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
ACTIVE = 100
MANY = 10_000


def floor_s(runs: int) -> float:
    """Median wall time of the bare imports, in a fresh interpreter each time."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR_IMPORTS], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def lay_out(root: Path, tenants: int, *, distinct: int = 0) -> None:
    """`tenants` tenants t0.. each serving /hello; the first `distinct` with a module of their
    own (different text), the others a copy of one hello module."""
    for folder in ("tenants", "policies"):
        (root / folder).mkdir(parents=True)
    for index in range(tenants):
        folder = root / "tenants" / f"t{index}"
        folder.mkdir()
        text = HELLO if index >= distinct else HELLO.replace("hello from wasm", f"hello {index}")
        (folder / "hello.wat").write_text(text)
        (folder / "modules.toml").write_text('[[module]]\nroute = "/hello"\nmodule = "hello.wat"\n')
        (root / "policies" / f"t{index}.toml").write_text("")


@contextlib.contextmanager
def serving(root: Path, cache: Path, workers: int, *extra: str) -> Iterator[tuple]:
    """Start `serve` (the operator's admin token set); yield (process, port, started_at);
    SIGTERM it at the end."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "supervisor.cli",
        "serve",
        f"--listen=127.0.0.1:{port}",
        f"--tenants={root / 'tenants'}",
        f"--policies={root / 'policies'}",
        f"--cache={cache}",
        f"--workers={workers}",
        "--log-format=text",
        *extra,
    ]
    env = {**os.environ, "SUPERVISOR_ADMIN_TOKEN": TOKEN}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield process, port, started
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def until_200(port: int, path: str, process: subprocess.Popen) -> None:
    deadline = time.perf_counter() + START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(OSError, IndexError, ValueError):
            if get(port, path)[0] == 200:
                return
        time.sleep(POLL_S)
    raise RuntimeError(f"no 200 on {path} within {START_TIMEOUT_S} s")


def exec_to_200(
    root: Path,
    cache: Path,
    workers: int,
    runs: int,
    *extra: str,
    warm_up: bool = True,
    keep_cache: bool = True,
) -> float:
    """Median exec-to-first-200 on /t0/hello; after one warm-up run (which stores the
    artifact) unless not `warm_up`; the cache emptied before each run unless kept."""
    times = []
    if warm_up:
        with serving(root, cache, workers, *extra) as (process, port, _):
            until_200(port, "/t0/hello", process)
    for _ in range(runs):
        if not keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        with serving(root, cache, workers, *extra) as (process, port, started):
            until_200(port, "/t0/hello", process)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def metric(port: int, name: str) -> float:
    _, body = get(port, "/metrics")
    match = re.search(rf"^{name} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def memory_with_many_tenants(root: Path, cache: Path, *extra: str) -> dict[str, float]:
    """A pod of `MANY` tenants laid out in `root`: seconds to /healthz 200 and until every
    tenant is built (it builds them while it serves), RSS then and after `ACTIVE` of them
    (t0.., a module each) served a request."""
    metrics_port = free_port()
    with serving(root, cache, 1, f"--metrics-listen=127.0.0.1:{metrics_port}", *extra) as (
        process,
        port,
        started,
    ):
        until_200(port, "/healthz", process)
        ready_s = time.perf_counter() - started
        deadline = started + START_TIMEOUT_S
        while metric(metrics_port, "wasm_supervisor_tenants") != MANY:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{MANY} tenants not built within {START_TIMEOUT_S} s")
            time.sleep(METRICS_POLL_S)
        built_s = time.perf_counter() - started
        metadata = rss_bytes(process.pid)
        for index in range(ACTIVE):
            status, _ = get(port, f"/t{index}/hello", timeout_s=60)
            assert status == 200, (index, status)
        served = rss_bytes(process.pid)
        return {
            "ready_s": ready_s,
            "built_s": built_s,
            "rss_read_mib": metadata / 2**20,
            "rss_served_mib": served / 2**20,
            "loaded": metric(metrics_port, "wasm_supervisor_loaded_modules"),
            "loaded_mib": metric(metrics_port, "wasm_supervisor_loaded_module_bytes") / 2**20,
        }


@contextlib.contextmanager
def nats_server(work: Path) -> Iterator[str]:
    """A nats-server with JetStream on a free 127.0.0.1 port; yields its URL."""
    if not NATS_SERVER.exists():
        sys.exit(f"{NATS_SERVER} is missing: run `make test` once (it unpacks nats-server)")
    port = free_port()
    log_path = work / "nats.log"
    command = [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(work / "js")]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.perf_counter() + START_TIMEOUT_S
        while b"Server is ready" not in log_path.read_bytes():
            if process.poll() is not None or time.perf_counter() > deadline:
                sys.exit(f"nats-server did not start:\n{log_path.read_text()}")
            time.sleep(POLL_S)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(STOP_TIMEOUT_S)


def upload(port: int, tenant: str, text: str) -> None:
    """PUT `text` as tenant's module `hello` on route /hello through the admin API."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/_admin/v1/tenants/{tenant}/modules/hello?route=/hello",
        data=text.encode(),
        method="PUT",
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=START_TIMEOUT_S) as response:
        assert response.status in (200, 201), response.status


def lay_out_in_store(root: Path, tenants: int, url: str, prefix: str, *, distinct: int = 0) -> None:
    """`tenants` tenants t0.. whose /hello is an upload held by the NATS store at `url`
    (buckets named `prefix`...): the first `distinct` a module of their own, the others the
    hello module. `root` gets their policies and empty tenant folders (no modules.toml)."""
    seed = root / "seed"
    uploaded = max(distinct, 1)
    for folder in (root / "tenants", root / "policies", seed / "tenants", seed / "policies"):
        folder.mkdir(parents=True)
    for index in range(uploaded):
        (seed / "tenants" / f"t{index}").mkdir()
        (seed / "policies" / f"t{index}.toml").write_text("")
    with serving(seed, seed / "cache", 1) as (process, port, _):
        until_200(port, "/healthz", process)
        for index in range(uploaded):
            text = (
                HELLO if index >= distinct else HELLO.replace("hello from wasm", f"hello {index}")
            )
            upload(port, f"t{index}", text)
    for index in range(uploaded, tenants):  # the same manifest and bytes as t0's
        shutil.copytree(seed / "tenants" / "t0", seed / "tenants" / f"t{index}")
    copy = [sys.executable, "-m", "supervisor.cli", "store", "copy", f"file:{seed / 'tenants'}"]
    subprocess.run(
        [*copy, url, f"--store-prefix={prefix}"],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for index in range(tenants):
        (root / "tenants" / f"t{index}").mkdir()
        (root / "policies" / f"t{index}.toml").write_text("")
    shutil.rmtree(seed)


def print_rows(store: str, floor: float, rows: list[tuple[str, float]]) -> None:
    print(f'{store}: floor `python -c "{FLOOR_IMPORTS}"` just before: {floor * 1000:.0f} ms')
    print(f"| {store}: exec to the first 200 on /t0/hello | median | x floor |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1000:.0f} ms | {seconds / floor:.2f} |")
    one = next(seconds for label, seconds in rows if label == "1 tenant, --workers 1")
    many = next(seconds for label, seconds in rows if label.startswith("1,000"))
    print(f"{store}: 1,000 tenants minus one: {(many - one) * 1000:+.0f} ms")


def print_memory(store: str, many: dict[str, float]) -> None:
    print(
        f"{store}: {MANY:,} tenants, --workers 1: ready (/healthz 200) in {many['ready_s']:.2f} s,"
        f" every tenant built in {many['built_s']:.2f} s;"
        f" RSS {many['rss_read_mib']:.0f} MiB with their metadata read, no module loaded;"
        f" {many['rss_served_mib']:.0f} MiB after {ACTIVE} of them (a module each) served:"
        f" {many['loaded']:.0f} modules loaded, {many['loaded_mib']:.1f} MiB of artifacts"
        " (within --module-cache-bytes, 1 GiB)"
    )


def file_store(work: Path, runs: int) -> None:
    floor = floor_s(max(runs, 5))
    one, thousand = work / "one", work / "thousand"
    lay_out(one, 1)
    lay_out(thousand, 1000)
    rows = [
        ("1 tenant, --workers 1", exec_to_200(one, work / "c1", 1, runs)),
        ("1 tenant, --workers 2", exec_to_200(one, work / "c2", 2, runs)),
        ("1,000 tenants, --workers 1", exec_to_200(thousand, work / "c3", 1, runs)),
        (
            "1 tenant, --workers 1, no artifact (compiled on the first request)",
            exec_to_200(one, work / "c4", 1, runs, warm_up=False, keep_cache=False),
        ),
    ]
    print_rows("file", floor, rows)
    many = work / "many"
    lay_out(many, MANY, distinct=ACTIVE)
    print_memory("file", memory_with_many_tenants(many, work / "many-cache"))


def nats_store(work: Path, runs: int) -> None:
    work.mkdir(parents=True)
    key_file = work / "artifact.key"
    key_file.write_text(ARTIFACT_KEY + "\n")
    with nats_server(work) as url:
        one, thousand, many = work / "one", work / "thousand", work / "many"
        lay_out_in_store(one, 1, url, "one")
        lay_out_in_store(thousand, 1000, url, "thousand")
        lay_out_in_store(many, MANY, url, "many", distinct=ACTIVE)

        def store(prefix: str) -> list[str]:
            return [f"--store={url}", f"--store-prefix={prefix}", f"--artifact-key-file={key_file}"]

        # The warm-up run publishes the artifact; every measured run starts with no cache.
        floor = floor_s(max(runs, 5))
        rows = [
            (
                "1 tenant, --workers 1",
                exec_to_200(one, work / "c1", 1, runs, *store("one"), keep_cache=False),
            ),
            (
                "1 tenant, --workers 2",
                exec_to_200(one, work / "c2", 2, runs, *store("one"), keep_cache=False),
            ),
            (
                "1,000 tenants, --workers 1",
                exec_to_200(thousand, work / "c3", 1, runs, *store("thousand"), keep_cache=False),
            ),
        ]
        print_rows("nats", floor, rows)
        print_memory("nats", memory_with_many_tenants(many, work / "many-cache", *store("many")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", choices=["file", "nats", "both"], default="both")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pod-start-"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "supervisor")], check=True)
    if args.store in ("file", "both"):
        file_store(work / "file", args.runs)
    if args.store in ("nats", "both"):
        nats_store(work / "nats", args.runs)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
