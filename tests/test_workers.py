"""`serve --workers 2` as an operator runs it: a supervisor and two worker processes.

Each test starts the real command (test_lifecycle.serve_process) and drives it with signals
and HTTP. Which worker answered a request is told by its `x-request-id`: each worker's server
draws a random 8-hex-digit prefix. Worker processes are read from /proc (the children of the
supervisor's fork server), the merged `/metrics` from the port the supervisor logs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h11
import httpx
import pytest
import trio
from conftest import REPO, Workspace
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from test_lifecycle import (
    EXIT_TIMEOUT_S,
    NAP_S,
    PROC_NET_TCP,
    ServerProcess,
    read_response,
    serve_process,
    wait_until_refused,
    wait_until_server_read,
)
from test_metrics import PROMTOOL, Samples, samples_of, value

TWO_WORKERS = ["--workers", "2"]
WAIT_S = 20.0
"""Bound on a state the test waits for (a worker restarted, a roll done): a worker starts in
about a second; a server that never gets there fails the test."""
POLL_S = 0.02
METRICS_ON = re.compile(r"metrics on http://[^:/\s]+:(?P<port>\d+)/metrics")
# Fresh connection per request: which worker accepts is decided per connection, and a
# rolling restart is judged on requests, not on keep-alive races (see workers.py).
NO_KEEP_ALIVE = httpx.Limits(max_keepalive_connections=0)

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")


def children(pid: int) -> set[int]:
    """A process's children (any of its threads may have started them)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids.update(int(child) for child in (task / "children").read_text().split())
    return pids


def worker_pids(server: ServerProcess) -> set[int]:
    """The worker processes: the children of the supervisor's only child, its fork server."""
    (fork_server,) = children(server.process.pid)
    return children(fork_server)


def worker_of(response: httpx.Response) -> str:
    return response.headers["x-request-id"][:8]


async def scrape(server: ServerProcess, accept: str = "") -> str:
    """The merged /metrics, once the supervisor serves it (after every worker is ready)."""
    with trio.fail_after(WAIT_S):
        while (found := METRICS_ON.search(server.log())) is None:
            await trio.sleep(POLL_S)
    port = int(found["port"])
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", headers={"accept": accept})
    assert response.status_code == 200
    return response.text


async def wait_for_samples(server: ServerProcess, check) -> Samples:
    """Scrape until `check(samples)` is true."""
    with trio.fail_after(WAIT_S):
        while not check(samples := samples_of(await scrape(server))):
            await trio.sleep(POLL_S)
    return samples


def requests_served(samples: Samples) -> float:
    return sum(
        count for (name, _), count in samples.items() if name == "wasm_supervisor_requests_total"
    )


async def until_both_workers_answer(http: httpx.AsyncClient, path: str) -> list[httpx.Response]:
    """Requests on fresh connections until two different workers have answered."""
    responses: list[httpx.Response] = []
    with trio.fail_after(WAIT_S):
        while len({worker_of(r) for r in responses}) < 2:
            responses.append(await http.get(path))
    return responses


async def test_a_worker_killed_with_sigkill_is_restarted_and_serving_continues(
    workspace: Workspace,
) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        served = len(await until_both_workers_answer(http, "/demo/hello"))
        before = await wait_for_samples(server, lambda s: requests_served(s) == served)
        first, second = sorted(worker_pids(server))
        os.kill(first, signal.SIGKILL)

        # The other worker serves on while the killed one is replaced.
        statuses = []
        with trio.fail_after(WAIT_S):
            while len(pids := worker_pids(server)) < 2 or first in pids:
                statuses.append((await http.get("/demo/hello")).status_code)
        assert second in pids
        after = await wait_for_samples(server, lambda s: value(s, "wasm_supervisor_workers") == 2)
        assert value(after, "wasm_supervisor_worker_restarts_total") == 1
        # What the killed worker had counted is still in the pod's counters.
        assert requests_served(after) >= requests_served(before) + len(statuses)
        new_worker = await until_both_workers_answer(http, "/demo/hello")
    assert set(statuses) == {200}
    assert {r.status_code for r in new_worker} == {200}
    assert f"(pid {first}) died (signal SIGKILL); restarting" in server.log()


async def test_sighup_rolls_every_worker_without_a_failed_request(workspace: Workspace) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    outcomes: list[int | str] = []
    answered_by: set[str] = set()

    async def steady_stream(http: httpx.AsyncClient, stop: trio.Event) -> None:
        while not stop.is_set():
            try:
                response = await http.get("/demo/hello")
            except httpx.HTTPError as exc:
                outcomes.append(repr(exc))
            else:
                outcomes.append(response.status_code)
                answered_by.add(worker_of(response))

    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        old = worker_pids(server)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(steady_stream, http, stop)
            server.process.send_signal(signal.SIGHUP)
            with trio.fail_after(WAIT_S):
                while "rolling restart done" not in server.log():
                    await trio.sleep(POLL_S)
            stop.set()
        new = worker_pids(server)
    assert not old & new and len(new) == 2
    failed = [outcome for outcome in outcomes if outcome != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed: {failed[:5]}"
    assert len(outcomes) > 100
    assert len(answered_by) >= 3  # old workers and new ones answered during the roll


async def test_a_tenant_limit_holds_for_the_pod_whichever_worker_a_request_lands_on(
    workspace: Workspace,
) -> None:
    """max_concurrency = 1, no queue: while one guest sleeps, every other request is refused,
    on the worker running it and on the other one."""
    workspace.add_tenant(
        "solo",
        {"/": "sleep.wat"},
        policy="max_concurrency = 1\nmax_queue = 0\ntimeout_ms = 2500\n",
    )
    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        first: dict[str, httpx.Response] = {}

        async def sleeper() -> None:
            first["response"] = await http.get("/solo/")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await wait_for_samples(server, lambda s: value(s, "wasm_supervisor_busy_slots") == 1)
            refused = await until_both_workers_answer(http, "/solo/")
            assert "response" not in first  # the guest still sleeps: both saw it running
    assert {r.status_code for r in refused} == {429}
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert first["response"].status_code == 504  # it ran to its deadline, never refused


@pytest.mark.skipif(not PROC_NET_TCP.exists(), reason="needs Linux /proc/net/tcp")
async def test_sigterm_drains_every_worker_and_exits_0(workspace: Workspace) -> None:
    workspace.add_tenant("slow", {"/nap": "nap.wat"})
    async with serve_process(workspace, extra=TWO_WORKERS) as server:
        workers = worker_pids(server)
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/slow/nap", headers=[("Host", "127.0.0.1")])
        finished: dict[str, object] = {}

        async def in_flight(stream: trio.SocketStream) -> None:
            finished["response"] = await read_response(stream, client)
            finished["at"] = trio.current_time()

        async with await trio.open_tcp_stream("127.0.0.1", server.port) as stream:
            sent_at = trio.current_time()
            await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
            await wait_until_server_read(server.port, stream.socket.getsockname()[1])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight, stream)
                server.process.send_signal(signal.SIGTERM)
                await wait_until_refused(server.port)
                refused_at = trio.current_time()
        with trio.fail_after(EXIT_TIMEOUT_S):
            returncode = await server.process.wait()

    status, headers, body = finished["response"]
    assert (status, body, headers["connection"]) == (200, b"rested\n", "close")
    assert refused_at < finished["at"]
    assert finished["at"] - sent_at >= NAP_S * 0.9
    assert returncode == 0, server.log()
    assert "SIGTERM: draining 2 workers" in server.log()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its supervisor"


async def test_merged_metrics_are_valid_and_add_up_both_workers(workspace: Workspace) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=[*TWO_WORKERS, "--slots", "4"]) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        served = len(await until_both_workers_answer(http, "/demo/hello"))
        samples = await wait_for_samples(server, lambda s: requests_served(s) == served)
        text = await scrape(server)
        openmetrics = await scrape(server, "application/openmetrics-text; version=1.0.0")

    ok = {("tenant", "other"), ("outcome", "ok"), ("status_class", "2xx")}
    assert samples["wasm_supervisor_requests_total", frozenset(ok)] == served
    assert value(samples, "wasm_supervisor_execution_slots") == 2 * 4
    assert value(samples, "wasm_supervisor_queue_capacity") == 2 * 256
    assert value(samples, "wasm_supervisor_workers") == 2
    assert value(samples, "wasm_supervisor_worker_restarts_total") == 0
    # Each worker's copy of the registry state is counted once, not twice.
    assert value(samples, "wasm_supervisor_tenants") == 1
    build = [n for (n, _) in samples if n == "wasm_supervisor_build_info"]
    assert len(build) == 1
    assert [v for (n, _), v in samples.items() if n == "wasm_supervisor_build_info"] == [1]
    histogram_count = ("wasm_supervisor_request_duration_seconds_count", {("tenant", "other")})
    assert samples[histogram_count[0], frozenset(histogram_count[1])] == served
    assert {f.name for f in parse_om(openmetrics)} >= {"wasm_supervisor_requests"}
    if PROMTOOL is not None:
        result = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stdout + result.stderr


def allowed_cpus(pid: int) -> set[str]:
    """The CPU lists of every thread of a process (`Cpus_allowed_list` in /proc)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin 2 workers")
async def test_with_a_cpu_per_worker_each_worker_and_all_its_threads_keep_to_one_cpu(
    workspace: Workspace,
) -> None:
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=TWO_WORKERS) as server,
        httpx.AsyncClient(base_url=server.url, limits=NO_KEEP_ALIVE) as http,
    ):
        await until_both_workers_answer(http, "/demo/hello")  # every thread has started
        cpus = sorted(os.sched_getaffinity(0))
        pinned = [allowed_cpus(pid) for pid in sorted(worker_pids(server))]
    assert sorted(pinned, key=sorted) == sorted([{str(cpus[0])}, {str(cpus[1])}], key=sorted)


async def test_workers_are_forked_with_every_module_imported_and_import_nothing_again(
    workspace: Workspace,
) -> None:
    """Issue 11: a worker exec'd as a new interpreter paid every import the supervisor had
    paid already. Python's import profiler (PYTHONPROFILEIMPORTTIME) logs each import of each
    interpreter: the server's modules are imported once for the whole pod (a compile child,
    a new interpreter of its own, imports only the compiler)."""
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    async with (
        serve_process(workspace, extra=TWO_WORKERS, env={"PYTHONPROFILEIMPORTTIME": "1"}) as srv,
        httpx.AsyncClient(base_url=srv.url, limits=NO_KEEP_ALIVE) as http,
    ):
        await until_both_workers_answer(http, "/demo/hello")
        log = srv.log()
    for module in ("supervisor.gateway", "supervisor.server", "supervisor.admin"):
        imports = re.findall(rf"^import time:.*\|\s+{re.escape(module)}$", log, re.MULTILINE)
        assert len(imports) == 1, (module, imports)


def test_the_serving_code_imports_no_httpx() -> None:
    """Issue 11: the serving path imports only what serving needs. httpx (~55 ms of imports
    here, most of a pod's margin over the bare imports) is what outbound HTTP parses URLs
    with, so it is imported at a tenant's first outbound call, not at start-up."""
    probe = "import sys, supervisor.cli, supervisor.app; print('httpx' in sys.modules)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "False", "serving imports httpx"
