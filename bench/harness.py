"""Shared pieces of the benchmarks: start a server pinned to a core, load it with wrk.

The machine is noisy, so every benchmark measures its peers in the same run and prints
ratios. Servers run pinned to one core (`taskset`), the load generator on another, so the
server's core is measured, not the contention between the two.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = "0"
LOAD_CPU = "1"


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int

    def row(self, name: str) -> str:
        return (
            f"| {name} | {self.requests_per_s:,.0f} | {self.p50_ms:.2f} | {self.p99_ms:.2f}"
            f" | {self.errors} |"
        )


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"{tool} is missing: install the Debian package `{package}`")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)  # a benchmark script waiting on a child process, not a test
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s")


@contextlib.contextmanager
def server(
    argv: Sequence[str],
    ready_url: str,
    *,
    cpus: str = SERVER_CPU,
    env: dict | None = None,
    cwd: Path = REPO,
) -> Iterator[subprocess.Popen]:
    """Run `argv` pinned to `cpus` until the block ends; wait for `ready_url` first."""
    process = subprocess.Popen(
        ["taskset", "-c", cpus, *argv],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(ready_url)
        yield process
    finally:
        stop(process, timeout_s=30)


def stop(process: subprocess.Popen, *, timeout_s: float) -> None:
    """SIGTERM, so the server shuts down as in production; kill it if it outlasts `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def supervisor_argv(
    port: int,
    cache: Path,
    *,
    workers: int,
    tenants: Path,
    policies: Path,
    python: str = sys.executable,
) -> list[str]:
    """`serve` on 127.0.0.1:`port`, access log off; `python`: the checkout's interpreter."""
    return [
        python, "-m", "supervisor.cli", "serve", "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", "127.0.0.1:0", "--tenants", str(tenants),
        "--policies", str(policies), "--cache", str(cache), "--workers", str(workers),
        "--log-level", "warning",
    ]  # fmt: skip


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (children of any of their threads)."""
    pids, index = [pid], 0
    while index < len(pids):
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by `pid` and every process under it."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, *, seconds: int, connections: int, cpus: str = LOAD_CPU) -> WrkResult:
    require("wrk", "wrk")
    output = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            "wrk",
            "--latency",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> WrkResult:
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return WrkResult(rate, _ms(percentiles["50"]), _ms(percentiles["99"]), errors)


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]
