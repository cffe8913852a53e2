"""Hostile guests against the host functions we write ourselves (issue 10, items 1, 6, 12).

A guest calls `fd_write` and `poll_oneoff` with arguments chosen to make the host work far
more than the guest does: gather writes naming the same memory thousands of times, millions
of empty iovecs, more subscriptions than any program needs, loops of cheap calls. Each test
runs a real server on 127.0.0.1 and checks that the bound holds where the work is done: the
output caps iovec by iovec, the deadline inside the call, the fuel charged per call, and the
outcome DESIGN.md's table gives (status and access-log outcome).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import add_hostile_tenant

from supervisor import sandbox

MiB = 1024 * 1024


def access_record(caplog: pytest.LogCaptureFixture, route: str) -> logging.LogRecord:
    """The one access-log record of the request to `route`."""
    records = [
        record
        for record in caplog.records
        if record.name == "supervisor.access" and record.route == route
    ]
    assert len(records) == 1, records
    return records[0]


def peak_rss_since_reset() -> int:
    """This process's RSS high-water mark (VmHWM) since `reset_peak_rss`: the server runs
    in-process, so a copy it makes while serving shows here even after it is freed."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS


# Item 1: gather writes are copied iovec by iovec, up to the cap, within the deadline.


async def test_a_gather_write_to_stdout_stops_at_the_cap_without_copying_the_rest(
    workspace, start_supervisor, caplog
):
    """512 iovecs over the same 1 MiB: 512 MiB if copied whole; the cap is 1 MiB."""
    caplog.set_level(logging.INFO, logger="supervisor.access")
    policy = 'max_response_bytes = "1MiB"\n'
    add_hostile_tenant(workspace, "t", {"/gather": "host_calls_gather_stdout.wat"}, policy)
    running = await start_supervisor()
    reset_peak_rss()
    before = peak_rss_since_reset()
    response = await running.client.get("/t/gather")
    grown = peak_rss_since_reset() - before
    assert response.status_code == 502
    assert "max_response_bytes" in response.text
    assert access_record(caplog, "/gather").outcome == "output_limit"
    assert grown < 16 * MiB, f"serving the gather write raised RSS by {grown / MiB:.0f} MiB"


async def test_a_gather_write_to_stderr_ends_at_the_deadline(workspace, start_supervisor, caplog):
    """16,384 iovecs over the same 1 MiB, in a loop: 16 GiB a call if copied whole."""
    caplog.set_level(logging.INFO, logger="supervisor.access")
    policy = "timeout_ms = 200\nfuel_per_request = 10_000_000_000_000\n"
    add_hostile_tenant(workspace, "t", {"/gather": "host_calls_gather_stderr.wat"}, policy)
    running = await start_supervisor()
    started = time.monotonic()
    response = await running.client.get("/t/gather")
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert access_record(caplog, "/gather").outcome == "timeout"
    assert elapsed < 1.0, f"answered {elapsed:.2f} s after a deadline of 0.2 s"


async def test_an_fd_write_of_millions_of_empty_iovecs_ends_at_the_deadline_inside_the_call(
    workspace, start_supervisor, caplog
):
    """No byte to copy, so no cap applies: only the deadline checked inside the call ends
    it (the epoch deadline cannot interrupt host code)."""
    caplog.set_level(logging.INFO, logger="supervisor.access")
    policy = 'timeout_ms = 20\nfuel_per_request = 10_000_000_000_000\nmemory_bytes = "32MiB"\n'
    add_hostile_tenant(workspace, "t", {"/empty": "host_calls_empty_iovecs.wat"}, policy)
    running = await start_supervisor()
    response = await running.client.get("/t/empty")
    assert response.status_code == 504
    assert access_record(caplog, "/empty").outcome == "timeout"


# Item 6: poll_oneoff is bounded per call, and host calls cost the guest fuel.


@pytest.mark.parametrize(
    ("max_poll_subscriptions", "errno"),
    [(64, sandbox.ERRNO_INVAL), (65, sandbox.ERRNO_SUCCESS)],
)
async def test_poll_oneoff_past_max_poll_subscriptions_fails_with_einval(
    workspace, start_supervisor, max_poll_subscriptions, errno
):
    """The guest asks for 65 subscriptions and prints the errno it got."""
    policy = f"max_poll_subscriptions = {max_poll_subscriptions}\n"
    add_hostile_tenant(workspace, "t", {"/poll": "host_calls_poll_many.wat"}, policy)
    running = await start_supervisor()
    response = await running.client.get("/t/poll")
    assert (response.status_code, response.text) == (200, f"errno={errno:02d}\n")


async def test_a_guest_looping_on_poll_oneoff_runs_out_of_fuel_not_out_of_time(
    workspace, start_supervisor, caplog
):
    """20 million fuel pays for about as many of its own instructions (~2 million calls
    uncharged, minutes of host work); charged, it is spent within a fraction of a second."""
    caplog.set_level(logging.INFO, logger="supervisor.access")
    policy = "timeout_ms = 3000\nfuel_per_request = 20_000_000\n"
    add_hostile_tenant(workspace, "t", {"/loop": "host_calls_poll_loop.wat"}, policy)
    running = await start_supervisor()
    started = time.monotonic()
    response = await running.client.get("/t/loop")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert access_record(caplog, "/loop").outcome == "fuel"
    assert elapsed < 1.0, f"ran {elapsed:.2f} s on 20 million fuel"


async def test_each_fd_write_is_charged_to_the_guests_fuel(workspace, start_supervisor, caplog):
    """1,000 empty fd_writes: a few thousand instructions, plus the host's base charge each."""
    caplog.set_level(logging.INFO, logger="supervisor.access")
    add_hostile_tenant(workspace, "t", {"/writes": "host_calls_write_loop.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/writes")
    assert (response.status_code, response.text) == (200, "wrote\n")
    assert access_record(caplog, "/writes").fuel_used > 1000 * sandbox.FD_WRITE_FUEL


# Item 12: a start function that never returns is a timeout.


async def test_a_start_function_that_never_returns_is_a_timeout(
    workspace, start_supervisor, caplog
):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    add_hostile_tenant(
        workspace, "t", {"/start": "host_calls_start_loop.wat"}, "timeout_ms = 100\n"
    )
    running = await start_supervisor()
    response = await running.client.get("/t/start")
    assert response.status_code == 504
    assert access_record(caplog, "/start").outcome == "timeout"
