"""`make soak`: mixed traffic against `serve --workers 2` for N minutes, watching for growth.

    python bench/soak.py [--minutes N]        (make soak; SOAK_MINUTES, default 10)

Why: a leak or a slow build-up only shows over time (issue 10, "Keep it closed"). Three
client processes run for the whole soak against the pod bench/attacks.py sets up (tenants
quiet, attacker and ops; the attacker's policy is the default with timeout_ms = 1000):

- well-behaved, from 127.0.0.3: the quiet tenant's hello and echo (a body, checked), 4
  keep-alive connections, each sending a request every 8 ms on a fixed schedule (as the quiet
  tenant of bench/attacks.py);
- hostile, from 127.0.0.2: the request-level attacks of bench/attacks.py, each for 5 s in turn
  (gather writes, a 2-million-line head, poll_oneoff bombs, a start function that never
  returns, forged stderr, HTTP/1.0 chunked, padded heads, absolute-form targets);
- the operator's admin operations on tenant ops, from 127.0.0.3: upload, re-upload (the same
  bytes), upload a second version, rollback, delete, rollback the deletion, delete; every
  answer is checked, and the two versions repeat, so the artifact cache stops growing.

Every 15 s it prints the RSS of each server process (supervisor and each worker, from
/proc/<pid>/status), the requests by tenant and outcome (the server's own
`wasm_supervisor_requests_total`) and the worker restarts. Warm-up is the first 20 % of the
run (2 minutes of 10): caches fill, allocators reach their working size. RSS is read as the
smallest of 5 reads over a second, so one hostile request in flight does not count as growth.

It fails (exit 1, a last line saying why) if the supervisor's or a worker's RSS at the end is
more than 5 % above its RSS at the end of warm-up (processes a worker starts, such as compile
servers, are shown but not judged: they grow with what they compile and may be replaced), if
any well-behaved request or admin operation failed, or if a worker restarted (its replacement
has no warm-up to compare with). A memory guard SIGKILLs a server process past
`--memory-guard-mib`, as bench/attacks.py does.
Everything targets 127.0.0.x; the run is bounded by `--minutes`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import (
    ADMIN_TOKEN,
    ATTACKER_ADDRESS,
    ATTACKS,
    ECHO_BODY,
    MEMORY_GUARD_MIB,
    QUIET_ADDRESS,
    REPO,
    SERVER_HOST,
    AttackContext,
    Child,
    LoadResult,
    MemoryGuard,
    Pod,
    is_echo,
    is_hello,
    make_workspace,
    pod,
    rss_by_pid,
    well_behaved_load,
    with_nonce,
)

REPORT_INTERVAL_S = 15.0
WARMUP_FRACTION = 0.2
RSS_GROWTH_LIMIT = 0.05
STEADY_READS = 5
STEADY_READ_INTERVAL_S = 0.2
HOSTILE_SLICE_S = 5.0
"""Each hostile attack runs this long before the next one takes over."""
HOSTILE = (
    "gather-stdout", "gather-stderr", "header-lines", "poll-subscriptions", "start-loop",
    "stderr-forge", "http10-chunked", "padded-head", "absolute-form",
)  # fmt: skip
ADMIN_PAUSE_S = 1.0
"""Between two rounds of admin operations: an operator's pace, not a flood."""
ADMIN_TIMEOUT_S = 120.0
WELL_BEHAVED = [
    ("GET", "/quiet/hello", b"", is_hello),
    ("POST", "/quiet/echo/soak", ECHO_BODY, is_echo),
]
CHILD_GRACE_S = 180.0
"""How long after the run a client process may take to send its result (requests finish)."""


# The three clients -------------------------------------------------------------------------------


def well_behaved_process(reply: Connection, port: int, seconds: float) -> None:
    reply.send(trio.run(well_behaved_load, port, seconds, WELL_BEHAVED))


def hostile_process(reply: Connection, port: int, seconds: float) -> None:
    """The request-level attacks in turn, HOSTILE_SLICE_S each, for `seconds`."""

    async def main() -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        end = trio.current_time() + seconds
        turn = 0
        while trio.current_time() < end:
            name = HOSTILE[turn % len(HOSTILE)]
            turn += 1
            ctx = AttackContext(port, min(end, trio.current_time() + HOSTILE_SLICE_S))
            await ATTACKS[name].run(ctx)
            seen.update({f"{name}: {what}": count for what, count in ctx.seen.items()})
        return seen

    reply.send(trio.run(main))


ADMIN_ROUND = (
    ("PUT", "a", 201), ("PUT", "a", 200), ("PUT", "b", 201), ("POST rollback", None, 200),
    ("DELETE", None, 200), ("POST rollback", None, 200), ("DELETE", None, 200),
)  # fmt: skip
"""(operation, module version uploaded, status expected): one round leaves no module. A
round that fails stops there, and the next starts by deleting what it left, so one failure
is counted once, not again in every step it put out of step."""


def admin_process(reply: Connection, port: int, seconds: float) -> None:
    """The operator's rounds of ADMIN_ROUND on tenant ops; sends back (statuses, failures)."""

    async def main() -> tuple[collections.Counter[str], collections.Counter[str]]:
        import wasmtime  # only this process needs it

        hello = bytes(wasmtime.wat2wasm((REPO / "tenants/demo/hello.wat").read_text()))
        versions = {"a": with_nonce(hello, 1), "b": with_nonce(hello, 2)}
        url = f"http://{SERVER_HOST}:{port}/_admin/v1/tenants/ops/modules/soak"
        seen: collections.Counter[str] = collections.Counter()
        failures: collections.Counter[str] = collections.Counter()
        end = trio.current_time() + seconds
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(local_address=QUIET_ADDRESS),
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=ADMIN_TIMEOUT_S,
        ) as client:
            in_step = True
            while trio.current_time() < end:
                if not in_step:  # a failed round: start the next one with no module
                    with contextlib.suppress(httpx.HTTPError):
                        await client.delete(url)  # 200, or 404 if there was none
                    in_step = True
                for operation, version, expected in ADMIN_ROUND:
                    what = f"{operation} {version or ''}".strip()
                    try:
                        if operation == "PUT":
                            answer = await client.put(
                                url, params={"route": "/soak"}, content=versions[version]
                            )
                        elif operation == "DELETE":
                            answer = await client.delete(url)
                        else:
                            answer = await client.post(url + "/rollback")
                    except httpx.HTTPError as exc:
                        failures[f"{what}: {type(exc).__name__}"] += 1
                        in_step = False
                        break
                    seen[f"{what} {answer.status_code}"] += 1
                    if answer.status_code != expected:
                        failures[f"{what}: {answer.status_code}, expected {expected}"] += 1
                        in_step = False
                        break
                await trio.sleep(ADMIN_PAUSE_S)  # an operator's pace
        return seen, failures

    reply.send(trio.run(main))


# Watching the pod --------------------------------------------------------------------------------


def steady_rss(root_pid: int) -> dict[int, int]:
    """Each server process's smallest RSS over STEADY_READS reads: a request in flight passes."""
    smallest: dict[int, int] = {}
    for read in range(STEADY_READS):
        if read:
            time.sleep(STEADY_READ_INTERVAL_S)  # spacing the reads, not waiting for an event
        for pid, size in rss_by_pid(root_pid).items():
            smallest[pid] = min(size, smallest.get(pid, size))
    return smallest


def requests_by_outcome(pod: Pod) -> dict[str, collections.Counter[str]]:
    """{tenant: {outcome status_class: count}} from the server's requests counter."""
    totals: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    pattern = r"^wasm_supervisor_requests_total\{([^}]*)\} (\S+)$"
    for labels, value in re.findall(pattern, pod.metrics(), re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        totals[fields["tenant"]][f"{fields['outcome']} {fields['status_class']}"] += int(
            float(value)
        )
    return totals


def role(pid: int, root_pid: int) -> str:
    """supervisor, worker, or helper: a process a worker started (a compile server, say),
    whose RSS is shown but not judged: it grows with what it compiles and may be replaced."""
    if pid == root_pid:
        return "supervisor"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return "helper"
    return "worker" if argv[1:4] == [b"-m", b"supervisor.cli", b"worker"] else "helper"


def judged(sizes: dict[int, int], root_pid: int) -> dict[int, int]:
    """The supervisor's and the workers' sizes: the processes the 5 % bound is about."""
    return {pid: size for pid, size in sizes.items() if role(pid, root_pid) != "helper"}


def describe_rss(sizes: dict[int, int], root_pid: int) -> str:
    return ", ".join(
        f"{role(pid, root_pid)} {pid} {size / 2**20:.1f} MiB" for pid, size in sorted(sizes.items())
    )


def report_every(interval_s: float, seconds: float) -> Iterator[float]:
    """Elapsed seconds at each report, every `interval_s` up to `seconds`, then at the end."""
    started = time.monotonic()
    at = interval_s
    while at < seconds:
        time.sleep(max(0.0, started + at - time.monotonic()))  # a report's schedule
        yield at
        at += interval_s
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    yield seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    parser.add_argument("--memory-guard-mib", type=int, default=MEMORY_GUARD_MIB,
                        help="SIGKILL a server process whose RSS passes this")  # fmt: skip
    args = parser.parse_args()
    seconds = args.minutes * 60
    warmup_s = seconds * WARMUP_FRACTION
    print(f"# soak\n\n`{' '.join([sys.executable, *sys.argv])}`\n", flush=True)
    problems: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-soak-") as root,
        pod(make_workspace(Path(root))) as serving,
    ):
        print(f"server: `{' '.join(serving.argv)}`", flush=True)
        print(f"{args.minutes:g} min; warm-up: the first {warmup_s:.0f} s (20 %); "
              f"well-behaved and operator from {QUIET_ADDRESS}, hostile from "
              f"{ATTACKER_ADDRESS}\n", flush=True)  # fmt: skip
        restarts_before = serving.restarts()
        clients = {
            "well-behaved": Child(well_behaved_process, serving.port, seconds),
            "hostile": Child(hostile_process, serving.port, seconds),
            "admin": Child(admin_process, serving.port, seconds),
        }
        baseline: dict[int, int] | None = None
        with MemoryGuard(serving.pid, args.memory_guard_mib << 20) as guard:
            for elapsed in report_every(REPORT_INTERVAL_S, seconds):
                sizes = steady_rss(serving.pid)
                if baseline is None and elapsed >= warmup_s:
                    baseline = judged(sizes, serving.pid)
                print(f"## t = {elapsed:.0f} s{' (warm-up)' if baseline is None else ''}")
                print(f"- RSS: {describe_rss(sizes, serving.pid)}")
                for tenant, outcomes in sorted(requests_by_outcome(serving).items()):
                    counts = ", ".join(f"{o} x{n}" for o, n in sorted(outcomes.items()))
                    print(f"- requests, {tenant}: {counts}")
                print(f"- worker restarts: {serving.restarts() - restarts_before}",
                      flush=True)  # fmt: skip
            results = {name: child.result(CHILD_GRACE_S) for name, child in clients.items()}
            final = steady_rss(serving.pid)
            restarts = serving.restarts() - restarts_before
        problems += [f"memory guard killed {kill}" for kill in guard.kills]
    print("\n## result\n")
    problems += check_rss(baseline or {}, final)
    problems += check_clients(results)
    if restarts:
        problems.append(f"{restarts} worker restart(s): a new worker has no warm-up to compare")
    for problem in problems:
        print(f"- {problem}")
    print(
        f"\nVERDICT: {'FAIL' if problems else 'PASS'}: {len(problems)} problem(s) in "
        f"{args.minutes:g} min (target: RSS within {RSS_GROWTH_LIMIT:.0%} of warm-up, no "
        "well-behaved request or admin operation failed, no worker restart)"
    )
    sys.exit(1 if problems else 0)


def check_rss(baseline: dict[int, int], final: dict[int, int]) -> list[str]:
    """Each process's growth since warm-up, printed; the ones past the limit, returned."""
    problems = []
    for pid, before in sorted(baseline.items()):
        after = final.get(pid)
        if after is None:
            problems.append(f"process {pid} is gone (it had {before / 2**20:.1f} MiB)")
            continue
        growth = after / before - 1
        print(f"- RSS of {pid}: {before / 2**20:.1f} MiB after warm-up, "
              f"{after / 2**20:.1f} MiB at the end: {growth:+.1%}")  # fmt: skip
        if growth > RSS_GROWTH_LIMIT:
            problems.append(f"process {pid} grew {growth:+.1%} after warm-up "
                            f"(limit {RSS_GROWTH_LIMIT:+.0%})")  # fmt: skip
    return problems


def check_clients(results: dict[str, object]) -> list[str]:
    """What each client saw, printed; well-behaved and admin failures, returned."""
    problems = []
    well: LoadResult | None = results["well-behaved"]  # type: ignore[assignment]
    if well is None:
        problems.append("the well-behaved client process died or overran")
    else:
        print(f"- well-behaved: {len(well.latencies_s):,} requests answered as expected, "
              f"p50 {well.percentile_ms(0.5):.2f} ms, p99 {well.percentile_ms(0.99):.2f} ms, "
              f"{sum(well.failures.values())} failed")  # fmt: skip
        for reason, count in well.failures.most_common(5):
            problems.append(f"well-behaved request failed: {reason} x{count}")
    hostile = results["hostile"]
    print(f"- hostile: {dict(hostile) if hostile is not None else 'process died or overran'}")
    admin = results["admin"]
    if admin is None:
        problems.append("the admin client process died or overran")
    else:
        seen, failures = admin
        print(f"- admin operations: {dict(seen)}")
        for reason, count in failures.most_common(5):
            problems.append(f"admin operation failed: {reason} x{count}")
    return problems


if __name__ == "__main__":
    main()
