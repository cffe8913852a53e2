"""The fork server: worker processes forked from a process that has imported everything.

A worker started as a fresh interpreter pays every import again (~280 ms here, more than the
bare import floor of issue 11), after the supervisor paid them once already. So `serve
--workers N` forks this server first, before `trio.run` and before any thread exists (a fork
copies only the calling thread: a lock another thread held would stay held forever in the
child). The supervisor asks it for every worker it starts (the first ones, restarts, rolling
restarts) over a socket pair, handing the worker's file descriptors over with SCM_RIGHTS; the
server forks, and the child runs what it was given (the `worker` command) with every module
already imported, then exits.

The server is the workers' parent: it reaps them and tells the supervisor how each ended. It
also sends a pidfd of each new worker, so the supervisor signals that very process, never a
reused pid. It exits when the supervisor closes its end (the supervisor exited, however).

Messages (SOCK_SEQPACKET: one JSON object each, its descriptors alongside):

- supervisor to server: `{"spawn": request}` with the worker's descriptors;
- server to supervisor: `{"started": pid}` with its pidfd, in the order of the requests;
  `{"exited": pid, "status": wait status}` when a worker has been reaped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import trio

log = logging.getLogger("supervisor.fork_server")

MAX_MESSAGE_BYTES = 64 * 1024
"""A request is a few hundred bytes of JSON (the worker's handoff); a guard, not a limit."""
MAX_FDS = 16
"""A worker gets its serving sockets (IPv4 and IPv6 at most), a metrics socket and two pipes."""

Child = Callable[[dict, list[int]], int]
"""What a forked worker runs: (the spawn request, its descriptors) -> exit status."""


class ForkServerGone(Exception):
    """The fork server exited: no worker can be started or watched any more."""


class ForkedProcess:
    """A worker forked by the fork server, as the supervisor sees it: the part of
    `trio.Process` the supervisor uses (pid, returncode, send_signal, kill, wait)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._exited = trio.Event()

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not reported yet
                signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def _ended(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        self._exited.set()


class ForkServer:
    """The supervisor's end: `start` forks the server; `run` (a task) reads its reports;
    `spawn` starts a worker."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.pid = pid
        self._sock = sock
        self._trio_sock = trio.socket.from_stdlib_socket(sock)
        self._lock = trio.Lock()  # one request at a time: replies come in request order
        self._started_send, self._started = trio.open_memory_channel[ForkedProcess](1)
        self._processes: dict[int, ForkedProcess] = {}

    @classmethod
    def start(cls, child: Child) -> ForkServer:
        """Fork the server, which runs `child` in each worker it forks. Call it before any
        thread exists: raises RuntimeError naming how many there are otherwise."""
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise RuntimeError(f"the fork server must be forked by a lone thread, not {threads}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _serve(theirs, child)
        theirs.close()
        return cls(ours, pid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the server's reports until cancelled; raises ForkServerGone if it exits."""
        task_status.started()
        while True:
            data, ancillary, _, _ = await self._trio_sock.recvmsg(
                MAX_MESSAGE_BYTES, socket.CMSG_SPACE(4 * MAX_FDS)
            )
            if not data:
                raise ForkServerGone(f"the fork server (pid {self.pid}) exited")
            message = json.loads(data)
            if "started" in message:
                (pidfd,) = _fds_of(ancillary)
                process = ForkedProcess(message["started"], pidfd)
                self._processes[process.pid] = process
                await self._started_send.send(process)
            else:
                process = self._processes.pop(message["exited"], None)
                if process is not None:
                    process._ended(message["status"])

    async def spawn(self, request: dict, fds: list[int]) -> ForkedProcess:
        """Fork a worker that runs the server's `child(request, its copies of fds)`; the
        caller keeps (and closes) its own `fds`."""
        async with self._lock:
            message = json.dumps({"spawn": request}).encode()
            await self._trio_sock.sendmsg(
                [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))]
            )
            return await self._started.receive()

    def close(self) -> None:
        """Close our end (the server exits on it) and reap the server."""
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _fd_bytes(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    return fds


# The server side: a plain blocking loop in a process with one thread and no event loop. -----


def _serve(sock: socket.socket, child: Child) -> NoReturn:
    """Fork a worker per request and report each worker's end, until the supervisor is gone."""
    code = 1
    try:
        with open(os.devnull, "rb") as devnull:  # workers read nothing from the terminal
            os.dup2(devnull.fileno(), 0)
        # Ctrl-C reaches the whole process group: the supervisor drains the workers, and the
        # server must outlive that to report their ends.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes `select`
        # Every object imported so far is left out of garbage collection: a child that
        # collected would write to (and so copy) pages it otherwise shares with the server.
        gc.freeze()
        while True:
            readable, _, _ = select.select([sock, wake_read], [], [])
            if wake_read in readable:
                os.read(wake_read, 4096)
                _report_exits(sock)
            if sock in readable:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS)
                if not data:
                    code = 0  # the supervisor is gone
                    break
                pid = os.fork()
                if pid == 0:
                    request = json.loads(data)["spawn"]
                    _become_worker(child, request, fds, sock, (wake_read, wake_write))
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)  # before any reaping: it is that very process
                socket.send_fds(sock, [json.dumps({"started": pid}).encode()], [pidfd])
                os.close(pidfd)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):  # the supervisor may be gone meanwhile
            sock.send(json.dumps({"exited": pid, "status": status}).encode())


def _become_worker(
    child: Child, request: dict, fds: list[int], sock: socket.socket, wake: tuple[int, int]
) -> NoReturn:
    """In a forked worker: drop the server's signal handling and descriptors, run `child`,
    exit with its status.

    The objects frozen by the server stay frozen: they are the imported modules, which live
    as long as the worker does, and collecting them would only copy the pages they share."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        sock.close()
        for fd in wake:
            os.close(fd)
        code = child(request, fds)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
