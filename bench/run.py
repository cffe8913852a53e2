"""`make bench`: the benchmark suite. Each benchmark measures its peer in the same run and
prints the ratio; the whole report (markdown) goes to stdout and to bench/results/latest.md,
which git ignores. Nothing is committed.

    python bench/run.py [--seconds 8] [--only hello,workers,tenants,noisy,fuel]

1. hello: the demo tenant's /hello through `serve --workers 1` against the plain trio + h11
   server with no guest (bench/peer_h11.py) and against nginx + fcgiwrap running a native C
   CGI hello (bench/cgi/); every server pinned to cpu 0 (nginx: its one worker, and fcgiwrap),
   wrk on cpu 1. Also the same server with the demo capped at the default max_concurrency (8)
   instead of its own 16, so half of wrk's 16 connections wait in admission. And the same
   hello uploaded through the admin API, on each store: `file:` (a copy of the tenants
   folder) and `nats://` (a nats-server on 127.0.0.1, .cache/nats, as `make test` unpacks),
   so both stores' ratios against the same peer come from one run: once a module is loaded,
   neither store is on the request path.
2. workers: `--workers 1` against `--workers 2`. With three or more cores, the workers run on
   the first two (one worker on the first) and wrk on the others, off the measured cores, as
   the issue asks. With two cores there is no core left for wrk: one worker is measured on
   cpu 0 with wrk on cpu 1 (off the measured core); two workers on cpus 0-1 with wrk sharing
   them. The CPU time of the server processes and of wrk is read for both, so the table also
   gives requests per second per core the server actually had.
3. tenants: 1,000 tenants (each its own module) served by one worker, wrk's Lua script
   rotating over all of them, against the same server with every request on one tenant (p99
   ratio); and resident memory per idle tenant: (RSS with 1,000 tenants - RSS with 1) / 999,
   both right after start-up.
4. noisy: `--workers 2` on cpus 0-1. A quiet tenant's hello (wrk, 2 connections) alone, then
   while a noisy tenant floods it with CPU-bound guests (bench/guests/burn.wat, ~4.5 ms of CPU
   each; wrk, 8 connections); the noisy tenant's policy caps it at `max_concurrency = 1`
   (pod-wide), so it can take one core. All load generators share cpus 0-1 with the server.
5. fuel: fuel and epoch interruption on against off, in this process, on burn.wat: wasmtime
   engines differing only in `consume_fuel` / `epoch_interruption` (a bench-only config), a
   fresh store per run, and the production `Sandbox.run` for reference.

Everything listens on 127.0.0.1 and every run is bounded (`--seconds` per measurement).
nginx and fcgiwrap are installed with apt-get when missing (Debian `nginx-light`, `fcgiwrap`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx
import wasmtime

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOAD_CPU,
    REPO,
    SERVER_CPU,
    WrkResult,
    cpu_seconds,
    free_port,
    parse_wrk,
    process_tree,
    require,
    server,
    supervisor_argv,
    wait_until_serving,
)
from store_propagation import nats_server

BENCH = REPO / "bench"
RESULTS = BENCH / "results" / "latest.md"
BOTH_CPUS = "0,1"
CONNECTIONS = 16
"""wrk's keep-alive connections for throughput runs."""
WARMUP_S = 2
TENANTS = 1000
QUIET_CONNECTIONS = 2
NOISY_CONNECTIONS = 8
FUEL_RUNS = 40
"""Runs of burn.wat per engine configuration (~4.5 ms each)."""
NGINX = Path("/usr/sbin/nginx")
FCGIWRAP = Path("/usr/sbin/fcgiwrap")
STORED_ROUTE = "/stored"
"""The demo's hello, uploaded through the admin API under this route (bench_hello)."""
ADMIN_TOKEN = "bench-run-operator-token"
FCGIWRAP_PROCESSES = 4
"""fcgiwrap children (all on cpu 0): each runs one CGI request at a time."""

# What the issue asks of each comparison.
TARGET_VS_CGI = 2.0
TARGET_VS_PEER = 0.60
TARGET_TWO_WORKERS = 1.6
TARGET_TENANTS_P99 = 1.25
TARGET_NOISY_P99 = 2.0


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        print(*lines, sep="\n", flush=True)

    def check(self, what: str, value: float, target: str, meets: bool) -> None:
        verdict = "meets" if meets else "**misses**"
        self.summary.append(f"| {what} | {value:.2f} | {target} | {verdict} |")


# Running things --------------------------------------------------------------------------------


def run_wrk(
    url: str, *, seconds: float, connections: int, cpus: str, script: Path | None = None
) -> tuple[WrkResult, float]:
    """wrk's result and the CPU seconds wrk itself used."""
    require("wrk", "wrk")
    command = ["taskset", "-c", cpus, "wrk", "--latency", "-t1", f"-c{connections}"]
    command += [f"-d{seconds}s"] + (["-s", str(script)] if script else []) + [url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=seconds + 60
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(output), cpu


def rss_bytes(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


@contextlib.contextmanager
def supervisor(cache: Path, *, workers: int, cpus: str, tenants: Path = REPO / "tenants",
               policies: Path = REPO / "policies", ready_path: str = "/demo/hello"
               ) -> Iterator[tuple[str, int]]:  # fmt: skip
    """A supervisor pinned to `cpus`; yields its base URL and pid once it answers (a pod of
    workers answers only once every worker is ready)."""
    port = free_port()
    argv = supervisor_argv(port, cache, workers=workers, tenants=tenants, policies=policies)
    base = f"http://127.0.0.1:{port}"
    with server(argv, base + ready_path, cpus=cpus) as process:
        yield base, process.pid


@contextlib.contextmanager
def stored_supervisor(cache: Path, store: str | None, *, cpus: str) -> Iterator[str]:
    """`--workers 1` on a copy of the tenants folder with `store` (None: the `file:` store of
    that copy), the demo's hello uploaded through the admin API; yields its URL once the
    uploaded route answers (loaded)."""
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        shutil.copytree(REPO / "tenants", root / "tenants")
        port = free_port()
        argv = supervisor_argv(
            port, cache, workers=1, tenants=root / "tenants", policies=REPO / "policies"
        )
        argv += ["--store", store] if store else []
        base = f"http://127.0.0.1:{port}"
        env = {"SUPERVISOR_ADMIN_TOKEN": ADMIN_TOKEN}
        with server(argv, base + "/demo/hello", cpus=cpus, env=env):
            response = httpx.put(
                f"{base}/_admin/v1/tenants/demo/modules/stored",
                content=(REPO / "tenants" / "demo" / "hello.wat").read_bytes(),
                params={"route": STORED_ROUTE},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=60,
            )
            if response.status_code not in (200, 201):
                sys.exit(f"upload to {store or 'file:'}: {response.status_code} {response.text}")
            wait_until_serving(base + "/demo" + STORED_ROUTE)
            yield base + "/demo" + STORED_ROUTE
    finally:
        shutil.rmtree(root, ignore_errors=True)


def median(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.median(r.requests_per_s for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.errors for r in results),
    )


def table(header: str, rows: list[str]) -> list[str]:
    columns = header.count("|") - 1
    return [header, "|---" + "|---:" * (columns - 1) + "|", *rows]


WRK_HEADER = "| server | req/s | p50 ms | p99 ms | errors |"


# 1. hello --------------------------------------------------------------------------------------


def ensure_cgi_tools() -> str | None:
    """Install nginx and fcgiwrap if missing; None when ready, else why not."""
    if NGINX.exists() and FCGIWRAP.exists():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "nginx/fcgiwrap missing and apt-get unavailable (not root?)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "nginx-light", "fcgiwrap"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"apt-get install failed: {result.stderr.strip()[-200:]}"
    return None


@contextlib.contextmanager
def nginx_cgi(root: Path) -> Iterator[str]:
    """nginx (one worker) + fcgiwrap + the C hello, all on cpu 0; yields the URL."""
    require("gcc", "gcc")
    binary = root / "hello.cgi"
    source = BENCH / "cgi" / "hello.c"
    built = subprocess.run(["gcc", "-O2", "-static", "-o", binary, source], capture_output=True)
    if built.returncode != 0:  # no static libc: a dynamic binary is the usual CGI anyway
        subprocess.run(["gcc", "-O2", "-o", binary, source], check=True)
    port = free_port()
    config = root / "nginx.conf"
    config.write_text((BENCH / "cgi" / "nginx.conf").read_text().format(root=root, port=port))
    socket_path = root / "fcgiwrap.sock"
    fcgiwrap = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, str(FCGIWRAP), "-c", str(FCGIWRAP_PROCESSES),
         "-s", f"unix:{socket_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: its preforked children stop with it
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if time.monotonic() > deadline or fcgiwrap.poll() is not None:
                raise RuntimeError("fcgiwrap did not start")
            time.sleep(0.02)
        argv = [str(NGINX), "-p", str(root), "-c", str(config), "-e", str(root / "error.log")]
        with server(argv, f"http://127.0.0.1:{port}/", cpus=SERVER_CPU):
            yield f"http://127.0.0.1:{port}/"
    finally:
        os.killpg(fcgiwrap.pid, signal.SIGTERM)
        fcgiwrap.wait(timeout=10)


def bench_hello(report: Report, cache: Path, seconds: int, rounds: int) -> None:
    report.add(
        "## 1. hello: server vs plain trio + h11 vs nginx + fcgiwrap CGI",
        "",
        f"Each server pinned to cpu {SERVER_CPU} (nginx: one worker; fcgiwrap: "
        f"{FCGIWRAP_PROCESSES} children), wrk -t1 -c{CONNECTIONS} on cpu {LOAD_CPU}, keep-alive; "
        f"{rounds} rounds taking turns, each {WARMUP_S}s warm-up then {seconds}s; medians.",
        "",
    )
    results: dict[str, list[WrkResult]] = {
        "peer": [], "supervisor": [], "capped": [], "cgi": [], "file": [], "nats": []
    }  # fmt: skip
    # The same server with the demo tenant capped at the default max_concurrency (8): half of
    # wrk's connections then wait in admission, the path of a tenant at its cap.
    capped_policies = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    shutil.copytree(REPO / "policies", capped_policies, dirs_exist_ok=True)
    demo = capped_policies / "demo.toml"
    policy = demo.read_text()
    if "max_concurrency = 16" not in policy:
        sys.exit("policies/demo.toml no longer says max_concurrency = 16: update bench_hello")
    demo.write_text(policy.replace("max_concurrency = 16", "max_concurrency = 8"))

    def measure(name: str, url: str) -> None:
        run_wrk(url, seconds=WARMUP_S, connections=CONNECTIONS, cpus=LOAD_CPU)
        result, _ = run_wrk(url, seconds=seconds, connections=CONNECTIONS, cpus=LOAD_CPU)
        results[name].append(result)

    cgi_problem = ensure_cgi_tools()
    nats_work = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    try:
        with nats_server(nats_work) as nats_url:
            for _ in range(rounds):
                port = free_port()
                peer = [sys.executable, "bench/peer_h11.py", str(port)]
                with server(peer, f"http://127.0.0.1:{port}/"):
                    measure("peer", f"http://127.0.0.1:{port}/")
                with supervisor(cache, workers=1, cpus=SERVER_CPU) as (base, _):
                    measure("supervisor", base + "/demo/hello")
                capped_server = supervisor(
                    cache, workers=1, cpus=SERVER_CPU, policies=capped_policies
                )
                with capped_server as (base, _):
                    measure("capped", base + "/demo/hello")
                if cgi_problem is None:
                    with tempfile.TemporaryDirectory() as root, nginx_cgi(Path(root)) as url:
                        measure("cgi", url)
                for store, url in (("file", None), ("nats", nats_url)):
                    with stored_supervisor(cache, url, cpus=SERVER_CPU) as stored:
                        measure(store, stored)
    finally:
        shutil.rmtree(capped_policies)
        shutil.rmtree(nats_work, ignore_errors=True)
    peer, ours = median(results["peer"]), median(results["supervisor"])
    rows = [
        peer.row("trio + h11, no guest (peer)"),
        ours.row("wasm-supervisor, demo /hello, 1 worker"),
        median(results["capped"]).row("the same, demo capped at max_concurrency = 8"),
    ]
    if cgi_problem is None:
        rows.append(median(results["cgi"]).row("nginx + fcgiwrap, C CGI hello"))
    rows += [
        median(results["file"]).row("wasm-supervisor, hello uploaded, --store file:"),
        median(results["nats"]).row("wasm-supervisor, hello uploaded, --store nats://"),
    ]
    report.add(*table(WRK_HEADER, rows), "")
    vs_peer = ours.requests_per_s / peer.requests_per_s
    capped = median(results["capped"]).requests_per_s / peer.requests_per_s
    report.add(
        f"- throughput, supervisor / trio + h11 peer: **{vs_peer:.2f}** (the demo tenant may"
        f" use all 16 slots); capped at 8, half the requests wait in admission: {capped:.2f}"
    )
    report.check("hello: supervisor / trio+h11 (req/s)", vs_peer, f">= {TARGET_VS_PEER}",
                 vs_peer >= TARGET_VS_PEER)  # fmt: skip
    if cgi_problem is None:
        vs_cgi = ours.requests_per_s / median(results["cgi"]).requests_per_s
        report.add(f"- throughput, supervisor / nginx + fcgiwrap CGI: **{vs_cgi:.2f}**")
        report.check("hello: supervisor / nginx+CGI (req/s)", vs_cgi, f">= {TARGET_VS_CGI}",
                     vs_cgi >= TARGET_VS_CGI)  # fmt: skip
    else:
        report.add(f"- nginx + fcgiwrap not measured: {cgi_problem}")
    report.add(f"- p99, supervisor / peer: {ours.p99_ms / peer.p99_ms:.2f}")
    for store in ("file", "nats"):
        ratio = median(results[store]).requests_per_s / peer.requests_per_s
        report.add(
            f"- throughput of the uploaded hello, `--store {store}:` / trio + h11 peer:"
            f" **{ratio:.2f}**"
        )
        report.check(f"hello, uploaded, --store {store}: / trio+h11 (req/s)", ratio,
                     f">= {TARGET_VS_PEER}", ratio >= TARGET_VS_PEER)  # fmt: skip
    report.add("")


# 2. workers ------------------------------------------------------------------------------------


def worker_placements() -> tuple[tuple[tuple[int, str, str], ...], bool]:
    """(workers, server cpus, wrk cpus) for 1 and 2 workers, and whether wrk is kept off the
    measured cores (it can be with three cores or more)."""
    cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
    if len(cpus) >= 3:
        load = ",".join(cpus[2:])
        return ((1, cpus[0], load), (2, f"{cpus[0]},{cpus[1]}", load)), True
    return ((1, SERVER_CPU, LOAD_CPU), (2, BOTH_CPUS, BOTH_CPUS)), False


def bench_workers(report: Report, cache: Path, seconds: int, rounds: int) -> None:
    placements, wrk_apart = worker_placements()
    if wrk_apart:
        setup = (
            "1 worker runs on the first cpu, 2 workers on the first two, wrk on the others: "
            "off the measured cores. "
        )
    else:
        setup = (
            "Two cores and no third for wrk: 1 worker runs on cpu 0 with wrk on cpu 1 (off the "
            "measured core); 2 workers run on cpus 0-1 with wrk sharing them (wrk's CPU is "
            "taken from the server). "
        )
    report.add(
        "## 2. one worker vs two workers (hello)",
        "",
        setup + "CPU columns are seconds of CPU per second of run, read from /proc "
        "(server: supervisor + workers) and getrusage (wrk). `req/s per server core` divides "
        "by the server's own CPU: the scaling with wrk's share taken out. "
        f"wrk -t1 -c{CONNECTIONS}; {rounds} rounds taking turns; medians.",
        "",
    )
    runs: dict[int, list[tuple[WrkResult, float, float]]] = {1: [], 2: []}
    for _ in range(rounds):
        for workers, cpus, wrk_cpus in placements:
            with supervisor(cache, workers=workers, cpus=cpus) as (base, pid):
                url = base + "/demo/hello"
                run_wrk(url, seconds=WARMUP_S, connections=CONNECTIONS, cpus=wrk_cpus)
                before = cpu_seconds(pid)
                result, wrk_cpu = run_wrk(
                    url, seconds=seconds, connections=CONNECTIONS, cpus=wrk_cpus
                )
                server_cpu = cpu_seconds(pid) - before
            runs[workers].append((result, server_cpu / seconds, wrk_cpu / seconds))
    rows, rates, per_core = [], {}, {}
    for workers, cpus, wrk_cpus in placements:
        result = median([run[0] for run in runs[workers]])
        server_cores = statistics.median(run[1] for run in runs[workers])
        wrk_cores = statistics.median(run[2] for run in runs[workers])
        rates[workers] = result.requests_per_s
        per_core[workers] = result.requests_per_s / server_cores
        rows.append(
            f"| {workers} worker(s) on cpu {cpus}, wrk on cpu {wrk_cpus} "
            f"| {result.requests_per_s:,.0f} | {result.p50_ms:.2f} | {result.p99_ms:.2f} "
            f"| {server_cores:.2f} | {wrk_cores:.2f} | {per_core[workers]:,.0f} |"
        )
    header = "| setup | req/s | p50 ms | p99 ms | server CPU | wrk CPU | req/s per server core |"
    report.add(*table(header, rows), "")
    ratio = rates[2] / rates[1]
    core_ratio = per_core[2] / per_core[1]
    where = "wrk on other cores" if wrk_apart else "wrk sharing the two cores"
    report.add(
        f"- throughput, 2 workers / 1 worker: **{ratio:.2f}** ({where})",
        f"- per server core, 2 workers / 1 worker: {core_ratio:.2f}",
        "",
    )
    report.check(f"2 workers / 1 worker (req/s, {where})", ratio,
                 f">= {TARGET_TWO_WORKERS}", ratio >= TARGET_TWO_WORKERS)  # fmt: skip


# 3. tenants ------------------------------------------------------------------------------------


def tenant_workspace(root: Path, count: int) -> tuple[Path, Path]:
    """`count` tenants t0, t1, ... each with its own module (a hello naming the tenant)."""
    tenants, policies = root / "tenants", root / "policies"
    hello = (REPO / "tenants" / "demo" / "hello.wat").read_text()
    policies.mkdir(parents=True)
    for index in range(count):
        folder = tenants / f"t{index}"
        folder.mkdir(parents=True)
        name = f"t{index}".ljust(4)[:4]  # same length as "wasm": the data's length holds
        (folder / "hello.wat").write_text(hello.replace("hello from wasm", f"hello from {name}"))
        (folder / "modules.toml").write_text('[[module]]\nroute = "/hello"\nmodule = "hello.wat"\n')
        (policies / f"t{index}.toml").write_text("")
    return tenants, policies


def bench_tenants(report: Report, cache: Path, seconds: int, rounds: int) -> None:
    report.add(
        f"## 3. {TENANTS:,} tenants round-robin vs one tenant",
        "",
        f"One worker on cpu {SERVER_CPU} serving {TENANTS:,} tenants, each with its own "
        f"module; wrk -t1 -c{CONNECTIONS} on cpu {LOAD_CPU}: a Lua script rotates the path over "
        "every tenant, then every request goes to t0, on the same server; "
        f"{rounds} rounds taking turns; medians. Resident memory: the server right after "
        f"start-up with 1 and with {TENANTS:,} tenants (artifacts already in the cache).",
        "",
    )
    results: dict[str, list[WrkResult]] = {"single": [], "rotating": []}
    with tempfile.TemporaryDirectory() as root:
        one = tenant_workspace(Path(root) / "one", 1)
        many = tenant_workspace(Path(root) / "many", TENANTS)
        script = Path(root) / "rotate.lua"
        script.write_text(
            "local i = 0\n"
            "request = function()\n"
            f"  i = (i + 1) % {TENANTS}\n"
            '  return wrk.format("GET", "/t" .. i .. "/hello")\n'
            "end\n"
        )
        started = time.perf_counter()
        with supervisor(cache, workers=1, cpus=SERVER_CPU, tenants=many[0], policies=many[1],
                        ready_path="/t0/hello"):  # fmt: skip
            cold_s = time.perf_counter() - started  # compiles the 1,000 modules
        with supervisor(cache, workers=1, cpus=SERVER_CPU, tenants=one[0], policies=one[1],
                        ready_path="/t0/hello") as (_, pid):  # fmt: skip
            rss_one = rss_bytes(pid)
        started = time.perf_counter()
        with supervisor(cache, workers=1, cpus=SERVER_CPU, tenants=many[0], policies=many[1],
                        ready_path="/t0/hello") as (base, pid):  # fmt: skip
            warm_s = time.perf_counter() - started
            rss_many = rss_bytes(pid)
            run_wrk(base + "/", seconds=WARMUP_S, connections=CONNECTIONS, cpus=LOAD_CPU,
                    script=script)  # fmt: skip
            for _ in range(rounds):
                result, _ = run_wrk(base + "/", seconds=seconds, connections=CONNECTIONS,
                                    cpus=LOAD_CPU, script=script)  # fmt: skip
                results["rotating"].append(result)
                result, _ = run_wrk(base + "/t0/hello", seconds=seconds,
                                    connections=CONNECTIONS, cpus=LOAD_CPU)  # fmt: skip
                results["single"].append(result)
    single, rotating = median(results["single"]), median(results["rotating"])
    report.add(
        *table(
            WRK_HEADER,
            [
                single.row("one tenant (t0)"),
                rotating.row(f"{TENANTS:,} tenants, round-robin"),
            ],
        ),
        "",
    )
    ratio = rotating.p99_ms / single.p99_ms
    per_tenant = (rss_many - rss_one) / (TENANTS - 1)
    report.add(
        f"- p99, {TENANTS:,} tenants / one tenant: **{ratio:.2f}**; throughput ratio "
        f"{rotating.requests_per_s / single.requests_per_s:.2f}",
        f"- resident memory: {rss_one / 2**20:.0f} MiB with 1 tenant, "
        f"{rss_many / 2**20:.0f} MiB with {TENANTS:,}: **{per_tenant / 1024:.0f} KiB per idle "
        f"tenant**; {TENANTS:,} tenants ready in {cold_s:.1f}s compiling every module, "
        f"{warm_s:.1f}s from the artifact cache",
        "",
    )
    report.check(f"{TENANTS:,} tenants / 1 tenant (p99)", ratio, f"<= {TARGET_TENANTS_P99}",
                 ratio <= TARGET_TENANTS_P99)  # fmt: skip


# 4. noisy neighbour ----------------------------------------------------------------------------


def bench_noisy(report: Report, cache: Path, seconds: int, rounds: int) -> None:
    report.add(
        "## 4. noisy neighbour",
        "",
        f"`--workers 2` on cpus {BOTH_CPUS}. The quiet tenant's hello with wrk "
        f"-c{QUIET_CONNECTIONS}, paced (each connection waits 2 ms between requests: "
        "bench/paced.lua), alone, then while the noisy tenant is flooded with "
        f"burn.wat (~4.5 ms of CPU each) by wrk -c{NOISY_CONNECTIONS}; noisy's policy: "
        "`max_concurrency = 1` (pod-wide), so it runs on at most one core. Both wrk share "
        f"cpus {BOTH_CPUS} with the server. {rounds} rounds taking turns; medians.",
        "",
    )
    results: dict[str, list[WrkResult]] = {"alone": [], "neighbour": [], "flood": []}
    with tempfile.TemporaryDirectory() as root:
        tenants, policies = Path(root) / "tenants", Path(root) / "policies"
        for name, guest in (("quiet", REPO / "tenants/demo/hello.wat"),
                            ("noisy", BENCH / "guests/burn.wat")):  # fmt: skip
            (tenants / name).mkdir(parents=True)
            shutil.copyfile(guest, tenants / name / guest.name)
            (tenants / name / "modules.toml").write_text(
                f'[[module]]\nroute = "/"\nmodule = "{guest.name}"\n'
            )
        policies.mkdir()
        (policies / "quiet.toml").write_text("")
        (policies / "noisy.toml").write_text("max_concurrency = 1\n")
        with supervisor(cache, workers=2, cpus=BOTH_CPUS, tenants=tenants, policies=policies,
                        ready_path="/quiet/") as (base, _):  # fmt: skip
            quiet_url, noisy_url = base + "/quiet/", base + "/noisy/"

            def quiet() -> WrkResult:
                return run_wrk(quiet_url, seconds=seconds, connections=QUIET_CONNECTIONS,
                               cpus=BOTH_CPUS, script=BENCH / "paced.lua")[0]  # fmt: skip

            def flood() -> None:
                result, _ = run_wrk(noisy_url, seconds=seconds + 2 * WARMUP_S,
                                    connections=NOISY_CONNECTIONS, cpus=BOTH_CPUS)  # fmt: skip
                results["flood"].append(result)

            run_wrk(quiet_url, seconds=WARMUP_S, connections=QUIET_CONNECTIONS, cpus=BOTH_CPUS)
            for _ in range(rounds):
                results["alone"].append(quiet())
                flooding = threading.Thread(target=flood)
                flooding.start()
                time.sleep(WARMUP_S)  # the flood reaches its steady state first
                results["neighbour"].append(quiet())
                flooding.join()
    alone, neighbour = median(results["alone"]), median(results["neighbour"])
    report.add(
        *table(
            "| load | req/s | p50 ms | p99 ms | non-2xx or errors |",
            [
                alone.row("quiet tenant, alone"),
                neighbour.row("quiet tenant, noisy one flooding"),
                median(results["flood"]).row("noisy tenant (burn.wat), its flood"),
            ],
        ),
        "",
    )
    ratio = neighbour.p99_ms / alone.p99_ms
    report.add(f"- quiet tenant's p99, with the noisy neighbour / alone: **{ratio:.2f}**", "")
    report.check("noisy neighbour: quiet p99 with / alone", ratio, f"<= {TARGET_NOISY_P99}",
                 ratio <= TARGET_NOISY_P99)  # fmt: skip


# 5. fuel and epoch -----------------------------------------------------------------------------


def engine(*, fuel: bool, epoch: bool) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = fuel
    config.epoch_interruption = epoch
    config.cranelift_opt_level = "speed"
    return wasmtime.Engine(config)


def time_runs(run: Callable[[], None], runs: int) -> list[float]:
    run()  # warm: first-touch costs are not the guest's
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        durations.append(time.perf_counter() - started)
    return durations


def plain_run(fuel: bool, epoch: bool, stop: threading.Event) -> Callable[[], None]:
    """One run of burn.wat in a fresh store of an engine with only these settings; its epoch
    ticker (if any) runs until `stop` is set."""
    eng = engine(fuel=fuel, epoch=epoch)
    module = wasmtime.Module(eng, (BENCH / "guests" / "burn.wat").read_text())
    linker = wasmtime.Linker(eng)
    linker.define_wasi()
    pre = linker.instantiate_pre(module)
    if epoch:  # the cost of a ticking epoch, as in the sandbox (5 ms)

        def tick() -> None:
            while not stop.wait(0.005):
                eng.increment_epoch()

        threading.Thread(target=tick, daemon=True).start()

    def run() -> None:
        store = wasmtime.Store(eng)
        wasi = wasmtime.WasiConfig()
        wasi.stdout_file = os.devnull
        store.set_wasi(wasi)
        if fuel:
            store.set_fuel(10**12)
        if epoch:
            store.set_epoch_deadline(10**6)
        pre.instantiate(store).exports(store)["_start"](store)

    return run


def sandbox_run() -> tuple[Callable[[], None], Callable[[], None]]:
    """The production path (fuel, epoch, limits, pooling allocator), and how to close it."""
    from supervisor.sandbox import GuestLimits, Sandbox

    sandbox = Sandbox()
    module = wasmtime.Module(sandbox.engine, (BENCH / "guests" / "burn.wat").read_text())
    prepared = sandbox.prepare(module)
    limits = GuestLimits(fuel=10**12, memory_bytes=64 << 20, timeout_ms=60_000,
                         max_stdout_bytes=1 << 20)  # fmt: skip

    def run() -> None:
        result = sandbox.run(prepared, "_start", argv=["burn"], env={}, stdin=b"", limits=limits)
        assert result.error is None, result.error

    return run, sandbox.close


def bench_fuel(report: Report) -> None:
    report.add(
        "## 5. fuel and epoch interruption, on vs off (CPU-heavy guest, in-process)",
        "",
        f"burn.wat (5·10^6 loop iterations), {FUEL_RUNS} runs each after one warm-up, a fresh "
        "store and instance per run, one thread. Engines differ only in `consume_fuel` and "
        "`epoch_interruption` (a bench-only config; production always has both on). The "
        "last row is the production `Sandbox.run` (both on, plus memory limits, the pooling "
        "allocator and the replaced WASI functions).",
        "",
    )
    medians = {}
    for fuel, epoch in ((False, False), (True, False), (False, True), (True, True)):
        stop = threading.Event()
        try:
            runs = time_runs(plain_run(fuel, epoch, stop), FUEL_RUNS)
        finally:
            stop.set()
        medians[fuel, epoch] = statistics.median(runs)
    run, close = sandbox_run()
    try:
        production = statistics.median(time_runs(run, FUEL_RUNS))
    finally:
        close()
    off = medians[False, False]
    names = {(False, False): "both off", (True, False): "fuel only",
             (False, True): "epoch only", (True, True): "fuel + epoch"}  # fmt: skip
    rows = [
        f"| {names[key]} | {value * 1000:.2f} | {value / off:.2f} |"
        for key, value in medians.items()
    ]
    rows.append(f"| Sandbox.run (production) | {production * 1000:.2f} | {production / off:.2f} |")
    report.add(*table("| engine | median ms per run | vs both off |", rows), "")
    report.add(
        f"- fuel + epoch on / off: **{medians[True, True] / off:.2f}** "
        "(the price of being able to stop a guest)",
        "",
    )


# The suite -------------------------------------------------------------------------------------

SECTIONS = ("hello", "workers", "tenants", "noisy", "fuel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="of each comparison, taking turns")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args()
    only = args.only.split(",")
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("the suite needs two cpus (server on 0, load on 1)")
    started = time.perf_counter()
    report = Report()
    report.add(
        "# wasm-supervisor benchmarks",
        "",
        f"`{' '.join(['python', 'bench/run.py', *sys.argv[1:]])}` on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{cpu_model()}, {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}, wasmtime {version('wasmtime')}. Absolute figures "
        "drift ±15 % between runs (FACTS.md); ratios are measured within this run. Load "
        f"average (1 min) before the run: {os.getloadavg()[0]:.2f}: other processes on the "
        "machine compete for the same two cores.",
        "",
    )
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        cache = Path(cache_dir)
        if "hello" in only:
            bench_hello(report, cache, args.seconds, args.rounds)
        if "workers" in only:
            bench_workers(report, cache, args.seconds, args.rounds)
        if "tenants" in only:
            bench_tenants(report, cache, args.seconds, args.rounds)
        if "noisy" in only:
            bench_noisy(report, cache, args.seconds, args.rounds)
    if "fuel" in only:
        bench_fuel(report)
    report.add(
        "## Summary: the issue's targets",
        "",
        *table("| comparison | measured | target | verdict |", report.summary),
        "",
        f"Suite ran in {time.perf_counter() - started:.0f}s; load average (1 min) at the end: "
        f"{os.getloadavg()[0]:.2f}.",
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(report.lines) + "\n")
    print(f"\n(written to {RESULTS.relative_to(REPO)})")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
