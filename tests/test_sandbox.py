"""What a run reports about itself: the gateway routes a module's next run by it."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from supervisor.sandbox import GuestLimits, Sandbox

GUESTS = Path(__file__).parent / "guests"
BENCH_GUESTS = Path(__file__).parent.parent / "bench" / "guests"
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
