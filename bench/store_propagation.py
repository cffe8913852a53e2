"""Propagation of an admin change between two supervisors on one NATS (issue 11, section 2).

Two `wasm-supervisor serve --workers 1 --store nats://...` processes (pods A and B, each its
own cache folder) on one nats-server (Debian's, unpacked by `make test` into .cache/nats),
both with the same artifact key (`--artifact-key-file`), as a deployment shares one Secret.
For each of `--changes` uploads of a new version of one module to A: the time from A's `201`
until B serves the new bytes (B is polled with a kept-alive connection; the poll adds up to
`POLL_S` of error). Each version is a new module (its text differs): A compiles it and
publishes its sealed artifact before its 201, so B fetches the module's bytes and the
artifact, verifies and deserializes it, and rebuilds the tenant: lazy load included. B's log
is read afterwards for how many modules it compiled itself (0 when sharing works).

    python bench/store_propagation.py [--changes 100]

Target: p99 <= 100 ms. Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import stop  # noqa: E402

from supervisor.auth import token_sha256  # noqa: E402

NATS_SERVER = REPO / ".cache" / "nats" / "usr" / "sbin" / "nats-server"
TOKEN = "store-propagation-benchmark-operator-token"
TENANT = "bench"
READY_TIMEOUT_S = 60.0
PROPAGATION_TIMEOUT_S = 10.0
"""A change not served by B within this is reported as lost and ends the run."""
POLL_S = 0.001
SERVING = re.compile(rb"serving on http://127\.0\.0\.1:(?P<port>\d+)")
TARGET_P99_MS = 100.0
ARTIFACT_KEY = "bench:store-propagation-benchmark-artifact-key-0123456789"
COMPILED_HERE = re.compile(rb"module \S+ loaded in [\d.]+ms \(compiled")


def greeter_wat(text: str) -> bytes:
    out = f"content-type: text/plain\n\n{text}\n"
    data = out.replace("\n", "\\n")
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{data}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(out)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""".encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def nats_server(work: Path) -> Iterator[str]:
    if not NATS_SERVER.exists():
        sys.exit(f"{NATS_SERVER} is missing: run `make test` once (it unpacks nats-server)")
    port = free_port()
    log = (work / "nats.log").open("wb")
    command = [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(work / "js")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"Server is ready" not in (work / "nats.log").read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"nats-server did not start:\n{(work / 'nats.log').read_text()}")
            time.sleep(0.01)  # a script polling a child process, not a test
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def serve(work: Path, label: str, store: str) -> Iterator[str]:
    log = work / f"server-{label}.log"
    command = [
        sys.executable, "-m", "supervisor.cli", "serve", "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0", "--workers", "1", "--tenants", str(work / "tenants"),
        "--policies", str(work / "policies"), "--cache", str(work / f"cache-{label}"),
        "--store", store, "--artifact-key-file", str(work / "artifact.key"),
    ]  # fmt: skip
    env = {**os.environ, "SUPERVISOR_ADMIN_TOKEN": TOKEN}
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server {label} did not start:\n{log.read_text()}")
            match = SERVING.search(log.read_bytes())
            if match:
                url = f"http://127.0.0.1:{int(match['port'])}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
            time.sleep(0.01)  # a script polling a child process, not a test
        yield url
    finally:
        stop(process, timeout_s=60)


def measure(url_a: str, url_b: str, changes: int, *, new_bytes: bool) -> list[float]:
    """Seconds from each upload's 201 on A until B serves it. `new_bytes`: each version a new
    module (B fetches its bytes and A's artifact); else the same bytes under a new route each
    time (B fetches nothing and compiles nothing: the store's watch and the rebuild alone)."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    module = f"{url_a}/_admin/v1/tenants/{TENANT}/modules/{'m' if new_bytes else 'r'}"
    seconds = []
    with httpx.Client(timeout=60) as admin, httpx.Client(base_url=url_b, timeout=10) as b:
        for index in range(changes):
            text = f"version {index}" if new_bytes else "same bytes"
            route = "/m" if new_bytes else f"/r{index}"
            response = admin.put(
                module, content=greeter_wat(text), params={"route": route}, headers=headers
            )
            acknowledged = time.perf_counter()
            if response.status_code not in (200, 201):
                sys.exit(f"upload {index}: {response.status_code} {response.text}")
            deadline = acknowledged + PROPAGATION_TIMEOUT_S
            while (reply := b.get(f"/{TENANT}{route}")).text != text + "\n":
                if time.perf_counter() > deadline:
                    sys.exit(f"change {index} not served by B within {PROPAGATION_TIMEOUT_S}s")
                time.sleep(POLL_S)
            assert reply.status_code == 200
            seconds.append(time.perf_counter() - acknowledged)
    return seconds


def row(label: str, seconds: list[float]) -> tuple[str, float]:
    ms = sorted(value * 1000 for value in seconds)
    p50 = statistics.median(ms)
    p90 = ms[round(0.9 * len(ms)) - 1]
    p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    cells = " | ".join(f"{value:.1f} ms" for value in (ms[0], p50, p90, p99, ms[-1]))
    return f"| {label} | {cells} |", p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-propagation-") as scratch:
        work = Path(scratch)
        (work / "tenants" / TENANT).mkdir(parents=True)
        (work / "policies").mkdir()
        (work / "policies" / f"{TENANT}.toml").write_text(
            f'admin_token_sha256 = "{token_sha256(TOKEN)}"\n'
        )
        (work / "artifact.key").write_text(ARTIFACT_KEY + "\n")
        with nats_server(work) as store, serve(work, "a", store) as a, serve(work, "b", store) as b:
            fetched = measure(a, b, args.changes, new_bytes=True)
            routed = measure(a, b, args.changes, new_bytes=False)
        compiled_by_b = len(COMPILED_HERE.findall((work / "server-b.log").read_bytes()))
    load = os.getloadavg()[0]
    print(f"## Store propagation (nats-server 2.9.10, {args.changes} changes each, A's 201 -> B")
    print(f"serves; {os.cpu_count()} cores, load average {load:.1f})")
    print()
    print("| change | min | p50 | p90 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    line, p99 = row("new bytes (B fetches the module and its artifact)", fetched)
    print(line)
    line, p99_routed = row("new route, same bytes (watch + rebuild)", routed)
    print(line)
    print()
    print(f"modules B compiled itself: {compiled_by_b} (0: every artifact came from A)")
    for label, value in (("new bytes", p99), ("same bytes", p99_routed)):
        verdict = "meets" if value <= TARGET_P99_MS else "misses"
        print(f"{label}: p99 {value:.1f} ms {verdict} the target of {TARGET_P99_MS:.0f} ms")


if __name__ == "__main__":
    main()
