"""The private wasmtime-py bindings we rely on still exist and still behave.

If a wasmtime upgrade moves `wasmtime._ffi`, `wasmtime._bindings` or changes a C signature,
these fail first and say which piece broke, before any request does.
"""

from __future__ import annotations

import wasmtime

from supervisor import wasmtime_ext

HELLO = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "hi")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 2))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""

SPIN = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $again
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 8)))
      (br $again))))
"""


def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    wasmtime_ext.enable_pooling_allocator(config, instances=4, max_memory_bytes=1 << 30)
    return wasmtime.Engine(config)


def _linker(engine: wasmtime.Engine, callback: wasmtime_ext.HostCallback) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    wasmtime_ext.define_host_function(linker, "wasi_snapshot_preview1", "fd_write", 4, callback)
    return linker


def _run(engine, linker, wat: str, *, fuel: int = 1_000_000) -> tuple[Exception | None, int]:
    pre = linker.instantiate_pre(wasmtime.Module(engine, wat))
    store = wasmtime_ext.GuestStore(engine)
    try:
        store.set_limits(fuel=fuel, epoch_ticks=1000, memory_bytes=1 << 20)
        store.set_wasi(["prog", "arg"], {"A": "b"}, b"stdin bytes", [])
        assert store.instantiate(pre) is None
        failure = store.call(b"_start")
        assert store.memory_size() == 65536
        return failure, fuel - store.fuel_left()
    finally:
        store.close()


def test_a_host_function_reads_and_writes_guest_memory_and_returns_a_result():
    """The second write's fd is the first's result, and reads what the first wrote."""
    wat = HELLO.replace(
        "(drop (call $write (i32.const 1)",
        "(drop (call $write (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))",
    )
    seen: list[tuple[int, bytes]] = []

    def fd_write(caller: int, args: list[int]) -> int:
        fd, iovs, _count, _nwritten = args
        memory = wasmtime_ext.caller_memory(caller)
        assert len(memory) == 65536
        pointer = int.from_bytes(memory[iovs : iovs + 4], "little")
        seen.append((fd, memory[pointer : pointer + 2]))
        memory[pointer : pointer + 2] = b"HI"
        return 7

    engine = _engine()
    failure, fuel_used = _run(engine, _linker(engine, fd_write), wat)
    assert failure is None
    assert seen == [(1, b"hi"), (7, b"HI")]
    assert fuel_used > 0


def test_stop_guest_ends_a_guest_that_ignores_errors():
    calls = 0

    def fd_write(caller: int, args: list[int]) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            wasmtime_ext.stop_guest(caller)
        return 0

    engine = _engine()
    failure, _ = _run(engine, _linker(engine, fd_write), SPIN, fuel=10**12)
    assert isinstance(failure, wasmtime.Trap)
    assert failure.trap_code == wasmtime.TrapCode.OUT_OF_FUEL
    assert calls == 3


def test_a_host_function_reads_and_takes_the_callers_fuel():
    """What `sandbox` charges host work with: the fuel it takes is the run's fuel used."""
    seen: list[int] = []

    def fd_write(caller: int, args: list[int]) -> int:
        seen.append(wasmtime_ext.fuel_left(caller))
        wasmtime_ext.set_fuel_left(caller, seen[-1] - 100_000)
        return 0

    engine = _engine()
    failure, fuel_used = _run(engine, _linker(engine, fd_write), HELLO)
    assert failure is None
    assert 0 < 1_000_000 - seen[0] < 100  # the few instructions before the call
    assert 100_000 < fuel_used < 100_100


def test_a_missing_export_is_reported_not_raised():
    engine = _engine()
    linker = _linker(engine, lambda caller, args: 0)
    pre = linker.instantiate_pre(wasmtime.Module(engine, HELLO))
    store = wasmtime_ext.GuestStore(engine)
    try:
        store.set_limits(fuel=1000, epoch_ticks=1000, memory_bytes=1 << 20)
        store.set_wasi(["prog"], {}, b"", [])
        assert store.instantiate(pre) is None
        assert isinstance(store.call(b"nope"), wasmtime_ext.NoSuchFunction)
    finally:
        store.close()


def test_proc_exit_comes_back_as_an_exit_trap():
    engine = _engine()
    linker = _linker(engine, lambda caller, args: 0)
    wat = """
    (module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start") (call $exit (i32.const 7))))
    """
    failure, _ = _run(engine, linker, wat)
    assert isinstance(failure, wasmtime.ExitTrap)
    assert failure.code == 7
