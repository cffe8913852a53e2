"""CPU per request of the demo hello, for several checkouts side by side (A/B of a change).

On this 2-core machine throughput drifts ±15 % between runs, but the CPU the server spends per
request drifts much less, so a change to the request path is judged by it. For each round,
each checkout in turn: a fresh `serve --workers 1` pinned to cpu 0, `wrk -t1 -c16` on cpu 1
(2 s warm-up, then `--seconds`), and the server's CPU time read from /proc. The plain
trio + h11 peer is measured in each round too, for the ratio.

    .venv/bin/python bench/cpu_per_request.py [--rounds 4] [--seconds 6] CHECKOUT [CHECKOUT ...]

A checkout is a folder with this repo's layout and a `.venv` (a clone of the repo with
`ln -s /path/to/.venv`). Prints, per checkout: req/s and CPU µs per request for every round,
then the medians and the throughput ratio against the peer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOAD_CPU,
    REPO,
    SERVER_CPU,
    cpu_seconds,
    free_port,
    server,
    supervisor_argv,
    wrk,
)

CONNECTIONS = 16
WARMUP_S = 2


def measure(argv: list[str], url: str, cwd: Path, seconds: int) -> tuple[float, float]:
    """(requests per second, server CPU µs per request) of one fresh server."""
    with server(argv, url, cwd=cwd) as process:
        wrk(url, seconds=WARMUP_S, connections=CONNECTIONS, cpus=LOAD_CPU)
        before = cpu_seconds(process.pid)
        result = wrk(url, seconds=seconds, connections=CONNECTIONS, cpus=LOAD_CPU)
        used = cpu_seconds(process.pid) - before
    return result.requests_per_s, used / (result.requests_per_s * seconds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    checkouts = [checkout.resolve() for checkout in args.checkouts]
    rows: dict[str, list[tuple[float, float]]] = {"peer": []}
    rows.update({str(checkout): [] for checkout in checkouts})
    with tempfile.TemporaryDirectory(prefix="cpu-per-request-") as caches:
        for _ in range(args.rounds):
            port = free_port()
            peer = [sys.executable, str(REPO / "bench" / "peer_h11.py"), str(port)]
            url = f"http://127.0.0.1:{port}/"
            rows["peer"].append(measure(peer, url, REPO, args.seconds))
            for index, checkout in enumerate(checkouts):
                port = free_port()
                argv = supervisor_argv(
                    port,
                    Path(caches) / str(index),
                    workers=1,
                    tenants=checkout / "tenants",
                    policies=checkout / "policies",
                    python=str(checkout / ".venv" / "bin" / "python"),
                )
                url = f"http://127.0.0.1:{port}/demo/hello"
                rows[str(checkout)].append(measure(argv, url, checkout, args.seconds))
    peer_rate = statistics.median(rate for rate, _ in rows["peer"])
    print(f"server pinned to cpu {SERVER_CPU}, wrk -t1 -c{CONNECTIONS} on cpu {LOAD_CPU}")
    for name, measured in rows.items():
        rate = statistics.median(rate for rate, _ in measured)
        cpu = statistics.median(cpu for _, cpu in measured)
        rounds = "  ".join(f"{rate:,.0f}/{cpu:.0f}µs" for rate, cpu in measured)
        print(f"{name}: {rounds} | median {rate:,.0f} req/s, {cpu:.0f} µs per request,"
              f" {rate / peer_rate:.3f} of the peer")  # fmt: skip


if __name__ == "__main__":
    main()
