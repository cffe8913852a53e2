"""Every row of DESIGN.md's "Outcomes" table, as a client of a real server sees it.

Each test starts the production assembly on 127.0.0.1 over a temp tenants folder, sends real
HTTP and checks the status, that the body names the reason (and never echoes the guest's own
output), and whether `Retry-After` is set. Limits are exercised by the guests of
`tests/guests/`, one behaviour each.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import httpx
import pytest
import trio

from supervisor.wagi import MISSING_HEADERS_MESSAGE

WAIT_S = 5
"""Bound on waiting for a server-side event; a server that never gets there fails the test."""
POLL_S = 0.001
SLEEPER_TIMEOUT_MS = 1000
"""Deadline of `sleep.wat` when it only occupies a slot: long enough for the requests a test
makes meanwhile, short enough that its 504 ends the test quickly."""
PROMPT_S = 0.5
"""A request that needs no queueing answers well within this, even on a busy CI machine."""
MiB = 1024 * 1024


def vm_rss_bytes() -> int:
    """This process's resident set: the server runs in-process, so it is the server's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def wait_until(predicate) -> None:
    """Poll a server-side condition (same event loop), failing after `WAIT_S`."""
    with trio.fail_after(WAIT_S):
        while not predicate():
            await trio.sleep(POLL_S)


def outcome_of(caplog: pytest.LogCaptureFixture, status: int) -> str:
    """The `outcome` label the access log gave the one request that answered `status`."""
    outcomes = [
        record.outcome
        for record in caplog.records
        if record.name == "supervisor.access" and record.status == status
    ]
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


# Guest returned, or proc_exit(0), with valid CGI output: the status comes from the output.


async def test_valid_output_answers_with_its_own_status(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat", "/status": "status_text.wat"})
    running = await start_supervisor()
    hello = await running.client.get("/t/hello")
    assert (hello.status_code, hello.text) == (200, "hello from wasm\n")
    status = await running.client.get("/t/status")
    assert (status.status_code, status.reason_phrase) == (404, "Not Found")
    assert status.text == "nothing here\n"


async def test_proc_exit_zero_after_output_is_success(workspace, start_supervisor):
    workspace.add_tenant("t", {"/": "exit_zero.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert (response.status_code, response.text) == (200, "exiting with 0\n")


# Output lacking content-type/location/status, or no blank line: 500 with WAGI's message.


@pytest.mark.parametrize("guest", ["no_content_type.wat", "no_blank_line.wat"])
async def test_output_that_is_not_cgi_is_500_with_wagis_message(workspace, start_supervisor, guest):
    workspace.add_tenant("t", {"/": guest})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 500
    assert response.text == MISSING_HEADERS_MESSAGE + "\n"
    assert "retry-after" not in response.headers


# Bad Status, bad header: 502, and the connection lives on.


async def test_status_outside_100_to_999_is_502(workspace, start_supervisor):
    workspace.add_tenant("t", {"/": "bad_status.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 502
    assert "Status" in response.text
    assert "bad status" not in response.text  # the guest's body is not passed on


async def test_invalid_header_is_502_and_the_connection_stays_usable(workspace, start_supervisor):
    workspace.add_tenant("t", {"/bad": "bad_header.wat", "/hello": "hello.wat"})
    running = await start_supervisor()
    bad = await running.client.get("/t/bad")
    assert bad.status_code == 502
    assert "control character" in bad.text and "x-bad" in bad.text
    good = await running.client.get("/t/hello")
    assert (good.status_code, good.text) == (200, "hello from wasm\n")
    # Same client port: the server kept the connection open rather than dropping it.
    assert local_address(bad) == local_address(good)


def local_address(response: httpx.Response) -> tuple:
    return response.extensions["network_stream"].get_extra_info("client_addr")


# Output over max_response_bytes: 502, the guest is stopped, nothing is buffered forever.


async def test_endless_output_is_cut_at_max_response_bytes_with_502(workspace, start_supervisor):
    cap = 1 * MiB
    workspace.add_tenant("t", {"/": "flood.wat"}, policy='max_response_bytes = "1MiB"\n')
    running = await start_supervisor()
    for _ in range(2):  # warm up: first-use allocations are not growth
        assert (await running.client.get("/t/")).status_code == 502
    # With the cyclic GC off, an output kept alive by a reference cycle stays counted too.
    gc.disable()
    try:
        before = vm_rss_bytes()
        for _ in range(20):
            response = await running.client.get("/t/")
            assert response.status_code == 502
            assert "max_response_bytes" in response.text
            assert len(response.content) < 1024  # an error message, not the guest's output
        growth = vm_rss_bytes() - before
    finally:
        gc.enable()
    assert growth < 4 * cap, f"RSS grew by {growth / MiB:.1f} MiB over 20 floods"


# proc_exit(n != 0), trap, missing entrypoint: 500 saying which, without the guest's output.


async def test_nonzero_exit_is_500_despite_valid_output(workspace, start_supervisor, caplog):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    workspace.add_tenant("t", {"/": "exit_three.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 500
    assert "exited with code 3" in response.text
    assert "exiting with 3" not in response.text
    assert outcome_of(caplog, 500) == "trap"


async def test_trap_is_500_naming_the_trap(workspace, start_supervisor, caplog):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    workspace.add_tenant("t", {"/": "trap.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 500
    assert "trap" in response.text and "unreachable" in response.text
    assert "about to trap" not in response.text
    assert outcome_of(caplog, 500) == "trap"


async def test_missing_entrypoint_is_refused_at_load(workspace, start_supervisor):
    """The registry checks entrypoints when it loads a tenant, so no request ever reaches a
    missing export: the whole tenant is not served (its good routes too) and the error names
    the file, the key and the export, while other tenants are served as usual."""
    workspace.add_tenant(
        "t", {"/good": "hello.wat", "/bad": ("entry.wat", {"entrypoint": "nowhere"})}
    )
    workspace.add_tenant("other", {"/hello": "hello.wat"})
    running = await start_supervisor()
    error = running.app.registry.state.errors["t"]
    assert "modules.toml" in error and "entrypoint" in error and "'nowhere'" in error
    assert (await running.client.get("/t/bad")).status_code == 404
    assert (await running.client.get("/t/good")).status_code == 404
    assert (await running.client.get("/other/hello")).status_code == 200


async def test_initial_memory_over_the_limit_is_refused_at_load(workspace, start_supervisor):
    workspace.add_tenant("t", {"/": "big_initial_memory.wat"}, policy='memory_bytes = "16MiB"\n')
    running = await start_supervisor()
    error = running.app.registry.state.errors["t"]
    assert "big_initial_memory.wat" in error and "initial memory" in error
    assert (await running.client.get("/t/")).status_code == 404


# Memory limit: 500, classified as memory.


async def test_memory_bomb_is_500_classified_memory(workspace, start_supervisor, caplog):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    workspace.add_tenant("t", {"/": "membomb.wat"}, policy='memory_bytes = "16MiB"\n')
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 500
    assert "memory" in response.text
    assert "retry-after" not in response.headers
    assert outcome_of(caplog, 500) == "memory"


# Fuel exhausted: 503 without Retry-After.


async def test_fuel_exhaustion_is_503_without_retry_after(workspace, start_supervisor, caplog):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    workspace.add_tenant("t", {"/": "fuel_burn.wat"}, policy="fuel_per_request = 1_000_000\n")
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 503
    assert "fuel" in response.text
    assert "retry-after" not in response.headers
    assert outcome_of(caplog, 503) == "fuel"


# Wall-clock deadline: 504, on time, for a spinning guest and for one asleep in WASI.


@pytest.mark.parametrize("guest", ["loop.wat", "sleep.wat"])
async def test_deadline_is_504_on_time_and_frees_the_slot(workspace, start_supervisor, guest):
    timeout_ms = 300
    workspace.add_tenant(
        "t", {"/slow": guest, "/hello": "hello.wat"}, policy=f"timeout_ms = {timeout_ms}\n"
    )
    running = await start_supervisor(slots=1)
    started = trio.current_time()
    response = await running.client.get("/t/slow")
    elapsed = trio.current_time() - started
    assert response.status_code == 504
    assert "deadline" in response.text
    assert "retry-after" not in response.headers
    deadline = timeout_ms / 1000
    assert deadline <= elapsed < deadline + 1, elapsed
    # The only slot came back: the next request runs.
    assert (await running.client.get("/t/hello")).status_code == 200


# Admission: tenant queue full or queue wait timeout → 429; pod saturated → 503; both say when
# to retry.


def occupying_tenant(workspace, name: str, extra_policy: str = "") -> None:
    """A tenant whose `/sleep` holds one slot for `SLEEPER_TIMEOUT_MS`, then answers 504."""
    workspace.add_tenant(
        name,
        {"/sleep": "sleep.wat", "/hello": "hello.wat"},
        policy=f"timeout_ms = {SLEEPER_TIMEOUT_MS}\n{extra_policy}",
    )


async def occupy(running, name: str, nursery: trio.Nursery) -> None:
    """Start `/<name>/sleep` in the background and return once it holds its slot."""

    async def sleeper() -> None:
        response = await running.client.get(f"/{name}/sleep")
        assert response.status_code == 504

    nursery.start_soon(sleeper)
    await wait_until(lambda: running.app.admission.tenant_statistics(name).running == 1)


async def test_full_tenant_queue_is_429_while_other_tenants_are_served(workspace, start_supervisor):
    occupying_tenant(workspace, "t", "max_concurrency = 1\nmax_queue = 0\n")
    workspace.add_tenant("u", {"/hello": "hello.wat"})
    running = await start_supervisor()
    async with trio.open_nursery() as nursery:
        await occupy(running, "t", nursery)
        refused = await running.client.get("/t/hello")
        assert refused.status_code == 429
        assert "queue" in refused.text
        assert refused.headers["retry-after"].isdigit()

        started = trio.current_time()
        other = await running.client.get("/u/hello")
        latency = trio.current_time() - started
        assert (other.status_code, other.text) == (200, "hello from wasm\n")
        assert latency < PROMPT_S
        # Served while `t` still held its slot: it did not wait for `t` at all.
        assert running.app.admission.tenant_statistics("t").running == 1


async def test_queue_wait_timeout_is_429(workspace, start_supervisor):
    occupying_tenant(workspace, "t", "max_concurrency = 1\nmax_queue = 1\nqueue_timeout_ms = 50\n")
    running = await start_supervisor()
    async with trio.open_nursery() as nursery:
        await occupy(running, "t", nursery)
        response = await running.client.get("/t/hello")
        assert response.status_code == 429
        assert "timed out" in response.text
        assert response.headers["retry-after"].isdigit()


async def test_saturated_pod_is_503_with_retry_after(workspace, start_supervisor):
    occupying_tenant(workspace, "t")
    workspace.add_tenant("u", {"/hello": "hello.wat"})
    running = await start_supervisor(slots=1, global_queue=0)
    async with trio.open_nursery() as nursery:
        await occupy(running, "t", nursery)
        response = await running.client.get("/u/hello")
        assert response.status_code == 503
        assert "slots" in response.text
        assert response.headers["retry-after"].isdigit()


# Unknown tenant / no route: 404.


async def test_unknown_tenant_and_unknown_route_are_404(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    workspace.add_tenant("orphan", {"/hello": "hello.wat"})
    (workspace.policies / "orphan.toml").unlink()
    running = await start_supervisor()
    unknown_tenant = await running.client.get("/nobody/hello")
    assert unknown_tenant.status_code == 404
    assert "tenant" in unknown_tenant.text
    no_route = await running.client.get("/t/nothing-here")
    assert no_route.status_code == 404
    assert "route" in no_route.text
    # A tenant with no policy file is not served either, though its folder exists.
    assert (await running.client.get("/orphan/hello")).status_code == 404


# Request body too large / head too large / bad HTTP: 413 / 431 / 400.


async def test_body_over_max_request_bytes_is_413(workspace, start_supervisor):
    workspace.add_tenant("t", {"/...": "echo.wat"}, policy='max_request_bytes = "1KiB"\n')
    running = await start_supervisor()
    fits = await running.client.post("/t/x", content=b"a" * 1024)
    assert fits.status_code == 200
    declared = await running.client.post("/t/x", content=b"a" * 1025)
    assert declared.status_code == 413
    assert "1024" in declared.text

    async def chunks():
        for _ in range(4):
            yield b"b" * 512

    streamed = await running.client.post("/t/x", content=chunks())
    assert streamed.status_code == 413


async def test_head_too_large_is_431(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/hello", headers={"x-big": "a" * 32 * 1024})
    assert response.status_code == 431


async def test_malformed_http_is_400(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    stream = await trio.open_tcp_stream("127.0.0.1", running.app.port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        with trio.fail_after(WAIT_S):
            while b"\r\n" not in received:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                received += chunk
    assert received.startswith(b"HTTP/1.1 400 ")
