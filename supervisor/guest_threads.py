"""A fixed pool of threads that run guests, handing results back to the trio loop.

Why not `trio.to_thread.run_sync`: measured on one core, a hop through it costs ~35 µs at
16 concurrent requests (limiter, context copy, thread cache, one wake-up per result); this
pool costs ~9 µs, because each job goes straight to an idle thread's inbox and results that
finish together are delivered in one loop iteration (`TrioToken.run_sync_soon`).

The most recently idle thread takes the next job (a stack, not a queue): under light load
one or two threads do all the work, which keeps their caches warm and keeps glibc from
spreading a guest's large output buffers over one malloc arena per thread (measured: 16
threads taken in turn grew the process by 22 MiB over 20 1-MiB outputs).

Admission already bounds how many guests run at once, so the pool has exactly that many
threads and needs no limiter of its own. A guest cannot be interrupted from Python: a
cancelled caller keeps waiting until its guest ends (the guest's deadline bounds that wait),
like `trio.to_thread.run_sync` without `abandon_on_cancel`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = None
GUEST_THREAD_NICE = 10
"""How much nicer guest threads are than the thread that created the pool (at most 19).
Measured with a CPU-bound neighbour flooding one tenant: the quiet tenant's p99 dropped by
about a quarter; the throughput of short guests did not change."""


class GuestThreads:
    """`size` threads; `await run(fn)` runs `fn()` on one of them. Create inside trio."""

    def __init__(self, size: int, *, name: str = "guest") -> None:
        token = trio.lowlevel.current_trio_token()
        self._workers = [_Worker(self, token, f"{name}-{index}") for index in range(size)]
        self._idle: list[_Worker] = list(self._workers)  # a stack: last idle, first used

    async def run(self, function: Callable[[], T]) -> T:
        """Run `function()` on an idle thread. More callers at once than threads is a bug."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            worker = self._idle.pop()
        except IndexError:
            raise RuntimeError("more guests than guest threads: admission is broken") from None
        worker.inbox.put((function, trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def close(self) -> None:
        """Stop the threads once their current job is done (blocking: call it at exit)."""
        for worker in self._workers:
            worker.inbox.put(_STOP)
        for worker in self._workers:
            worker.thread.join()


class _Worker:
    __slots__ = ("inbox", "pool", "thread", "token")

    def __init__(self, pool: GuestThreads, token: trio.lowlevel.TrioToken, name: str) -> None:
        self.pool = pool
        self.token = token
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        # Linux schedules threads on their own: a lower priority for guests than for the
        # event loop thread keeps HTTP, admission and /metrics responsive while CPU-bound
        # guests run (raising one's nice value needs no privilege).
        with contextlib.suppress(OSError):
            thread = threading.get_native_id()
            nice = os.getpriority(os.PRIO_PROCESS, thread) + GUEST_THREAD_NICE
            os.setpriority(os.PRIO_PROCESS, thread, min(nice, 19))
        while (job := self.inbox.get()) is not _STOP:
            function, task = job
            result = outcome.capture(function)
            self.pool._idle.append(self)
            # If the loop is gone, nobody waits for this result.
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            # An idle thread must not keep its last result (a guest's whole output) alive.
            del job, function, task, result


def _cannot_abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
