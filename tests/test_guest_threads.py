"""The guest thread pool: results and errors come back, nothing runs on the event loop."""

from __future__ import annotations

import os
import threading

import pytest
import trio

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


async def test_the_most_recently_idle_thread_takes_the_next_job():
    pool = GuestThreads(4)
    try:
        names = {await pool.run(lambda: threading.current_thread().name) for _ in range(20)}
        assert len(names) == 1
    finally:
        pool.close()


async def test_guest_threads_run_at_a_lower_priority_than_the_event_loop():
    pool = GuestThreads(1)
    try:
        guest_nice = await pool.run(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        )
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert guest_nice == min(loop_nice + GUEST_THREAD_NICE, 19)
    finally:
        pool.close()
