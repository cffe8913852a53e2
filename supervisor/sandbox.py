"""The wasmtime engine and one isolated store per request, with the tenant's limits.

One `Sandbox` owns the process's `Engine` (fuel and epoch interruption on), the `Linker` with
WASI and the two WASI functions we replace, and the epoch ticker thread. `Sandbox.run` is
called in a worker thread, never on the event loop: it builds a fresh `Store`, runs one
export, and classifies how it ended into one `GuestError` subclass (or none).

Replaced WASI functions (FACTS.md explains why each is needed):

- `fd_write`: wasmtime's writes only the first buffer of a gather write (WAGI.md wants all),
  and stdout needs a cap that *stops* the guest rather than buffering forever. Ours copies
  buffer by buffer and never past a cap: stdout's stops the guest, stderr's drops the rest.
- `poll_oneoff`: a guest asleep inside wasmtime's is not interrupted by the epoch deadline.
  Ours sleeps at most until the request's deadline, then stops the guest, and takes at most
  the policy's `max_poll_subscriptions` per call.

Both are host work done holding the GIL, which the guest's own fuel does not count, so each
call (and each outbound HTTP call, outbound/abi.py, by its measured CPU time) is charged to
the guest's fuel (see `FUEL_PER_HOST_NS`) and checked against the
deadline (see `_settle`): the epoch ticker is a Python thread, and guests hammering host
calls starve it. Together, the guests of a process spend at most `HOST_SHARE` of the wall
clock in host calls (`_HostTime`): the rest of the GIL is the event loop's.

Host functions never raise (an exception there is re-raised in whichever thread traps next):
they record a fault on the request's own state and stop the guest by emptying its fuel.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import wasmtime
from wasmtime import ExitTrap, Trap, TrapCode, WasmtimeError

from . import wasmtime_ext
from .compiler import SERVING_CODE
from .errors import (
    GuestError,
    GuestFuelExhausted,
    GuestMemoryExhausted,
    GuestOutputTooLarge,
    GuestTimeout,
    GuestTrap,
)
from .outbound import abi as outbound_abi

log = logging.getLogger("supervisor.sandbox")

EPOCH_TICK_S = 0.005
"""How often the ticker advances the engine's epoch: the deadline's resolution."""

WASM_PAGE = 65536
MAX_MEMORY_BYTES = 4 << 30
"""The largest guest memory (and policy `memory_bytes`): the pooling allocator's slot size."""
DEFAULT_MAX_INSTANCES = 64
WASI_MODULE = "wasi_snapshot_preview1"

# WASI preview1 errno values used by the replaced functions.
ERRNO_SUCCESS = 0
ERRNO_BADF = 8
ERRNO_CANCELED = 11  # returned to a guest the call has just stopped: it never resumes
ERRNO_FAULT = 21
ERRNO_INVAL = 28

_IOVEC = struct.Struct("<II")
_U32 = struct.Struct("<I")
_SUBSCRIPTION_SIZE = 48
_SUBSCRIPTION_HEAD = struct.Struct("<QB")  # userdata, tag
_SUBSCRIPTION_CLOCK = struct.Struct("<IxxxxQQH")  # clock id, timeout ns, precision, flags
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, errno, type, nbytes, flags
_EVENT_SIZE = 32
_EVENTTYPE_CLOCK = 0
_SUBCLOCKFLAG_ABSTIME = 1
_CLOCK_REALTIME = 0
# Host-call work charged to the guest's fuel: a call costs what the guest could have run in
# the time the host spends on it. Host costs measured with `bench/host_call_cost.py` (CPU
# time per call, 2-core machine, Python 3.11, wasmtime 50).
FUEL_PER_HOST_NS = 7
"""Fuel a guest burns per ns of CPU: 6.6 to 7.1 units/ns measured on bench/guests/burn.wat."""
FD_WRITE_FUEL = 3_500 * FUEL_PER_HOST_NS  # one call: 3.4 to 3.8 µs
FD_WRITE_FUEL_PER_IOVEC = 100 * FUEL_PER_HOST_NS  # each iovec walked: ~0.1 µs
FD_WRITE_FUEL_PER_BYTE = 3  # each byte kept: 0.26 ns (flood.wat's 8 MiB) to 0.7 ns (bench)
POLL_FUEL = 5_500 * FUEL_PER_HOST_NS  # one call with one subscription: ~5.5 µs
POLL_FUEL_PER_SUBSCRIPTION = 1_300 * FUEL_PER_HOST_NS  # each further one: ~1.3 µs
SETTLE_FUEL = 100_000 * FUEL_PER_HOST_NS
"""Charges owed before they are taken from the store (`_settle`): ~0.1 ms of host work."""
HOST_SHARE = 0.5
"""Share of wall time the guests of one process may spend in host calls, together."""
HOST_BURST_S = 0.008
"""Host-call time booked ahead before `HOST_SHARE` applies: one response of the default
max_response_bytes (8 MiB, ~3.6 ms charged, 7.2 ms booked) goes through without a sleep."""
_MAX_WRITE_BYTES = 2**32 - 1
"""fd_write reports its count as a u32: a gather write larger than this is written short."""
_DEADLINE_CHECK_STRIDE = 8 * 1024
"""Bytes of iovec array (1,024 iovecs, ~0.1 ms of host work) between two deadline checks."""


@dataclass(frozen=True, slots=True)
class GuestLimits:
    """The limits of one run, taken from the tenant's policy."""

    fuel: int
    memory_bytes: int
    timeout_ms: int
    max_stdout_bytes: int
    max_stderr_bytes: int = 64 * 1024
    max_poll_subscriptions: int = 64


@dataclass(frozen=True, slots=True)
class Volume:
    """A read-only preopen, its paths encoded once when the tenant loads, not per request."""

    host_dir: bytes
    guest_path: bytes


@dataclass(slots=True)
class GuestRun:
    """How one run ended. `error` is None on success; the rest is filled in either way."""

    stdout: bytes
    stderr: bytes
    stderr_truncated: bool
    fuel_used: int
    memory_bytes: int
    duration_s: float
    cpu_s: float  # CPU time of the run's thread: a guest waiting for the GIL spends none
    slept: bool  # whether the guest slept in `poll_oneoff`
    error: GuestError | None = None
    outbound_calls: int = 0  # `wasi_experimental_http.req` calls


@dataclass(slots=True)
class _RunState:
    """What the replaced host functions of one run share with `Sandbox.run` (thread-local)."""

    deadline: float
    limits: GuestLimits
    host_time: _HostTime  # the process's, shared by every run
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stderr_truncated: bool = False
    slept: bool = False
    fault: GuestError | None = None
    outbound_grant: outbound_abi.Grant | None = None
    outbound: outbound_abi.Session | None = None  # made at the first outbound call
    fuel_owed: int = 0  # host work charged but not yet taken from the store (`_settle`)

    def timed_out(self) -> GuestTimeout:
        return GuestTimeout(f"guest exceeded its deadline of {self.limits.timeout_ms} ms")

    def out_of_fuel(self) -> GuestFuelExhausted:
        return GuestFuelExhausted(f"guest ran out of fuel ({self.limits.fuel} units)")


class PreparedModule:
    """A compiled module linked once against the sandbox's imports (an `InstancePre`)."""

    __slots__ = ("exports", "instance_pre", "last_run_long", "module")

    def __init__(self, module: wasmtime.Module, instance_pre: wasmtime.InstancePre) -> None:
        self.module = module
        self.instance_pre = instance_pre
        self.exports = frozenset(export.name for export in module.exports)
        self.last_run_long: bool | None = None
        """Whether its last run in this process was long (guest_threads.py), None before the
        first: the gateway tells the guest threads what to expect of the next one."""


class Sandbox:
    """The process-wide engine; `run` may be called from many threads at once."""

    def __init__(self, *, max_instances: int = DEFAULT_MAX_INSTANCES) -> None:
        """`max_instances`: stores alive at once (the execution slots plus loading work)."""
        self.code = SERVING_CODE  # fuel, epochs, opt level: what compile children match
        config = self.code.config()
        wasmtime_ext.enable_pooling_allocator(
            config, instances=max_instances, max_memory_bytes=MAX_MEMORY_BYTES
        )
        self.settings = "consume_fuel,epoch_interruption,opt=speed,pooling"
        """Names the engine's settings for the artifact cache: change it with the config."""
        self.engine = wasmtime.Engine(config)
        self._local = threading.local()
        self._host_time = _HostTime()
        self.linker = self._build_linker()
        self._stop_ticker = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="epoch-ticker", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop_ticker.set()
        self._ticker.join()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _tick(self) -> None:
        while not self._stop_ticker.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def prepare(self, module: wasmtime.Module) -> PreparedModule:
        """Link `module` once; raises WasmtimeError naming an import we cannot satisfy."""
        return PreparedModule(module, self.linker.instantiate_pre(module))

    def run(
        self,
        prepared: PreparedModule,
        entrypoint: str,
        *,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdin: bytes,
        limits: GuestLimits,
        volumes: Iterable[Volume] = (),
        outbound: outbound_abi.Grant | None = None,
    ) -> GuestRun:
        """Run `entrypoint` in a fresh store. Blocking: call it from a worker thread.

        `outbound`: what the guest may request over HTTP; None, nothing (every `req` is 7).
        """
        started = time.monotonic()
        cpu_started = time.thread_time()
        state = _RunState(
            deadline=started + limits.timeout_ms / 1000,
            limits=limits,
            host_time=self._host_time,
            outbound_grant=outbound,
        )
        store = wasmtime_ext.GuestStore(self.engine)
        memory_bytes = 0
        self._local.state = state
        try:
            store.set_limits(
                fuel=limits.fuel,
                epoch_ticks=math.ceil(limits.timeout_ms / 1000 / EPOCH_TICK_S) + 1,
                memory_bytes=limits.memory_bytes,
            )
            try:
                store.set_wasi(
                    argv,
                    env,
                    stdin,
                    [(volume.host_dir, volume.guest_path) for volume in volumes],
                )
            except WasmtimeError as exc:
                failure = exc
            else:
                failure = store.instantiate(prepared.instance_pre)
            if failure is not None:
                error = _instantiation_error(failure, limits)
            else:
                failure = store.call(entrypoint.encode())
                memory_bytes = store.memory_size()
                error = _call_error(failure, memory_bytes, limits)
            fuel_used = min(limits.fuel, limits.fuel - store.fuel_left() + state.fuel_owed)
        finally:
            self._local.state = None
            store.close()
        session = state.outbound
        if state.fault is not None:
            error = state.fault
        elif session is not None and session.fault is not None:
            error = session.fault
        return GuestRun(
            stdout=bytes(state.stdout),
            stderr=bytes(state.stderr),
            stderr_truncated=state.stderr_truncated,
            fuel_used=fuel_used,
            memory_bytes=memory_bytes,
            duration_s=time.monotonic() - started,
            cpu_s=time.thread_time() - cpu_started,
            slept=state.slept,
            error=error,
            outbound_calls=session.calls if session is not None else 0,
        )

    def _build_linker(self) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        linker.allow_shadowing = True
        wasmtime_ext.define_host_function(linker, WASI_MODULE, "fd_write", 4, self._fd_write)
        wasmtime_ext.define_host_function(linker, WASI_MODULE, "poll_oneoff", 4, self._poll_oneoff)
        linker.allow_shadowing = False
        outbound_abi.define(linker, self._outbound_session, self._charge_host_work)
        return linker

    def _charge_host_work(self, caller: int, ns: int) -> bool:
        """Charge `ns` of another host function's work (outbound HTTP) like our own calls':
        to the guest's fuel and the process's host-call share; False if the guest stopped."""
        state: _RunState = self._local.state
        state.fuel_owed += ns * FUEL_PER_HOST_NS
        return state.fuel_owed < SETTLE_FUEL or _settle(caller, state)

    def _outbound_session(self) -> outbound_abi.Session:
        """The calling request's outbound session, made at its first outbound call."""
        state: _RunState = self._local.state
        if state.outbound is None:
            state.outbound = outbound_abi.Session(state.outbound_grant, state.deadline)
        return state.outbound

    # Replaced WASI functions. They run on the guest's thread, so `self._local.state` is the
    # state of the request that called them. They must never raise.

    def _fd_write(self, caller: int, args: Sequence[int]) -> int:
        try:
            fd, iovs, iovs_len, nwritten = args
            state: _RunState = self._local.state
            if fd not in (1, 2):
                return ERRNO_BADF
            if state.fault is not None:  # stopped already: it will not run on
                return _stop(caller, state, state.fault)
            memory = wasmtime_ext.caller_memory(caller)
            length = len(memory)
            if iovs + 8 * iovs_len > length or nwritten + 4 > length:
                return ERRNO_FAULT
            # A long walk is paid before it is done: its length is the guest's to choose.
            owed = state.fuel_owed + FD_WRITE_FUEL + FD_WRITE_FUEL_PER_IOVEC * iovs_len
            if owed >= SETTLE_FUEL:
                state.fuel_owed = owed
                if not _settle(caller, state):
                    return ERRNO_CANCELED
                owed = 0
            written, kept, errno = _gather(memory, length, iovs, iovs_len, fd, state)
            if state.fault is not None:
                return _stop(caller, state, state.fault)
            state.fuel_owed = owed + FD_WRITE_FUEL_PER_BYTE * kept
            if state.fuel_owed >= SETTLE_FUEL and not _settle(caller, state):
                return ERRNO_CANCELED
            if errno == ERRNO_SUCCESS:
                _U32.pack_into(memory, nwritten, written)
            return errno
        except Exception:  # a bug here must not leak into another request's trap
            log.exception("fd_write failed")
            return ERRNO_FAULT

    def _poll_oneoff(self, caller: int, args: Sequence[int]) -> int:
        try:
            in_ptr, out_ptr, count, nevents = args
            state: _RunState = self._local.state
            if state.fault is not None:  # stopped already: it will not run on
                return _stop(caller, state, state.fault)
            valid = 0 < count <= state.limits.max_poll_subscriptions
            state.fuel_owed += (
                POLL_FUEL + POLL_FUEL_PER_SUBSCRIPTION * count if valid else POLL_FUEL
            )
            if state.fuel_owed >= SETTLE_FUEL and not _settle(caller, state):
                return ERRNO_CANCELED
            if not valid:
                return ERRNO_INVAL
            memory = wasmtime_ext.caller_memory(caller)
            length = len(memory)
            if (
                in_ptr + count * _SUBSCRIPTION_SIZE > length
                or out_ptr + count * _EVENT_SIZE > length
                or nevents + 4 > length
            ):
                return ERRNO_FAULT
            raw = memory[in_ptr : in_ptr + count * _SUBSCRIPTION_SIZE]
            events, wake_at = _poll(raw, count)
            if not events:
                state.slept = True
                now = time.monotonic()
                if wake_at > state.deadline:
                    time.sleep(max(0.0, state.deadline - now))
                    return _stop(
                        caller, state, GuestTimeout("guest exceeded its deadline while sleeping")
                    )
                time.sleep(max(0.0, wake_at - now))
                events, _ = _poll(raw, count, clocks_due=True)
            out = b"".join(events)
            memory[out_ptr : out_ptr + len(out)] = out
            _U32.pack_into(memory, nevents, len(events))
            return ERRNO_SUCCESS
        except Exception:
            log.exception("poll_oneoff failed")
            return ERRNO_FAULT


def _settle(caller: int, state: _RunState) -> bool:
    """Take the host work owed from the guest's fuel and check the deadline; False if the
    guest is out of either (it is then stopped).

    Host functions add their charges to `state.fuel_owed` and settle only once it reaches
    `SETTLE_FUEL`: reading and setting the fuel costs ~1 µs, reading the clock ~0.1 µs, and
    a small fd_write ~3.5 µs. A run may so overdraw by less than `SETTLE_FUEL`
    (`Sandbox.run` counts what is still owed in `fuel_used`), and a guest making host calls
    back to back is checked against its deadline at least every ~0.1 ms of host work; the
    epoch deadline is not enough there, since its ticker is a Python thread that such a
    guest starves of the GIL (measured: 19 s for a 3 s deadline, 64-subscription polls).
    """
    now = time.monotonic()
    if now > state.deadline:
        _stop(caller, state, state.timed_out())
        return False
    fuel = wasmtime_ext.fuel_left(caller)
    if state.fuel_owed > fuel:
        _stop(caller, state, state.out_of_fuel())
        return False
    wasmtime_ext.set_fuel_left(caller, fuel - state.fuel_owed)
    wait = state.host_time.book(state.fuel_owed / (FUEL_PER_HOST_NS * 1e9), now)
    state.fuel_owed = 0
    if wait:
        if now + wait > state.deadline:
            time.sleep(state.deadline - now)
            _stop(caller, state, state.timed_out())
            return False
        time.sleep(wait)  # without the GIL: the event loop and other guests take it
    return True


class _HostTime:
    """The host-call time the guests of a process may take together: at most `HOST_SHARE` of
    the wall clock, past a burst of `HOST_BURST_S`; the rest of the GIL is the event loop's.

    A guest looping on cheap host calls takes the GIL back between two calls before a
    waiting thread wakes up, so the event loop gets it only when Python forces a switch
    (every 5 ms), or later when that guest's thread is niced and preempted while holding it.
    Fuel does not help there: a client keeps as many such guests running as it likes. So a
    settling host call books its work on one virtual clock, and sleeps if it is ahead.
    Lost updates between threads only make the bound approximate.
    """

    __slots__ = ("_busy_until",)

    def __init__(self) -> None:
        self._busy_until = 0.0

    def book(self, work_s: float, now: float) -> float:
        """Book `work_s` seconds of host work; return how long to sleep first (0: none)."""
        busy_until = max(self._busy_until, now) + work_s / HOST_SHARE
        self._busy_until = busy_until
        return max(0.0, busy_until - now - HOST_BURST_S)


def _stop(caller: int, state: _RunState, fault: GuestError) -> int:
    """End the calling guest with `fault` (the first fault of a run is the one reported)."""
    if state.fault is None:
        state.fault = fault
    wasmtime_ext.stop_guest(caller)
    return ERRNO_CANCELED


def _gather(
    memory: ctypes.Array, length: int, iovs: int, iovs_len: int, fd: int, state: _RunState
) -> tuple[int, int, int]:
    """Append an fd_write's buffers to the run's stdout (fd 1) or stderr, iovec by iovec,
    never past its cap: (bytes written, bytes kept, errno). Over stdout's cap or past the
    deadline it records the fault on `state` and stops; over stderr's it drops the rest and
    marks the stderr truncated."""
    if fd == 1:
        buffer, cap = state.stdout, state.limits.max_stdout_bytes
    else:
        buffer, cap = state.stderr, state.limits.max_stderr_bytes
    room = room_before = cap - len(buffer)
    written = 0
    end = iovs + 8 * iovs_len
    check_at = iovs + _DEADLINE_CHECK_STRIDE
    for offset in range(iovs, end, 8):
        if offset == check_at:
            check_at += _DEADLINE_CHECK_STRIDE
            if time.monotonic() > state.deadline:
                state.fault = state.timed_out()
                break
        pointer, size = _IOVEC.unpack_from(memory, offset)
        if not size:
            continue
        if pointer + size > length:
            return written, room_before - room, ERRNO_FAULT
        if written + size > _MAX_WRITE_BYTES:
            break  # a short write, as POSIX allows
        written += size
        if size <= room:
            buffer += memory[pointer : pointer + size]
            room -= size
            continue
        buffer += memory[pointer : pointer + room]  # up to the cap, and not a byte more
        room = 0
        if fd == 1:
            state.fault = GuestOutputTooLarge(
                f"guest output exceeded max_response_bytes ({cap} bytes)"
            )
            break
        state.stderr_truncated = True
    return written, room_before - room, ERRNO_SUCCESS


def _poll(raw: bytes, count: int, *, clocks_due: bool = False) -> tuple[list[bytes], float]:
    """Events ready now, and the monotonic time the earliest clock fires.

    stdin is fully buffered and stdout/stderr never block, so fd subscriptions are ready at
    once; only clocks wait.
    """
    events: list[bytes] = []
    wake_at = math.inf
    now_monotonic = time.monotonic()
    now_realtime = time.time()
    clocks: list[tuple[int, float]] = []
    for index in range(count):
        offset = index * _SUBSCRIPTION_SIZE
        userdata, tag = _SUBSCRIPTION_HEAD.unpack_from(raw, offset)
        if tag == _EVENTTYPE_CLOCK:
            clock_id, timeout_ns, _precision, flags = _SUBSCRIPTION_CLOCK.unpack_from(
                raw, offset + 16
            )
            seconds = timeout_ns / 1e9
            if flags & _SUBCLOCKFLAG_ABSTIME:
                now = now_realtime if clock_id == _CLOCK_REALTIME else now_monotonic
                seconds -= now
            fires_at = now_monotonic + max(0.0, seconds)
            clocks.append((userdata, fires_at))
            wake_at = min(wake_at, fires_at)
        elif tag in (1, 2):  # fd_read, fd_write
            events.append(_EVENT.pack(userdata, ERRNO_SUCCESS, tag, 0, 0))
        else:
            events.append(_EVENT.pack(userdata, ERRNO_INVAL, tag, 0, 0))
    if clocks_due or (clocks and wake_at <= now_monotonic):
        events.extend(
            _EVENT.pack(userdata, ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0)
            for userdata, fires_at in clocks
            if fires_at <= wake_at
        )
    return events, wake_at


def _call_error(
    failure: Exception | None, memory_bytes: int, limits: GuestLimits
) -> GuestError | None:
    if failure is None:
        return None
    if isinstance(failure, ExitTrap):
        return GuestTrap(f"guest exited with code {failure.code}") if failure.code else None
    if isinstance(failure, Trap):
        return _trap_error(failure, memory_bytes, limits)
    if isinstance(failure, wasmtime_ext.NoSuchFunction):
        return GuestTrap(f"module has no exported function {str(failure)!r}")
    return GuestTrap(f"guest failed: {_first_line(failure)}")


def _trap_error(exc: Trap, memory_bytes: int, limits: GuestLimits) -> GuestError:
    code = exc.trap_code
    if code == TrapCode.OUT_OF_FUEL:
        return GuestFuelExhausted(f"guest ran out of fuel ({limits.fuel} units)")
    if code == TrapCode.INTERRUPT:
        return GuestTimeout(f"guest exceeded its deadline of {limits.timeout_ms} ms")
    # wasmtime refuses memory.grow past the limit with -1, not a trap; the guest then aborts.
    # A guest whose memory is within a page of the limit when it traps ran out of memory.
    if memory_bytes + WASM_PAGE > limits.memory_bytes:
        return GuestMemoryExhausted(
            f"guest reached its memory limit ({limits.memory_bytes} bytes) and trapped"
        )
    name = code.name.lower() if code is not None else "unknown"
    return GuestTrap(f"guest trapped: {name}")


def _instantiation_error(exc: Exception, limits: GuestLimits) -> GuestError:
    if isinstance(exc, wasmtime_ext.VolumeUnavailable):
        log.error("%s: %r: %s", exc, exc.host_dir, _open_failure(exc.host_dir))
        return GuestTrap(f"guest failed to start: {exc}")
    message = _first_line(exc)
    if "memory" in message and "limit" in message:
        return GuestMemoryExhausted(
            f"guest's initial memory exceeds the limit of {limits.memory_bytes} bytes"
        )
    if isinstance(exc, Trap) and exc.trap_code == TrapCode.OUT_OF_FUEL:
        return GuestFuelExhausted(f"guest ran out of fuel ({limits.fuel} units) while starting")
    if isinstance(exc, Trap) and exc.trap_code == TrapCode.INTERRUPT:  # in its start function
        return GuestTimeout(f"guest exceeded its deadline of {limits.timeout_ms} ms while starting")
    return GuestTrap(f"guest failed to start: {message}")


def _open_failure(folder: bytes) -> str:
    """Why `folder` cannot be opened now (wasmtime does not say), for the log."""
    try:
        os.close(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "it opens now"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
