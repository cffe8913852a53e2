"""Pod-wide tenant counts: the shared table, and admission consulting it.

Two `PodCounters` on one file in one process stand for two workers: each opens the file
itself, so they take the `flock` against each other as two processes do. The end-to-end
check with two real worker processes is in test_workers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor.admission import POD_POLL_S, Admission, TenantLimits
from supervisor.errors import Rejected
from supervisor.pod_limits import PodCounters

ONE_AT_A_TIME = TenantLimits(max_concurrency=1, max_queue=4, queue_timeout_ms=5000)


@pytest.fixture
def pod_file(tmp_path: Path) -> Path:
    path = tmp_path / "pod-counters"
    PodCounters.create(path, columns=3, capacity=64)
    return path


def test_a_cap_holds_across_columns_and_a_release_frees_it(pod_file: Path) -> None:
    first, second = PodCounters(pod_file, 0), PodCounters(pod_file, 1)
    try:
        assert first.try_acquire("acme", 2)
        assert second.try_acquire("acme", 2)
        assert not first.try_acquire("acme", 2)
        assert not second.try_acquire("acme", 2)
        assert second.try_acquire("other", 2)  # another tenant has its own count
        assert first.running("acme") == 2
        first.release("acme")
        assert second.try_acquire("acme", 2)
        assert second.running("acme") == 2
    finally:
        first.close()
        second.close()


def test_clearing_a_dead_workers_column_gives_its_counts_back(pod_file: Path) -> None:
    survivor, dead = PodCounters(pod_file, 0), PodCounters(pod_file, 1)
    supervisor = PodCounters(pod_file, None)
    try:
        assert dead.try_acquire("acme", 1)
        dead.close()  # the worker died with its guest running: no release ever comes
        assert not survivor.try_acquire("acme", 1)
        supervisor.clear_column(1)
        assert survivor.running("acme") == 0
        assert survivor.try_acquire("acme", 1)
    finally:
        survivor.close()
        supervisor.close()


def test_a_full_table_falls_back_to_the_per_process_cap(tmp_path: Path) -> None:
    path = tmp_path / "pod-counters"
    PodCounters.create(path, columns=2, capacity=2)
    counters = PodCounters(path, 0)
    try:
        assert counters.try_acquire("a", 1)
        assert counters.try_acquire("b", 1)
        assert not counters.try_acquire("a", 1)
        # No entry left for "c": every acquire succeeds; admission's own cap still holds.
        assert counters.try_acquire("c", 1)
        assert counters.try_acquire("c", 1)
        counters.release("c")
    finally:
        counters.close()


def test_a_file_that_is_not_a_counter_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a pod counter file"):
        PodCounters(path, 0)


async def test_a_request_at_the_pod_cap_waits_and_runs_when_another_process_releases(
    pod_file: Path,
) -> None:
    here, elsewhere = PodCounters(pod_file, 0), PodCounters(pod_file, 1)
    admission = Admission(slots=4, global_queue=16, pod=here)
    try:
        assert elsewhere.try_acquire("acme", 1)  # another worker runs acme's only guest
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admission.poll_pod)
            admitted = trio.Event()

            async def request() -> None:
                async with admission.admit("acme", ONE_AT_A_TIME):
                    admitted.set()

            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            assert admission.statistics().waiting == 1
            assert not admitted.is_set()
            elsewhere.release("acme")  # wakes nobody here: the poll must notice
            released_at = trio.current_time()
            with trio.fail_after(1):
                await admitted.wait()
            assert trio.current_time() - released_at < 50 * POD_POLL_S
            nursery.cancel_scope.cancel()
        assert here.running("acme") == 0  # the ticket gave its count back
    finally:
        here.close()
        elsewhere.close()


async def test_with_no_queue_a_request_at_the_pod_cap_is_refused_at_once(pod_file: Path) -> None:
    here, elsewhere = PodCounters(pod_file, 0), PodCounters(pod_file, 1)
    admission = Admission(slots=4, global_queue=16, pod=here)
    try:
        assert elsewhere.try_acquire("acme", 1)
        limits = TenantLimits(max_concurrency=1, max_queue=0, queue_timeout_ms=1000)
        with pytest.raises(Rejected) as refused:
            async with admission.admit("acme", limits):
                pass
        assert (refused.value.status, refused.value.reason) == (429, "tenant_queue_full")
        async with admission.admit("other", limits):  # other tenants are not held up
            assert here.running("other") == 1
    finally:
        here.close()
        elsewhere.close()


async def test_waiters_of_a_tenant_keep_their_order_when_the_pod_frees_a_count(
    pod_file: Path,
) -> None:
    here, elsewhere = PodCounters(pod_file, 0), PodCounters(pod_file, 1)
    admission = Admission(slots=4, global_queue=16, pod=here)
    order: list[int] = []
    try:
        assert elsewhere.try_acquire("acme", 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admission.poll_pod)

            async def request(number: int) -> None:
                async with admission.admit("acme", ONE_AT_A_TIME):
                    order.append(number)
                    await trio.sleep(0)

            for number in range(3):
                nursery.start_soon(request, number)
                await trio.testing.wait_all_tasks_blocked()
            elsewhere.release("acme")
            with trio.fail_after(1):
                while len(order) < 3:
                    await trio.sleep(POD_POLL_S)
            nursery.cancel_scope.cancel()
        assert order == [0, 1, 2]
    finally:
        here.close()
        elsewhere.close()
