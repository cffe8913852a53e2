"""A pool of threads that run guests, handing results back to the trio loop.

Why not `trio.to_thread.run_sync`: measured on one core, a hop through it costs ~35 µs at
16 concurrent requests (limiter, context copy, thread cache, one wake-up per result); here
jobs go into one lock-free queue, and a thread hands back the results it finished while more
jobs were queued in one call (`TrioToken.run_sync_soon`: one wake-up of the loop for all).

Why jobs are queued at the end of the loop's turn: a job goes to the draining thread just
before the event loop next waits for I/O (`before_io_wait`, a trio instrument), with every other
job submitted in the same turn. Queued one by one, a job finding the thread idle wakes it, and
it preempts the loop only to find the GIL taken. It matters most for a tenant at its
`max_concurrency`, whose jobs arrive one released slot at a time: demo hello capped at 8 with
16 connections, 1.77-1.85 -> 0.84-0.92 context switches and ~160-200 -> ~140-165 µs of CPU per
request; unchanged without a cap.

Why one thread drains the queue by default: a worker process runs on one core, and short
guests (~50-100 µs) are GIL-bound Python around a short wasm call, so more threads add no
throughput, only GIL hand-offs and context switches. Measured with the demo hello at 16 in
flight: one draining thread used ~30 µs less CPU per request than one thread per job.

Why there are more threads anyway: a guest asleep in `poll_oneoff`, or a long CPU-bound one,
must not hold up the short guests queued behind it, nor the event loop. So:

- A job the caller knows to be long (`run(..., long=True)`: the gateway passes whether the
  module's last run was) skips the queue and gets a thread of its own, niced by
  `GUEST_THREAD_NICE`: the event loop and short guests take the core from it at once.
- A job in the queue that turns out long (it has used `LONG_JOB_S` of CPU) has its thread
  demoted the same way; and if every active thread is on a long job while jobs wait, one
  more thread is woken (the most recently parked: its caches are warm), which drains the
  queue alongside and parks again once the queue is empty (a guest asleep in `poll_oneoff`
  lets the queue pass this way without being demoted). A thread cannot raise its priority
  again without privileges, so a demoted thread retires after its job and a fresh one takes
  its place.
- Finished results wait for the next job only when that job is known to be short.

The demotion by the watcher comes late when the long job is CPU-bound: a thread at the loop's
priority keeps the core for its time slice (a few ms), the loop's wake-ups included. That is
why known long jobs never enter the queue. Measured on one core, a short guest's latency
while another floods the pool with ~4.5 ms CPU-bound guests: p99 0.3-0.7 ms when each job had
a thread of its own at nice +10, 4.2-4.7 ms with the watcher alone (and see
`GUEST_THREAD_NICE` for why it is now +19).

Tried and dropped: SCHED_BATCH for the draining thread. Once results were handed back in
batches it gained no throughput, and a batch thread does not preempt a niced long guest when
it wakes: the noisy neighbour benchmark's quiet p99 ratio read 2.5-2.8 with it, 1.8-2.0
without.

Admission already bounds how many guests run at once, so the pool has exactly that many
threads and needs no limiter of its own. A guest cannot be interrupted from Python: a
cancelled caller keeps waiting until its guest ends (the guest's deadline bounds that wait),
like `trio.to_thread.run_sync` without `abandon_on_cancel`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")
log = logging.getLogger("supervisor.guest_threads")

_STOP = None
LONG_JOB_S = 0.0005
"""A job that used this much CPU is not a short guest (the demo hello uses ~0.05 ms). A job
queued behind long ones waits about this long, plus up to one watcher tick, for a thread."""
WATCH_INTERVAL_S = 0.001
"""How often the watcher looks at the running jobs, while jobs are queued."""
MAX_BATCH = 16
"""Results a draining thread hands back to the event loop at once, at most. Handing each back
alone costs a wake-up of the loop (a write to its socket) each: batching them measured ~10 µs
less CPU per request at 16 in flight. A result waits only for known short guests behind it."""
GUEST_THREAD_NICE = 19
"""How much nicer a thread running a long job becomes than the event loop (capped at 19).

The most there is: a long guest then weighs 15 against the loop's 1024 (Linux's nice table),
so a waking event loop or short guest takes the core from it at once. At +10 (weight 110) the
noisy neighbour benchmark's quiet p99 ratio read 2.13-2.60 in 3 runs, at +19 0.89-0.93, with
the same throughput for the flooding tenant (180 against 181 req/s). A long guest still gets
every cycle the short ones leave, and about 1.4 % of a core they keep busy (15 / 1039)."""


class GuestThreads:
    """`size` threads; `await run(fn)` runs `fn()` on one of them. Create inside trio."""

    def __init__(self, size: int, *, name: str = "guest") -> None:
        if size < 1:
            raise ValueError("a guest thread pool needs at least one thread")
        self._name = name
        self._numbers = itertools.count()
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._submitted: list[_Job] = []  # this turn's jobs, queued before the loop waits
        self._instrument = _QueueBeforeIoWait(self)
        trio.lowlevel.add_instrument(self._instrument)
        self._closing = False
        first = _Runner(self, self._thread_name(), first=True)
        spares = [_Runner(self, self._thread_name(), first=False) for _ in range(size - 1)]
        self._runners = {first, *spares}  # every live thread, for `close`
        self._active = [first]  # threads taking jobs from the queue now
        self._parked = spares[::-1]  # a stack: the last parked is woken first
        # Known long jobs: threads of their own, niced from the start (a stack of idle ones).
        self._low = [_LowPriorityThread(self, self._thread_name()) for _ in range(size)]
        self._idle_low = list(self._low)
        self._watcher_needed = trio.Event()
        for runner in self._runners:
            runner.thread.start()
        for low in self._low:
            low.thread.start()
        trio.lowlevel.spawn_system_task(self._watch, name=f"{name}-watcher")

    async def run(self, function: Callable[[], T], *, long: bool | None = None) -> T:
        """Run `function()` on a guest thread and return (or raise) what it did.

        `long`: whether the job is expected to run long (its module's last run did), None if
        not known. A job expected short lets results finished before it wait for it, to be
        handed back together. More callers at once than threads is a bug.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if long:
            try:
                low = self._idle_low.pop()
            except IndexError:
                raise RuntimeError("more guests than guest threads: admission is broken") from None
            low.inbox.put((function, trio.lowlevel.current_task(), False))
            return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
        self._submitted.append((function, trio.lowlevel.current_task(), long is False))
        self._watcher_needed.set()
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def close(self) -> None:
        """Stop the threads once their current job is done (blocking: call it at exit, on the
        event loop, with no guest running)."""
        self._closing = True
        trio.lowlevel.remove_instrument(self._instrument)
        self._jobs.put(_STOP)  # passed on from thread to thread (`_Runner._work`)
        for runner in list(self._runners):
            runner.inbox.put(_STOP)
        for low in self._low:
            low.inbox.put(_STOP)
            low.thread.join()
        while self._runners:
            runner = next(iter(self._runners))
            runner.thread.join()
            self._runners.discard(runner)

    def _thread_name(self) -> str:
        return f"{self._name}-{next(self._numbers)}"

    async def _watch(self) -> None:
        """While jobs are running or queued, demote long jobs and spill queued ones."""
        while True:
            await self._watcher_needed.wait()
            self._watcher_needed = trio.Event()
            while any(runner.busy_since for runner in self._active) or self._jobs.qsize():
                await trio.sleep(WATCH_INTERVAL_S)
                self._look()

    def _queue_submitted(self) -> None:
        jobs = self._jobs
        for job in self._submitted:
            jobs.put(job)
        self._submitted.clear()
        self._look()  # behind a long job, these need not wait for the watcher's next look

    def _look(self) -> None:
        long_ago = time.monotonic() - LONG_JOB_S
        all_long = True
        for runner in list(self._active):
            if 0 < runner.busy_since < long_ago:
                # Demoted only for using the CPU: a short guest that waited for the core or
                # the GIL (another worker on this core, the event loop) is not long.
                if not runner.demoted and runner.cpu_used() >= LONG_JOB_S:
                    runner.demote()
            else:
                all_long = False
        if all_long and self._parked and self._jobs.qsize():
            spare = self._parked.pop()
            self._active.append(spare)
            spare.inbox.put(True)

    def _retire(self, runner: _Runner) -> None:
        """Replace a demoted thread, after its job, with a fresh one in the same role. Runs
        on the event loop: a thread inherits the nice value of the thread that starts it."""
        self._runners.discard(runner)
        if self._closing:
            return
        fresh = _Runner(self, self._thread_name(), first=runner.first)
        if runner.first:
            self._active[self._active.index(runner)] = fresh
        else:
            self._active.remove(runner)
            self._parked.append(fresh)
        fresh.thread.start()
        self._runners.add(fresh)

    def _deliver(self, results: list[tuple[trio.lowlevel.Task, outcome.Outcome]]) -> None:
        # If the loop is gone, nobody waits for these results.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(_reschedule_all, results)


_Job = tuple[Callable[[], object], trio.lowlevel.Task, bool]
"""A queued job: the function, the task waiting for it, whether it is known short."""


class _QueueBeforeIoWait(trio.abc.Instrument):
    """Queues the jobs submitted during the loop's turn, just before it waits for I/O."""

    def __init__(self, pool: GuestThreads) -> None:
        self.pool = pool

    def before_io_wait(self, timeout: float) -> None:
        if self.pool._submitted:
            # trio drops an instrument that raises, and every later job would wait forever.
            try:
                self.pool._queue_submitted()
            except Exception:
                log.exception("queueing guest jobs failed")


class _Runner:
    __slots__ = (
        "busy_since",
        "cpu_clock",
        "cpu_since",
        "demoted",
        "first",
        "inbox",
        "native_id",
        "pool",
        "thread",
    )

    def __init__(self, pool: GuestThreads, name: str, *, first: bool) -> None:
        self.pool = pool
        self.first = first  # always takes jobs; the others park when the queue is empty
        self.busy_since = 0.0  # when the current job started; 0 between jobs
        self.cpu_since = 0.0  # the thread's CPU time when the current job started
        self.demoted = False
        self.native_id = 0
        self.cpu_clock = 0  # the thread's CPU-time clock, readable from other threads
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # wake-ups of a parked thread
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)

    def cpu_used(self) -> float:
        """CPU seconds the current job has used so far (called by the watcher)."""
        if not self.cpu_clock:
            return 0.0
        try:
            return time.clock_gettime(self.cpu_clock) - self.cpu_since
        except OSError:  # the thread has just ended
            return 0.0

    def demote(self) -> None:
        """Lower this thread's priority for the rest of its life (called by the watcher)."""
        if self.demoted or not self.native_id:
            return
        self.demoted = True
        _lower_priority(self.native_id)

    def _work(self) -> None:
        self.native_id = threading.get_native_id()
        self.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        pool, first = self.pool, self.first
        finished: list[tuple[trio.lowlevel.Task, outcome.Outcome]] = []  # not yet handed back
        if not first and self.inbox.get() is _STOP:
            return
        while True:
            try:
                job = pool._jobs.get_nowait()
            except queue.Empty:
                if finished:  # nothing must wait on a thread that is about to block
                    pool._deliver(finished)
                    finished = []
                if first:
                    job = pool._jobs.get()
                else:
                    pool._active.remove(self)
                    pool._parked.append(self)
                    if self.inbox.get() is _STOP:
                        return
                    continue
            if job is _STOP:
                pool._jobs.put(_STOP)
                if finished:
                    pool._deliver(finished)
                return
            function, task, short = job
            if finished and not short:  # it may run long: hand back what is finished first
                pool._deliver(finished)
                finished = []
            self.cpu_since = time.thread_time()
            self.busy_since = time.monotonic()
            result = outcome.capture(function)
            self.busy_since = 0.0
            finished.append((task, result))
            if len(finished) >= MAX_BATCH or self.demoted or not pool._jobs.qsize():
                pool._deliver(finished)
                finished = []
            # An idle thread must not keep its last result (a guest's whole output) alive.
            del job, function, task, result
            if self.demoted:
                with contextlib.suppress(trio.RunFinishedError):
                    pool._token.run_sync_soon(pool._retire, self)
                return


class _LowPriorityThread:
    """Runs known long jobs, one at a time, niced below the event loop for its whole life."""

    __slots__ = ("inbox", "pool", "thread")

    def __init__(self, pool: GuestThreads, name: str) -> None:
        self.pool = pool
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)

    def _work(self) -> None:
        _lower_priority(threading.get_native_id())
        pool = self.pool
        while (job := self.inbox.get()) is not _STOP:
            function, task, _ = job
            result = outcome.capture(function)
            pool._idle_low.append(self)
            pool._deliver([(task, result)])
            del job, function, task, result  # see `_Runner._work`


def _lower_priority(native_id: int) -> None:
    """Nice a thread by GUEST_THREAD_NICE. Linux schedules threads on their own, and raising
    a nice value needs no privilege (lowering it again would)."""
    with contextlib.suppress(OSError):
        nice = os.getpriority(os.PRIO_PROCESS, native_id) + GUEST_THREAD_NICE
        os.setpriority(os.PRIO_PROCESS, native_id, min(nice, 19))


def _reschedule_all(results: list[tuple[trio.lowlevel.Task, outcome.Outcome]]) -> None:
    for task, result in results:
        trio.lowlevel.reschedule(task, result)


def _cannot_abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
