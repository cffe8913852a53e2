"""The guest thread pool: results and errors come back, nothing runs on the event loop."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from supervisor.guest_threads import GUEST_THREAD_NICE, GuestThreads


async def test_a_job_runs_on_another_thread_and_its_result_comes_back():
    pool = GuestThreads(2)
    try:
        name = await pool.run(lambda: threading.current_thread().name)
        assert name.startswith("guest-")
        assert name != threading.current_thread().name
    finally:
        pool.close()


async def test_an_exception_in_a_job_is_raised_in_the_caller():
    pool = GuestThreads(1)

    def fail() -> None:
        raise ValueError("from the guest thread")

    try:
        with pytest.raises(ValueError, match="from the guest thread"):
            await pool.run(fail)
        assert await pool.run(lambda: 42) == 42  # the thread survived
    finally:
        pool.close()


async def test_jobs_run_concurrently_up_to_the_pool_size():
    pool = GuestThreads(3)
    barrier = threading.Barrier(3, timeout=10)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pool.run, barrier.wait)
    finally:
        pool.close()


async def test_a_cancelled_caller_still_gets_its_running_jobs_result():
    pool = GuestThreads(1)
    started, release = threading.Event(), threading.Event()
    results = []

    def job() -> str:
        started.set()
        release.wait(10)
        return "done"

    async def caller() -> None:
        results.append(await pool.run(job))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait, 10)
            nursery.cancel_scope.cancel()  # the caller is cancelled while its guest runs
            release.set()
        assert results == ["done"]  # it waited for the job instead of abandoning it
    finally:
        pool.close()


async def test_short_jobs_one_after_another_run_on_one_thread():
    pool = GuestThreads(4)
    try:
        names = {await pool.run(lambda: threading.current_thread().name) for _ in range(20)}
        assert len(names) == 1
    finally:
        pool.close()


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_a_cpu_bound_job_is_demoted_and_does_not_hold_up_a_short_one():
    pool = GuestThreads(2)
    demoted, release = threading.Event(), threading.Event()
    loop_nice = _own_nice()

    def cpu_bound_job() -> int:
        while _own_nice() == loop_nice:  # uses the CPU until the watcher demotes it
            pass
        demoted.set()
        release.wait(30)
        return _own_nice()

    results: list[int] = []

    async def run_long() -> None:
        results.append(await pool.run(cpu_bound_job))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_long)
            await trio.to_thread.run_sync(demoted.wait, 10)
            # Queued behind it, a short job gets another thread, at full priority.
            assert await pool.run(_own_nice) == loop_nice
            release.set()
        assert results == [min(loop_nice + GUEST_THREAD_NICE, 19)]
        # The demoted thread retired after its job: the next short job runs at full priority.
        assert await pool.run(_own_nice) == loop_nice
    finally:
        release.set()
        pool.close()


async def test_a_blocked_job_lets_queued_jobs_pass_without_being_demoted():
    pool = GuestThreads(2)
    blocked_thread: list[int] = []
    started, release = threading.Event(), threading.Event()

    def blocked_job() -> None:  # like a guest asleep in poll_oneoff: no CPU used
        blocked_thread.append(threading.get_native_id())
        started.set()
        release.wait(30)

    loop_nice = _own_nice()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, blocked_job)
            await trio.to_thread.run_sync(started.wait, 10)
            assert await pool.run(_own_nice) == loop_nice  # served beside the blocked job
            assert os.getpriority(os.PRIO_PROCESS, blocked_thread[0]) == loop_nice
            release.set()
    finally:
        release.set()
        pool.close()


async def test_short_jobs_run_at_the_event_loops_priority():
    pool = GuestThreads(1)
    try:
        assert await pool.run(_own_nice) == _own_nice()
    finally:
        pool.close()


async def test_a_known_long_job_gets_a_low_priority_thread_and_skips_the_queue():
    pool = GuestThreads(2)
    started, release = threading.Event(), threading.Event()

    def long_job() -> int:
        started.set()
        release.wait(30)
        return _own_nice()

    loop_nice = _own_nice()
    results: list[int] = []

    async def run_long() -> None:
        results.append(await pool.run(long_job, long=True))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_long)
            await trio.to_thread.run_sync(started.wait, 10)
            # The queue's own thread is free: a short job is answered while the long one runs.
            assert await pool.run(_own_nice) == loop_nice
            assert not release.is_set()
            release.set()
        assert results == [min(loop_nice + GUEST_THREAD_NICE, 19)]
    finally:
        release.set()
        pool.close()


async def test_a_finished_result_is_not_held_behind_a_job_that_may_run_long():
    pool = GuestThreads(1)  # one thread: nobody else could pick up the second job
    first_started, finish_first = threading.Event(), threading.Event()
    first_result_arrived = threading.Event()

    def short_job() -> int:
        first_started.set()
        finish_first.wait(10)
        return 1

    def may_run_long() -> bool:
        return first_result_arrived.wait(10)

    async def first() -> None:
        assert await pool.run(short_job, long=False) == 1
        first_result_arrived.set()

    results: list[bool] = []

    async def second() -> None:
        results.append(await pool.run(may_run_long))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.to_thread.run_sync(first_started.wait, 10)
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()  # the second job is queued
            finish_first.set()  # the first ends with a job waiting behind it
        assert results == [True]  # its result came back while the second job ran
    finally:
        finish_first.set()
        pool.close()


async def test_a_job_runs_while_other_tasks_keep_the_loop_busy():
    # Jobs are queued just before the loop waits for I/O, which it also does (with a zero
    # timeout) between turns that have runnable tasks: a loop that never idles still queues.
    pool = GuestThreads(1)
    done = False

    async def keep_busy() -> None:
        while not done:
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_busy)
            # A job never queued hangs this test: a caller cannot stop waiting for its job.
            assert await pool.run(lambda: "ran") == "ran"
            done = True
    finally:
        pool.close()


async def test_a_closed_pool_leaves_another_pool_of_the_same_loop_working():
    first, second = GuestThreads(1), GuestThreads(1)
    try:
        assert await first.run(lambda: 1) == 1
        first.close()
        assert await second.run(lambda: 2) == 2
    finally:
        second.close()
