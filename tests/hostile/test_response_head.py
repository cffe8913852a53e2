"""Hostile guests against the response head and the process log (issue 10, items 2 and 12).

A guest's CGI header block costs the host work per line and per byte: finding its end,
parsing it, encoding it. Each test runs a real server on 127.0.0.1 and checks that the
block is bounded by the tenant's policy (lines and bytes, 502 past either, naming the
bound), that the event loop stays free while a guest's output is parsed (`/healthz` keeps
answering), and that a guest's stderr stays on one log line of its own.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import trio
from conftest import add_hostile_tenant

from supervisor import gateway

HEALTHZ_MAX_LATENCY_S = 0.5
"""Slowest `/healthz` allowed while the 2,000,000-line head is refused. Parsing that head on
the event loop held it 3-5 s; the guest itself runs ~0.1 s in a thread of its own."""
REFUSAL_MAX_S = 3.0
"""Longest the 2,000,000-line head may take to be refused, start to end (the guest writes
8 MB in ~0.1 s; the rest of the bound is slack for a busy 2-core machine)."""


def outcomes(caplog: pytest.LogCaptureFixture, route: str) -> list[tuple[int, str]]:
    """(status, outcome) of each access-log record of `route`, in order."""
    return [
        (record.status, record.outcome)
        for record in caplog.records
        if record.name == "supervisor.access" and record.route == route
    ]


def head_of_lines(count: int) -> bytes:
    """A CGI header block of `count` lines (a content-type, then `x-N: v`), its blank line
    and a body."""
    lines = [b"content-type: text/plain\n"] + [b"x-%d: v\n" % n for n in range(count - 1)]
    return b"".join(lines) + b"\nbody"


def head_of_bytes(size: int) -> bytes:
    """A CGI header block of exactly `size` bytes, its blank line included, then a body."""
    start, end = b"content-type: text/plain\nx-pad: ", b"\n\n"
    return start + b"p" * (size - len(start) - len(end)) + end + b"body"


# Item 2: the header block is bounded, and never parsed on the event loop.


@pytest.mark.parametrize(
    ("policy", "bound"),
    [
        ("", "max_response_header_bytes"),  # 64KiB: the end of the block is never found
        ('max_response_header_bytes = "16MiB"\n', "max_response_headers"),  # 128 lines
    ],
    ids=["byte-bound", "line-bound"],
)
async def test_a_head_of_two_million_lines_is_refused_while_healthz_keeps_answering(
    workspace, start_supervisor, caplog, policy, bound
):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    add_hostile_tenant(workspace, "t", {"/lines": "response_head_lines.wat"}, policy)
    running = await start_supervisor()
    client = running.client
    answered: list[httpx.Response | Exception] = []
    latencies: list[float] = []

    async def ask_for_the_lines() -> None:
        try:
            answered.append(await client.get("/t/lines"))
        except httpx.HTTPError as exc:  # a head h11 cannot read, if it were ever sent
            answered.append(exc)

    async def poll_healthz() -> None:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as probe:
            while not answered:
                asked = time.perf_counter()
                health = await probe.get("/healthz")
                latencies.append(time.perf_counter() - asked)
                assert health.status_code == 200

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_healthz)
        nursery.start_soon(ask_for_the_lines)
    took = time.perf_counter() - started

    assert latencies, "no /healthz request ran while the head was being answered"
    assert max(latencies) < HEALTHZ_MAX_LATENCY_S, (
        f"/healthz waited {max(latencies):.2f} s while a guest's head was refused"
    )
    (response,) = answered
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 502
    assert bound in response.text
    assert took < REFUSAL_MAX_S, f"refusing the head took {took:.2f} s"
    assert outcomes(caplog, "/lines") == [(502, "bad_output")]


@pytest.mark.parametrize(
    ("output", "status", "bound"),
    [
        (head_of_lines(128), 200, None),
        (head_of_lines(129), 502, "max_response_headers"),
        (head_of_bytes(64 * 1024), 200, None),
        (head_of_bytes(64 * 1024 + 1), 502, "max_response_header_bytes"),
    ],
    ids=["128-lines", "129-lines", "64KiB", "64KiB+1"],
)
async def test_the_default_bounds_are_128_header_lines_and_64kib(
    workspace, start_supervisor, caplog, output, status, bound
):
    caplog.set_level(logging.INFO, logger="supervisor.access")
    add_hostile_tenant(workspace, "t", {"/echo": "response_head_echo.wat"})
    running = await start_supervisor()
    response = await running.client.post("/t/echo", content=output)
    assert response.status_code == status, response.text
    if bound is None:
        assert response.text == "body"
        assert outcomes(caplog, "/echo") == [(200, "ok")]
    else:
        assert bound in response.text
        assert outcomes(caplog, "/echo") == [(502, "bad_output")]


async def test_a_policy_with_higher_bounds_lets_a_larger_head_through(workspace, start_supervisor):
    # 96KiB: httpx (httpcore) reads a response head of at most 100KiB.
    add_hostile_tenant(
        workspace,
        "t",
        {"/echo": "response_head_echo.wat"},
        'max_response_headers = 1000\nmax_response_header_bytes = "96KiB"\n',
    )
    running = await start_supervisor()
    for output in (head_of_lines(1000), head_of_bytes(96 * 1024)):
        response = await running.client.post("/t/echo", content=output)
        assert (response.status_code, response.text) == (200, "body")
    for output, bound in (
        (head_of_lines(1001), "max_response_headers"),
        (head_of_bytes(96 * 1024 + 1), "max_response_header_bytes"),
    ):
        over = await running.client.post("/t/echo", content=output)
        assert over.status_code == 502
        assert bound in over.text


# Item 12, second bullet: a guest's stderr is one log line of its own.


async def test_guest_stderr_cannot_start_a_log_line_of_its_own(workspace, start_supervisor, caplog):
    caplog.set_level(logging.INFO, logger="supervisor.guest")
    add_hostile_tenant(workspace, "t", {"/": "response_head_stderr.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert (response.status_code, response.text) == (200, "ok\n")
    # The text log's format (cli.configure_logging): one record must be one line.
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    (record,) = [r for r in caplog.records if r.name == "supervisor.guest"]
    line = formatter.format(record)
    assert len(line.splitlines()) == 1, line
    assert "stderr: x\\nFORGED-ID victim GET /pay 200 ok 1.0ms fuel=0\\r\\x1b[2K\\n" in line


@pytest.mark.parametrize(
    ("char", "escaped"),
    [
        ("\n", "\\n"),
        ("\r", "\\r"),
        ("\t", "\\t"),
        ("\x00", "\\x00"),
        ("\x1b", "\\x1b"),
        ("\x7f", "\\x7f"),
        ("\x85", "\\x85"),  # C1 NEL: a line break to some log readers
        ("\u2028", "\\u2028"),  # LINE SEPARATOR: a line break to str.splitlines
        ("\\", "\\\\"),  # so that a guest cannot write what reads as an escape
    ],
)
def test_each_character_that_could_break_a_log_line_is_escaped(char, escaped):
    assert gateway._escape_controls(f"a{char}b é") == f"a{escaped}b é"
