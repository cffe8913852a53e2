"""Compiling a module in a child process with the tenant's memory and CPU limits.

Compiling is the one thing an upload makes the server do that grows with what the tenant
sent: 200,000 tiny functions (a 2 MiB module) took 1.2 GiB and 8.7 s in-process. So no worker
compiles itself: each compile runs in a fresh child process at nice 19, first in line for the
OOM killer (`oom_score_adj` 1000), with `RLIMIT_AS` = `compile_memory_bytes` and
`RLIMIT_CPU` = `compile_cpu_seconds`, and wasmtime's parallel compilation off (one core at
most, never every core the serving threads need). A child over its limits dies or fails
alone; the worker answers 422 naming the limit.

A new Python process per compile would cost ~150-200 ms of imports, so a worker process
starts a *compile server* (`python -m supervisor.compiler`) on its first compile and keeps it
(one more only while two compiles run at once; a dead one is replaced): a single-threaded
process that has imported wasmtime once and forks one child per job (a fork of a
single-threaded process is safe; the worker, which has threads, never forks). The worker
hands it a job over a unix socket: the module in one memfd, an empty memfd for the artifact,
the limits and the engine settings. The child compiles with an engine built like the serving
one minus the pooling allocator (which changes no code: the artifact is byte-identical and
loads into the serving engine), writes the serialized artifact, and exits; the server reports
the child's pid when it starts, then how it ended. The caller (ArtifactCache) stores and loads
the artifact.

Everything here blocks: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from typing import NoReturn

import wasmtime

from .errors import ModuleRejected
from .policies import Policy
from .wasm_binary import WasmInfo, inspect

__all__ = [
    "COMPILER",
    "DEFAULT_COMPILE_LIMITS",
    "SERVING_CODE",
    "CodeSettings",
    "CompileLimits",
    "Compiler",
    "check_compile_bounds",
]

log = logging.getLogger("supervisor.compiler")

_MESSAGE_BYTES = 4096
"""The largest control message either side sends (a job's settings, a child's status)."""
_CHILD_NICE = 19  # the lowest priority: serving threads always come first
_OOM_SCORE_ADJ = b"1000"  # the OOM killer takes a compile child before anything else
_CPU_HARD_MARGIN_S = 1
"""RLIMIT_CPU's soft limit sends SIGXCPU; the hard limit, this much later, SIGKILLs a child
that ignored it."""
_SERVER_ATTEMPTS = 2
"""A job whose compile server died under it (not its child) is tried again on another; it
fails once this many *new* servers died under it (idle ones found dead cost no try)."""

# How a child ends when it did not crash: its exit status says which, the output memfd holds
# the artifact (OK) or a one-line reason.
_EXIT_OK = 0
_EXIT_INVALID = 3  # wasmtime refused the module
_EXIT_MEMORY = 4  # an allocation failed in Python or wasmtime reported ENOMEM
_ENOMEM_TEXT = ("os error 12", "out of memory", "cannot allocate memory")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class CodeSettings:
    """The engine settings that change compiled code: an artifact loads only into an engine
    built with the same ones. The serving engine (`Sandbox`) and the compile child both build
    their `Config` here, so the two cannot drift apart."""

    consume_fuel: bool = True
    epoch_interruption: bool = True
    cranelift_opt_level: str = "speed"

    def config(self) -> wasmtime.Config:
        config = wasmtime.Config()
        config.consume_fuel = self.consume_fuel
        config.epoch_interruption = self.epoch_interruption
        config.cranelift_opt_level = self.cranelift_opt_level
        return config


@dataclass(frozen=True, slots=True)
class CompileLimits:
    """What compiling one module may cost, from the tenant's policy."""

    max_functions: int
    max_code_bytes: int
    memory_bytes: int
    cpu_seconds: int

    @classmethod
    def of(cls, policy: Policy) -> CompileLimits:
        return cls(
            max_functions=policy.max_module_functions,
            max_code_bytes=policy.max_code_bytes,
            memory_bytes=policy.compile_memory_bytes,
            cpu_seconds=policy.compile_cpu_seconds,
        )


SERVING_CODE = CodeSettings()
"""How the serving engine compiles (`Sandbox`)."""
DEFAULT_COMPILE_LIMITS = CompileLimits.of(Policy())
"""The limits of policies/_defaults.toml as shipped."""


def check_compile_bounds(binary: bytes, limits: CompileLimits, *, name: str) -> None:
    """Refuse, before compiling, a module with more functions or code than the policy allows.

    Compile time and memory grow with both; reading the sections' headers takes microseconds.
    """
    check_compile_bounds_of(inspect(binary), limits, name=name)


def check_compile_bounds_of(info: WasmInfo, limits: CompileLimits, *, name: str) -> None:
    """`check_compile_bounds` for a module already inspected."""
    if info.functions > limits.max_functions:
        raise ModuleRejected(
            f"{name}: defines {info.functions} functions, more than the tenant's "
            f"max_module_functions ({limits.max_functions})"
        )
    if info.code_bytes > limits.max_code_bytes:
        raise ModuleRejected(
            f"{name}: its code section is {info.code_bytes} bytes, more than the tenant's "
            f"max_code_bytes ({limits.max_code_bytes})"
        )


class Compiler:
    """The worker's compile servers: one per compile in progress, started when none is idle,
    kept for the next compile, replaced when found dead.

    A compile holds its server for as long as it takes (up to `compile_cpu_seconds` and
    more at nice 19), so one tenant's long upload never makes another tenant's module wait
    behind it. In practice a worker runs at most two at once: the registry's loads, one
    after the other, and admin uploads under their own one-slot limiter.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_CompileServer] = []

    def idle_pids(self) -> list[int]:
        """The pids of the idle compile servers (for tests and diagnostics)."""
        with self._lock:
            return [server.pid for server in self._idle]

    def compile(
        self, binary: bytes, *, name: str, settings: CodeSettings, limits: CompileLimits
    ) -> bytes:
        """The serialized artifact of `binary`. Raises ModuleRejected naming what failed."""
        job = json.dumps({"settings": asdict(settings), "limits": asdict(limits)}).encode()
        with _memfd("module", binary) as module_fd, _memfd("artifact") as out_fd:
            failures = 0  # of new servers: an idle one found dead costs no try (the pool ends)
            while True:
                server, reused = self._take()
                status = server.run(job, module_fd, out_fd, name=name)
                if status is not None:
                    with self._lock:
                        self._idle.append(server)
                    break
                server.stop()
                log.warning("compile server %d died during %s", server.pid, name)
                if not reused:
                    failures += 1
                    if failures == _SERVER_ATTEMPTS:
                        raise ModuleRejected(f"{name}: the compile process failed; try again later")
            output = _read_all(out_fd)
        return _outcome(status, output, limits, name=name)

    def _take(self) -> tuple[_CompileServer, bool]:
        """An idle server that looks alive (it may have died a moment ago), else a new one;
        and whether it was idle."""
        with self._lock:
            while self._idle:
                server = self._idle.pop()
                if server.alive():
                    return server, True
                server.stop()
        return _CompileServer(), False


class _CompileServer:
    """One compile server process and the worker's end of its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self.socket = ours
        self.pid = self.process.pid
        log.info("compile server started, pid %d", self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, job: bytes, module_fd: int, out_fd: int, *, name: str) -> dict | None:
        """Run one job and wait for its end: how the child ended, or None if this server
        died (or was dead)."""
        os.ftruncate(out_fd, 0)  # a retry starts over (the offset is shared with the child)
        os.lseek(out_fd, 0, os.SEEK_SET)
        try:
            socket.send_fds(self.socket, [job], [module_fd, out_fd])
            started = self.socket.recv(_MESSAGE_BYTES)
            if not started:
                return None
            log.info("compiling %s in child pid %d", name, json.loads(started)["pid"])
            ended = self.socket.recv(_MESSAGE_BYTES)
        except OSError:
            return None
        return json.loads(ended) if ended else None

    def stop(self) -> None:
        self.socket.close()  # EOF: a live server exits
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()


COMPILER = Compiler()
"""The process's compile servers; no process starts before the first compile."""


def _outcome(status: dict, output: bytes, limits: CompileLimits, *, name: str) -> bytes:
    """The artifact if the child succeeded, else ModuleRejected with the reason."""
    code, signum, cpu_s = status.get("exit"), status.get("signal"), status.get("cpu_s", 0.0)
    if code == _EXIT_OK:
        return output
    reason = output.decode("utf-8", "replace").strip()
    memory = f"compile_memory_bytes ({limits.memory_bytes})"
    cpu = f"compile_cpu_seconds ({limits.cpu_seconds})"
    if code == _EXIT_INVALID:
        raise ModuleRejected(f"{name}: invalid WebAssembly module: {reason}")
    if code == _EXIT_MEMORY or signum == signal.SIGABRT:
        # wasmtime aborts the process when an allocation fails (Rust's default).
        raise ModuleRejected(f"{name}: compiling it needs more memory than the tenant's {memory}")
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= limits.cpu_seconds):
        raise ModuleRejected(f"{name}: compiling it takes longer than the tenant's {cpu}")
    if signum is not None:
        what = signal.Signals(signum).name
        log.warning("compile child for %s killed by %s after %.1fs of CPU", name, what, cpu_s)
        raise ModuleRejected(
            f"{name}: the compile process was killed ({what}) after {cpu_s:.1f}s of CPU, "
            "within the tenant's limits: the pod may be short of memory; try again later"
        )
    raise ModuleRejected(f"{name}: the compile process failed (exit status {code}): {reason}")


@contextlib.contextmanager
def _memfd(label: str, data: bytes = b""):
    fd = os.memfd_create(f"compile-{label}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield fd
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# The compile server and its children (run as `python -m supervisor.compiler <socket fd>`).


def _serve(connection: socket.socket) -> None:
    """Run jobs one at a time until the worker closes its end or dies; then stop, killing a
    compile in progress. (Not PR_SET_PDEATHSIG here: it fires when the *thread* that started
    this server ends, and a worker's threads come and go.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the worker to handle
    server = os.getpid()
    with contextlib.suppress(ConnectionError):
        while True:
            message, fds, _, _ = socket.recv_fds(connection, _MESSAGE_BYTES, 2)
            if not message:
                return
            module_fd, out_fd = fds
            pid = os.fork()
            if pid == 0:
                _run_child(connection, server, module_fd, out_fd, json.loads(message))
            os.close(module_fd)
            os.close(out_fd)
            connection.send(json.dumps({"pid": pid}).encode())
            if not _child_ends_first(connection, pid):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            _, wait_status, usage = os.wait4(pid, 0)
            ended: dict[str, float] = {"cpu_s": usage.ru_utime + usage.ru_stime}
            if os.WIFSIGNALED(wait_status):
                ended["signal"] = os.WTERMSIG(wait_status)
            else:
                ended["exit"] = os.waitstatus_to_exitcode(wait_status)
            connection.send(json.dumps(ended).encode())


def _child_ends_first(connection: socket.socket, pid: int) -> bool:
    """Wait for the child to end (True) or the worker's end to close (False): the worker
    sends nothing while a job runs, so its end turning readable means it is gone."""
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd, connection], [], [])
    finally:
        os.close(pidfd)
    return pidfd in readable


def _run_child(
    connection: socket.socket, server: int, module_fd: int, out_fd: int, job: dict
) -> NoReturn:
    """The forked child: compile, then exit without ever returning into the server's loop."""
    code = 1
    try:
        connection.close()
        code = _compile_child(server, module_fd, out_fd, job)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _compile_child(server: int, module_fd: int, out_fd: int, job: dict) -> int:
    """Compile under the job's limits; write the artifact (or a reason) to `out_fd`."""
    limits = CompileLimits(**job["limits"])
    try:
        _die_with_parent(server)
        os.nice(_CHILD_NICE)
        # Without /proc the limits below still hold.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "wb") as adj:
            adj.write(_OOM_SCORE_ADJ)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed child leaves no core
        resource.setrlimit(
            resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + _CPU_HARD_MARGIN_S)
        )
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        binary = _read_all(module_fd)
        config = CodeSettings(**job["settings"]).config()
        config.parallel_compilation = False
        artifact = wasmtime.Module(wasmtime.Engine(config), binary).serialize()
        result, output = _EXIT_OK, artifact
    except MemoryError:
        result, output = _EXIT_MEMORY, b"out of memory"
    except wasmtime.WasmtimeError as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:300] if text else type(exc).__name__
        is_memory = any(part in text.lower() for part in _ENOMEM_TEXT)
        result, output = (_EXIT_MEMORY if is_memory else _EXIT_INVALID), first.encode()
    try:
        view = memoryview(output)
        while view:
            view = view[os.write(out_fd, view) :]
    except OSError as exc:
        return _EXIT_MEMORY if exc.errno == errno.ENOMEM else 1
    return result


def _die_with_parent(parent: int) -> None:
    """Be killed when `parent` (the single-threaded compile server) dies (Linux's
    PR_SET_PDEATHSIG): a compile nobody waits for must not go on for compile_cpu_seconds."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)  # could not ask, or the parent died before we asked


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    with socket.socket(fileno=int(sys.argv[1])) as worker_end:
        _serve(worker_end)
