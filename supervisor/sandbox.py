"""The wasmtime engine and one isolated store per request, with the tenant's limits.

One `Sandbox` owns the process's `Engine` (fuel and epoch interruption on), the `Linker` with
WASI and the two WASI functions we replace, and the epoch ticker thread. `Sandbox.run` is
called in a worker thread, never on the event loop: it builds a fresh `Store`, runs one
export, and classifies how it ended into one `GuestError` subclass (or none).

Replaced WASI functions (FACTS.md explains why each is needed):

- `fd_write`: wasmtime's writes only the first buffer of a gather write (WAGI.md wants all),
  and stdout needs a cap that *stops* the guest rather than buffering forever. Ours writes
  every buffer into a capped per-request buffer; stderr is kept up to its own cap.
- `poll_oneoff`: a guest asleep inside wasmtime's is not interrupted by the epoch deadline.
  Ours sleeps at most until the request's deadline, then stops the guest.

Host functions never raise (an exception there is re-raised in whichever thread traps next):
they record a fault on the request's own state and stop the guest by emptying its fuel.
"""

from __future__ import annotations

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
_MAX_SUBSCRIPTIONS = 4096


@dataclass(frozen=True, slots=True)
class GuestLimits:
    """The limits of one run, taken from the tenant's policy."""

    fuel: int
    memory_bytes: int
    timeout_ms: int
    max_stdout_bytes: int
    max_stderr_bytes: int = 64 * 1024


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
    max_stdout: int
    max_stderr: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    stderr_truncated: bool = False
    slept: bool = False
    fault: GuestError | None = None
    outbound_grant: outbound_abi.Grant | None = None
    outbound: outbound_abi.Session | None = None  # made at the first outbound call


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
            max_stdout=limits.max_stdout_bytes,
            max_stderr=limits.max_stderr_bytes,
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
            fuel_used = limits.fuel - store.fuel_left()
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
        outbound_abi.define(linker, self._outbound_session)
        return linker

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
            memory = wasmtime_ext.caller_memory(caller)
            length = len(memory)
            if iovs + 8 * iovs_len > length or nwritten + 4 > length:
                return ERRNO_FAULT
            total = 0
            for offset in range(iovs, iovs + 8 * iovs_len, 8):
                pointer, size = _IOVEC.unpack_from(memory, offset)
                if pointer + size > length:
                    return ERRNO_FAULT
                if size:
                    total += size
                    if fd == 1:
                        state.stdout += memory[pointer : pointer + size]
                    else:
                        _append_stderr(state, memory[pointer : pointer + size])
            if fd == 1 and len(state.stdout) > state.max_stdout:
                del state.stdout[state.max_stdout :]
                state.fault = GuestOutputTooLarge(
                    f"guest output exceeded max_response_bytes ({state.max_stdout} bytes)"
                )
                wasmtime_ext.stop_guest(caller)
            _U32.pack_into(memory, nwritten, total)
            return ERRNO_SUCCESS
        except Exception:  # a bug here must not leak into another request's trap
            log.exception("fd_write failed")
            return ERRNO_FAULT

    def _poll_oneoff(self, caller: int, args: Sequence[int]) -> int:
        try:
            in_ptr, out_ptr, count, nevents = args
            state: _RunState = self._local.state
            if count <= 0 or count > _MAX_SUBSCRIPTIONS:
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
                    state.fault = GuestTimeout("guest exceeded its deadline while sleeping")
                    wasmtime_ext.stop_guest(caller)
                    return ERRNO_SUCCESS
                time.sleep(max(0.0, wake_at - now))
                events, _ = _poll(raw, count, clocks_due=True)
            out = b"".join(events)
            memory[out_ptr : out_ptr + len(out)] = out
            _U32.pack_into(memory, nevents, len(events))
            return ERRNO_SUCCESS
        except Exception:
            log.exception("poll_oneoff failed")
            return ERRNO_FAULT


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


def _append_stderr(state: _RunState, data: bytes) -> None:
    room = state.max_stderr - len(state.stderr)
    if len(data) > room:
        state.stderr_truncated = True
        data = data[: max(0, room)]
    state.stderr += data


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
