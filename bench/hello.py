"""End-to-end hello: the demo tenant's sandboxed hello against a no-guest trio + h11 server.

Both servers run pinned to core 0, wrk to core 1 (one thread, keep-alive connections), in
the same run, alternating rounds so drift hits both. Prints a markdown table and the ratio.

    python bench/hello.py [--seconds 10] [--rounds 2] [--connections 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import WrkResult, free_port, server, wrk

TARGET_RATIO = 0.40


def supervisor_argv(port: int, cache: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "supervisor.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--tenants",
        "tenants",
        "--policies",
        "policies",
        "--cache",
        cache,
        "--workers",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
    ]


def median(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.median(r.requests_per_s for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.errors for r in results),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, list[WrkResult]] = {"peer": [], "supervisor": []}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.rounds):
            port = free_port()
            with server(
                [sys.executable, "bench/peer_h11.py", str(port)], f"http://127.0.0.1:{port}/"
            ):
                wrk(f"http://127.0.0.1:{port}/", seconds=2, connections=args.connections)
                results["peer"].append(
                    wrk(
                        f"http://127.0.0.1:{port}/",
                        seconds=args.seconds,
                        connections=args.connections,
                    )
                )
            port = free_port()
            url = f"http://127.0.0.1:{port}/demo/hello"
            with server(supervisor_argv(port, cache), url):
                wrk(url, seconds=2, connections=args.connections)
                results["supervisor"].append(
                    wrk(url, seconds=args.seconds, connections=args.connections)
                )
    peer, ours = median(results["peer"]), median(results["supervisor"])
    print(
        f"hello, {args.rounds} rounds x {args.seconds}s, wrk -t1 -c{args.connections}, "
        "server on cpu 0, wrk on cpu 1 (medians)\n"
    )
    print("| server | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    print(peer.row("trio + h11, no guest (peer)"))
    print(ours.row("wasm-supervisor, demo /hello (1 worker)"))
    ratio = ours.requests_per_s / peer.requests_per_s
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    print(
        f"\nthroughput ratio supervisor/peer: {ratio:.2f} ({verdict} the {TARGET_RATIO:.0%} target)"
    )
    print(f"p99 ratio supervisor/peer: {ours.p99_ms / peer.p99_ms:.2f}")


if __name__ == "__main__":
    main()
