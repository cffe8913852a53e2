"""A quiet tenant's hello latency, alone and while another tenant's guests loop on a host
call (issue 10, item 6): the attack that held the GIL in host Python.

    PYTHONPATH=. python bench/host_call_attack.py [--seconds 10] [--workers 2]
                                                  [--attackers 8] [--subscriptions 4096]

Starts `wasm-supervisor serve` on 127.0.0.1 over a temp folder with two tenants: `quiet`
(the demo hello) and `noisy`, whose guest calls poll_oneoff with `--subscriptions` clock
subscriptions, all due at once, in an endless loop (default policy: 2·10^9 fuel, 2 s).
The quiet client (one connection, from 127.0.0.3) sends hellos back to back for
`--seconds`, first alone, then while `--attackers` clients (from 127.0.0.2) send the noisy
request back to back. Prints quiet p50/p99, and the noisy requests by status with their
median duration. Every run is bounded in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
POLL_LOOP = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 8)
  ;; SUBSCRIPTIONS zeroed subscriptions at 0 (clock, timeout 0: due at once); events at
  ;; 262144; event count at 458752.
  (func (export "_start")
    (loop $again
      (drop (call $poll_oneoff (i32.const 0) (i32.const 262144) (i32.const SUBSCRIPTIONS)
                               (i32.const 458752)))
      (br $again))))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lay_out(root: Path, subscriptions: int) -> None:
    tenants, policies = root / "tenants", root / "policies"
    (tenants / "quiet").mkdir(parents=True)
    (tenants / "noisy").mkdir(parents=True)
    policies.mkdir()
    (root / "cache").mkdir()
    shutil.copyfile(REPO / "tenants" / "demo" / "hello.wat", tenants / "quiet" / "hello.wat")
    (tenants / "quiet" / "modules.toml").write_text(
        '[[module]]\nroute = "/hello"\nmodule = "hello.wat"\n'
    )
    wat = POLL_LOOP.replace("SUBSCRIPTIONS", str(subscriptions))
    (tenants / "noisy" / "poll.wat").write_text(wat)
    (tenants / "noisy" / "modules.toml").write_text(
        '[[module]]\nroute = "/poll"\nmodule = "poll.wat"\n'
    )
    (policies / "quiet.toml").write_text("")
    (policies / "noisy.toml").write_text("max_poll_subscriptions = 4096\n")


def quiet_latencies(url: str, seconds: float) -> list[float]:
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    latencies = []
    with httpx.Client(transport=transport, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            response = client.get(f"{url}/quiet/hello")
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
    return latencies


def attack(url: str, stop: threading.Event, results: list[tuple[int, float]]) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            response = client.get(f"{url}/noisy/poll")
            results.append((response.status_code, time.perf_counter() - started))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(name: str, latencies: list[float]) -> None:
    print(
        f"quiet {name}: n={len(latencies)} p50={percentile(latencies, 0.5) * 1000:.2f} ms "
        f"p99={percentile(latencies, 0.99) * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--subscriptions", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        lay_out(root, args.subscriptions)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable, "-m", "supervisor.cli", "serve",
            "--listen", f"127.0.0.1:{port}",
            "--tenants", str(root / "tenants"),
            "--policies", str(root / "policies"),
            "--cache", str(root / "cache"),
            "--workers", str(args.workers),
            "--log-level", "WARNING",
        ]  # fmt: skip
        server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/quiet/hello", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not answer within 60 s")
                time.sleep(0.1)
            quiet_latencies(url, 1)  # warm-up
            report("alone", quiet_latencies(url, args.seconds))
            stop = threading.Event()
            results: list[tuple[int, float]] = []
            attackers = [
                threading.Thread(target=attack, args=(url, stop, results))
                for _ in range(args.attackers)
            ]
            for thread in attackers:
                thread.start()
            try:
                report(
                    f"under {args.attackers} x poll_oneoff({args.subscriptions})",
                    quiet_latencies(url, args.seconds),
                )
            finally:
                stop.set()
                for thread in attackers:
                    thread.join()
            for status, count in sorted(Counter(status for status, _ in results).items()):
                durations = [duration for code, duration in results if code == status]
                print(
                    f"noisy {status}: n={count} median={statistics.median(durations):.2f} s "
                    f"max={max(durations):.2f} s"
                )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
