"""A new pod's cost (issue 11): exec to the first 200, and memory with many tenants.

Every figure is measured in one run, beside the floor it is compared with: the bare import
time of the serving dependencies as issue 11 defines it,
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

    .venv/bin/python bench/pod_start.py [--runs 3] [--work DIR]

The server's own modules are byte-compiled first (`compileall`), as `pip install` does in the
image (deploy/Containerfile): with PYTHONDONTWRITEBYTECODE set and no `__pycache__`, each start
would compile ~30 modules from source (~110 ms more here).

Targets: <= 1.5x the floor with --workers 1, <= 2x with --workers 2, 1,000 tenants at most
150 ms more than one.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HELLO = (REPO / "tenants" / "demo" / "hello.wat").read_text()
FLOOR_IMPORTS = "import trio, h11, wasmtime, prometheus_client, nats"
POLL_S = 0.002
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
    """Start `serve`; yield (process, port, started_at); SIGTERM it at the end."""
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
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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


def exec_to_200(root: Path, cache: Path, workers: int, runs: int, *, keep_cache: bool) -> float:
    """Median exec-to-first-200 on /t0/hello; the cache emptied before each run unless kept
    (after one warm-up run that stores the artifact)."""
    times = []
    if keep_cache:
        with serving(root, cache, workers) as (process, port, _):
            until_200(port, "/t0/hello", process)
    for _ in range(runs):
        if not keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
        with serving(root, cache, workers) as (process, port, started):
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


def memory_with_many_tenants(work: Path) -> dict[str, float]:
    root = work / "many"
    lay_out(root, MANY, distinct=ACTIVE)
    cache = work / "many-cache"
    metrics_port = free_port()
    with serving(root, cache, 1, f"--metrics-listen=127.0.0.1:{metrics_port}") as (
        process,
        port,
        started,
    ):
        until_200(port, "/healthz", process)
        ready_s = time.perf_counter() - started
        metadata = rss_bytes(process.pid)
        for index in range(ACTIVE):
            status, _ = get(port, f"/t{index}/hello", timeout_s=60)
            assert status == 200, (index, status)
        served = rss_bytes(process.pid)
        return {
            "ready_s": ready_s,
            "rss_read_mib": metadata / 2**20,
            "rss_served_mib": served / 2**20,
            "loaded": metric(metrics_port, "wasm_supervisor_loaded_modules"),
            "loaded_mib": metric(metrics_port, "wasm_supervisor_loaded_module_bytes") / 2**20,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pod-start-"))
    one, thousand = work / "one", work / "thousand"
    lay_out(one, 1)
    lay_out(thousand, 1000)

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "supervisor")], check=True)
    floor = floor_s(max(args.runs, 5))
    rows = [
        ("1 tenant, --workers 1", exec_to_200(one, work / "c1", 1, args.runs, keep_cache=True)),
        ("1 tenant, --workers 2", exec_to_200(one, work / "c2", 2, args.runs, keep_cache=True)),
        (
            "1,000 tenants, --workers 1",
            exec_to_200(thousand, work / "c3", 1, args.runs, keep_cache=True),
        ),
        (
            "1 tenant, --workers 1, no artifact (compiled on the first request)",
            exec_to_200(one, work / "c4", 1, args.runs, keep_cache=False),
        ),
    ]
    print(f'floor `python -c "{FLOOR_IMPORTS}"`: {floor * 1000:.0f} ms (median)')
    print("| exec to the first 200 on /t0/hello | median | x floor |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1000:.0f} ms | {seconds / floor:.2f} |")
    print(f"1,000 tenants minus one: {(rows[2][1] - rows[0][1]) * 1000:+.0f} ms")

    many = memory_with_many_tenants(work)
    print(
        f"{MANY:,} tenants, --workers 1: ready (/healthz 200) in {many['ready_s']:.2f} s;"
        f" RSS {many['rss_read_mib']:.0f} MiB with their metadata read, no module loaded;"
        f" {many['rss_served_mib']:.0f} MiB after {ACTIVE} of them (a module each) served:"
        f" {many['loaded']:.0f} modules loaded, {many['loaded_mib']:.1f} MiB of artifacts"
        " (within --module-cache-bytes, 1 GiB)"
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
