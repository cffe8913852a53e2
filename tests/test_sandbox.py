"""What a run reports about itself: the gateway routes a module's next run by it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import wasmtime

from supervisor.errors import GuestTimeout
from supervisor.sandbox import GuestLimits, Sandbox

GUESTS = Path(__file__).parent / "guests"
HOSTILE_GUESTS = Path(__file__).parent / "hostile" / "guests"
BENCH_GUESTS = Path(__file__).parent.parent / "bench" / "guests"
DEMO = Path(__file__).parent.parent / "tenants" / "demo"
LIMITS = GuestLimits(
    fuel=10**10, memory_bytes=16 << 20, timeout_ms=10_000, max_stdout_bytes=1 << 20
)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(max_instances=2) as sandbox:
        yield sandbox


def _run(sandbox: Sandbox, wat: Path):
    prepared = sandbox.prepare(wasmtime.Module(sandbox.engine, wat.read_text()))
    return sandbox.run(prepared, "_start", argv=["/"], env={}, stdin=b"", limits=LIMITS)


def test_a_sleeping_guest_is_reported_as_slept_and_used_little_cpu(sandbox):
    run = _run(sandbox, GUESTS / "nap.wat")  # 1 s in poll_oneoff
    assert run.error is None and run.stdout.endswith(b"rested\n")
    assert run.slept
    assert run.duration_s >= 1.0
    assert run.cpu_s < run.duration_s / 10


def test_a_cpu_bound_guest_reports_its_cpu_time(sandbox):
    run = _run(sandbox, BENCH_GUESTS / "burn.wat")
    assert run.error is None and not run.slept
    assert run.cpu_s > 0
    assert run.cpu_s <= run.duration_s + 0.001  # thread CPU time never exceeds wall time


def _output(sandbox: Sandbox, wat: Path, argv: list[str], env: dict[str, str]) -> str:
    """The guest's stdout after its header block."""
    prepared = sandbox.prepare(wasmtime.Module(sandbox.engine, wat.read_text()))
    run = sandbox.run(prepared, "_start", argv=argv, env=env, stdin=b"", limits=LIMITS)
    assert run.error is None
    return run.stdout.partition(b"\n\n")[2].decode()


def test_the_guest_sees_argv_and_env_exactly_as_given(sandbox):
    argv = ["/p\u00e4th", "", "\u65e5\u672c=\U0001f600", "a b"]
    env = {"A": "1", "EMPTY": "", "N\u00c4ME": "v\u00e4lue \u65e5\u672c \U0001f600", "Z": "last"}
    assert _output(sandbox, GUESTS / "argv.wat", argv, env) == "".join(f"{a}\n" for a in argv)
    assert _output(sandbox, GUESTS / "argv.wat", [], {}) == ""
    assert _output(sandbox, DEMO / "echo.wat", argv, env) == "\n---\n" + "".join(
        f"{name}={value}\n" for name, value in env.items()
    )


def test_a_nul_ends_its_own_string_and_no_other(sandbox):
    """C strings: a NUL (a decoded `%00` in PATH_INFO, say) cuts the string it is in."""
    argv = ["/a\0b", "n\u00e4\0x", "z"]
    env = {"PATH_INFO": "/a\0b", "N\0AME": "n\u00e4\0x", "LAST": "z"}
    assert _output(sandbox, GUESTS / "argv.wat", argv, env) == "/a\nn\u00e4\nz\n"
    assert (
        _output(sandbox, DEMO / "echo.wat", argv, env) == "\n---\nPATH_INFO=/a\nN=n\u00e4\nLAST=z\n"
    )


def test_a_gather_write_to_stderr_keeps_the_allowance_and_drops_the_rest(sandbox):
    """64 GiB a call named by 65,536 iovecs, in a loop: kept up to max_stderr_bytes only,
    and the deadline ends it, checked inside the calls."""
    limits = replace(LIMITS, timeout_ms=100, max_stderr_bytes=4096)
    wat = (HOSTILE_GUESTS / "host_calls_gather_stderr.wat").read_text()
    prepared = sandbox.prepare(wasmtime.Module(sandbox.engine, wat))
    run = sandbox.run(prepared, "_start", argv=["/"], env={}, stdin=b"", limits=limits)
    assert isinstance(run.error, GuestTimeout)
    assert (run.stderr, run.stderr_truncated) == (bytes(4096), True)
    assert run.duration_s < 0.5


def test_a_guest_looping_on_host_calls_leaves_the_gil_half_the_time(sandbox):
    """poll_oneoff refused (EINVAL) in an endless loop: each call is ~1.5 µs of host Python,
    and back to back they would keep the GIL from the event loop. The process's host-call
    budget (HOST_SHARE) makes the guest sleep, without the GIL, for most of its run."""
    limits = replace(LIMITS, timeout_ms=300, fuel=10**13, max_poll_subscriptions=32)
    wat = (HOSTILE_GUESTS / "host_calls_poll_loop.wat").read_text()  # asks for 64
    prepared = sandbox.prepare(wasmtime.Module(sandbox.engine, wat))
    run = sandbox.run(prepared, "_start", argv=["/"], env={}, stdin=b"", limits=limits)
    assert isinstance(run.error, GuestTimeout)
    assert run.cpu_s < 0.5 * run.duration_s, (run.cpu_s, run.duration_s)
