"""Host-call cost: what one call of our `fd_write` and `poll_oneoff` costs the host, against
the fuel a guest burns per ns of its own CPU. The figures beside `sandbox.FD_WRITE_FUEL` and
its neighbours come from here.

    PYTHONPATH=. python bench/host_call_cost.py [--calls 20000]

Each case is a WAT guest that makes the same call `--calls` times in a loop; the per-call
time is the run's thread CPU time less that of the same loop without the call, divided by
the calls (median of 5 runs, one thread, in this process, production `Sandbox.run`). The
per-byte cost compares 8 MiB written in 64 KiB pieces with as many empty writes.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import wasmtime

from supervisor import sandbox as sandbox_module
from supervisor.sandbox import GuestLimits, Sandbox

BURN = Path(__file__).parent / "guests" / "burn.wat"
RUNS = 5
LIMITS = GuestLimits(
    fuel=10**15,
    memory_bytes=64 << 20,
    timeout_ms=600_000,
    max_stdout_bytes=1 << 30,
    max_stderr_bytes=0,
    max_poll_subscriptions=4096,
)

LOOP = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1024)
  (func (export "_start")
    (local $left i32) (local $i i32)
    ;; iovecs at 0: {ptr 1 MiB, len SIZE} x IOVECS; subscriptions (zeros) at 16 MiB
    (loop $fill
      (i32.store (i32.mul (local.get $i) (i32.const 8)) (i32.const 1048576))
      (i32.store offset=4 (i32.mul (local.get $i) (i32.const 8)) (i32.const SIZE))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (i32.const IOVECS))))
    (local.set $left (i32.const CALLS))
    (loop $again
      CALL
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $again (local.get $left)))))
"""
WRITE = "(drop (call $fd_write (i32.const FD) (i32.const 0) (i32.const IOVECS) (i32.const 32768)))"
POLL = (
    "(drop (call $poll (i32.const 16777216) (i32.const 33554432) (i32.const SUBS)"
    " (i32.const 32768)))"
)


def per_run_cpu(sandbox: Sandbox, wat: str, argv: str = "x") -> float:
    prepared = sandbox.prepare(wasmtime.Module(sandbox.engine, wat))
    times = []
    for _ in range(RUNS):
        run = sandbox.run(prepared, "_start", argv=[argv], env={}, stdin=b"", limits=LIMITS)
        assert run.error is None, run.error
        times.append(run.cpu_s)
    return statistics.median(times)


def guest(
    call: str, calls: int, *, iovecs: int = 1, size: int = 0, fd: int = 1, subs: int = 1
) -> str:
    text = LOOP.replace("CALLS", str(calls)).replace("CALL", call)
    for name, value in (("IOVECS", iovecs), ("SIZE", size), ("FD", fd), ("SUBS", subs)):
        text = text.replace(name, str(value))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    calls = parser.parse_args().calls
    with Sandbox(max_instances=2) as sandbox:
        burn = sandbox.prepare(wasmtime.Module(sandbox.engine, BURN.read_text()))
        fuel_rates = []
        for _ in range(RUNS):
            run = sandbox.run(burn, "_start", argv=["burn"], env={}, stdin=b"", limits=LIMITS)
            fuel_rates.append(run.fuel_used / (run.cpu_s * 1e9))
        print(f"guest burns {statistics.median(fuel_rates):.2f} fuel per ns of CPU (burn.wat)")
        empty = per_run_cpu(sandbox, guest("", calls))
        cases = [
            ("fd_write, 0 iovecs", guest(WRITE, calls, iovecs=0)),
            ("fd_write, 1 iovec of 32 B (stdout)", guest(WRITE, calls, size=32)),
            ("fd_write, 1 iovec of 32 B (stderr, full)", guest(WRITE, calls, size=32, fd=2)),
            ("fd_write, 1,024 empty iovecs", guest(WRITE, calls // 100, iovecs=1024)),
            ("poll_oneoff, 1 subscription", guest(POLL, calls)),
            ("poll_oneoff, 64 subscriptions", guest(POLL, calls // 10, subs=64)),
        ]
        for name, wat in cases:
            made = int(wat.split("(local.set $left (i32.const ")[1].split(")")[0])
            cost = (per_run_cpu(sandbox, wat) - empty * made / calls) / made
            print(f"{name}: {cost * 1e6:.2f} us per call")
        # Per byte: 128 writes of 64 KiB (8 MiB, the default max_response_bytes) against 128
        # writes of one empty iovec; the difference includes handing the 8 MiB back.
        full = per_run_cpu(sandbox, guest(WRITE, 128, size=65536))
        none = per_run_cpu(sandbox, guest(WRITE, 128, size=0))
        print(f"fd_write, per byte kept: {(full - none) / (128 * 65536) * 1e9:.3f} ns")
        print(
            "charges:",
            {
                name: getattr(sandbox_module, name)
                for name in dir(sandbox_module)
                if name.endswith("_FUEL") or "_FUEL_PER_" in name or name == "FUEL_PER_HOST_NS"
            },
        )


if __name__ == "__main__":
    main()
