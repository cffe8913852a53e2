"""Admission control: tenant caps (429), pod saturation (503), queue timeouts, fairness,
cancellation and statistics. Timeouts run on trio's autojump clock: no real waiting."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from supervisor.admission import Admission, TenantLimits, TenantStatistics
from supervisor.errors import Rejected

ROOMY = TenantLimits(max_concurrency=100, max_queue=100, queue_timeout_ms=60_000)


class Requests:
    """Requests that enter admission and then run until the test lets one of them finish."""

    def __init__(self, admission: Admission, nursery: trio.Nursery) -> None:
        self.admission = admission
        self.nursery = nursery
        self.admitted: list[str] = []
        self.outcomes: dict[str, str] = {}
        self._finish_send, self._finish_receive = trio.open_memory_channel[None](math.inf)

    async def start(
        self, label: str, tenant: str, limits: TenantLimits = ROOMY
    ) -> trio.CancelScope:
        """Send a request and let it reach admission (trio starts tasks in no set order).

        Returns a scope that cancels the request, as a client going away does."""
        scope = trio.CancelScope()
        self.nursery.start_soon(self._request, label, tenant, limits, scope)
        await self.settle()
        return scope

    async def _request(
        self, label: str, tenant: str, limits: TenantLimits, scope: trio.CancelScope
    ) -> None:
        with scope:
            try:
                async with self.admission.admit(tenant, limits):
                    self.admitted.append(label)
                    await self._finish_receive.receive()
            except Rejected as exc:
                self.outcomes[label] = f"rejected:{exc.reason}"
                return
            self.outcomes[label] = "done"
        if scope.cancelled_caught:
            self.outcomes[label] = "cancelled"

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()

    async def finish_one(self) -> None:
        """Let one running request finish, and let admission hand its slot on."""
        self._finish_send.send_nowait(None)
        await self.settle()


@pytest.fixture
async def reqs(nursery: trio.Nursery) -> Requests:
    return Requests(Admission(slots=2, global_queue=100), nursery)


async def test_tenant_at_its_cap_gets_429_while_another_tenant_is_admitted_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(slots=4, global_queue=10)
    capped = TenantLimits(max_concurrency=1, max_queue=1, queue_timeout_ms=5_000)
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)
        await reqs.start("a1", "acme", capped)
        await reqs.start("a2", "acme", capped)
        # One runs; the second waits, counted against the queue, not the concurrency.
        assert reqs.admitted == ["a1"]
        assert admission.tenant_statistics("acme") == TenantStatistics(running=1, waiting=1)

        with pytest.raises(Rejected) as info:
            async with admission.admit("acme", capped):
                pytest.fail("a tenant over its cap and queue must not run")
        assert (info.value.status, info.value.reason, info.value.retry_after) == (
            429,
            "tenant_queue_full",
            1,
        )

        before = trio.current_time()
        async with admission.admit("other", ROOMY):
            assert admission.tenant_statistics("other") == TenantStatistics(running=1, waiting=0)
        assert trio.current_time() == before
        nursery.cancel_scope.cancel()


async def test_all_slots_busy_and_global_queue_full_gives_503() -> None:
    admission = Admission(slots=2, global_queue=1)
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)
        await reqs.start("a", "acme")
        await reqs.start("b", "bravo")
        await reqs.start("c", "charlie")
        assert reqs.admitted == ["a", "b"]
        assert admission.statistics().waiting == 1

        with pytest.raises(Rejected) as info:
            async with admission.admit("delta", ROOMY):
                pytest.fail("a saturated pod must not run more")
        assert (info.value.status, info.value.reason, info.value.retry_after) == (
            503,
            "pod_saturated",
            1,
        )
        await reqs.finish_one()
        assert reqs.admitted == ["a", "b", "c"]
        nursery.cancel_scope.cancel()


async def test_full_global_queue_with_free_slots_blames_the_tenant() -> None:
    admission = Admission(slots=4, global_queue=1)
    capped = TenantLimits(max_concurrency=1, max_queue=5, queue_timeout_ms=5_000)
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)
        await reqs.start("a1", "acme", capped)
        await reqs.start("a2", "acme", capped)
        with pytest.raises(Rejected) as info:
            async with admission.admit("acme", capped):
                pytest.fail("no room left to wait")
        assert (info.value.status, info.value.reason) == (429, "tenant_queue_full")
        nursery.cancel_scope.cancel()


async def test_queue_wait_times_out_with_429(autojump_clock: trio.testing.MockClock) -> None:
    admission = Admission(slots=1, global_queue=10)
    patient = TenantLimits(max_concurrency=1, max_queue=5, queue_timeout_ms=250)
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)
        await reqs.start("holder", "acme")

        start = trio.current_time()
        with pytest.raises(Rejected) as info:
            async with admission.admit("bravo", patient):
                pytest.fail("the only slot is held")
        assert trio.current_time() - start == pytest.approx(0.25)
        assert (info.value.status, info.value.reason, info.value.retry_after) == (
            429,
            "queue_timeout",
            1,
        )
        stats = admission.statistics()
        assert stats.waiting == 0
        assert dict(stats.tenants) == {"acme": TenantStatistics(running=1, waiting=0)}
        nursery.cancel_scope.cancel()


async def test_each_waiter_times_out_at_its_own_deadline(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A later waiter with a shorter timeout is turned away first; the others keep waiting."""
    admission = Admission(slots=1, global_queue=10)
    slow = TenantLimits(max_concurrency=1, max_queue=5, queue_timeout_ms=10_000)
    fast = TenantLimits(max_concurrency=1, max_queue=5, queue_timeout_ms=1_000)
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)
        await reqs.start("holder", "acme")
        await reqs.start("patient", "bravo", slow)
        await reqs.start("hasty", "charlie", fast)

        mock_clock.jump(0.999)
        await reqs.settle()
        assert reqs.outcomes == {}
        mock_clock.jump(0.002)
        await reqs.settle()
        assert reqs.outcomes == {"hasty": "rejected:queue_timeout"}
        assert admission.statistics().waiting == 1

        mock_clock.jump(9)
        await reqs.settle()
        assert reqs.outcomes["patient"] == "rejected:queue_timeout"
        assert admission.statistics().waiting == 0
        nursery.cancel_scope.cancel()


async def test_quiet_tenant_is_not_starved_by_a_flooding_one(reqs: Requests) -> None:
    for i in range(52):
        await reqs.start(f"flood-{i}", "flooder")
    assert reqs.admission.tenant_statistics("flooder") == TenantStatistics(2, 50)

    await reqs.start("quiet", "quiet")
    await reqs.finish_one()
    await reqs.finish_one()
    # The quiet request gets the next free slot or the one after, not the 51st.
    assert "quiet" in reqs.admitted[2:4]

    while reqs.admission.statistics().waiting:
        await reqs.finish_one()
    flood_order = [label for label in reqs.admitted if label.startswith("flood-")]
    assert flood_order == [f"flood-{i}" for i in range(52)], "FIFO within a tenant"


async def test_round_robin_skips_a_tenant_at_its_cap(reqs: Requests) -> None:
    capped = TenantLimits(max_concurrency=1, max_queue=10, queue_timeout_ms=60_000)
    await reqs.start("a1", "acme", capped)
    await reqs.start("a2", "acme", capped)
    await reqs.start("b1", "bravo")
    await reqs.start("b2", "bravo")
    # acme is at its cap, so bravo's request runs although acme has waited longer.
    assert reqs.admitted == ["a1", "b1"]
    assert reqs.admission.statistics().busy_slots == 2


async def test_cancelled_waiter_leaves_no_trace(reqs: Requests) -> None:
    await reqs.start("a", "acme")
    await reqs.start("b", "bravo")
    gone = await reqs.start("gone", "charlie")
    assert reqs.admission.statistics().waiting == 1

    gone.cancel()
    await reqs.settle()
    assert reqs.outcomes["gone"] == "cancelled"
    stats = reqs.admission.statistics()
    assert stats.waiting == 0
    assert "charlie" not in stats.tenants

    await reqs.finish_one()
    await reqs.finish_one()
    assert reqs.admitted == ["a", "b"]
    stats = reqs.admission.statistics()
    assert (stats.busy_slots, stats.waiting, dict(stats.tenants)) == (0, 0, {})


async def test_slot_granted_to_a_waiter_cancelled_in_the_same_instant_is_passed_on() -> None:
    admission = Admission(slots=1, global_queue=10)
    admitted: list[str] = []
    release_holder = trio.Event()
    doomed = trio.CancelScope()

    async def holder(task_status: trio.TaskStatus[None]) -> None:
        async with admission.admit("acme", ROOMY):
            task_status.started()
            await release_holder.wait()
        # No checkpoint in between: the slot is granted to `doomed`, then it is cancelled.
        doomed.cancel()

    async def waiter(label: str, tenant: str, scope: trio.CancelScope) -> None:
        with scope:
            async with admission.admit(tenant, ROOMY):
                admitted.append(label)
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        nursery.start_soon(waiter, "doomed", "bravo", doomed)
        await trio.testing.wait_all_tasks_blocked()
        survivor = trio.CancelScope()
        nursery.start_soon(waiter, "survivor", "charlie", survivor)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.statistics().waiting == 2

        release_holder.set()
        await trio.testing.wait_all_tasks_blocked()
        assert doomed.cancelled_caught
        assert admitted == ["survivor"]
        stats = admission.statistics()
        assert (stats.busy_slots, stats.waiting) == (1, 0)
        assert dict(stats.tenants) == {"charlie": TenantStatistics(running=1, waiting=0)}

        survivor.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.statistics().busy_slots == 0


async def test_a_slot_granted_before_the_deadline_is_kept_when_the_deadline_passes(
    mock_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(slots=1, global_queue=10)
    short = TenantLimits(max_concurrency=1, max_queue=5, queue_timeout_ms=1_000)
    release_holder = trio.Event()
    async with trio.open_nursery() as nursery:
        reqs = Requests(admission, nursery)

        async def holder(task_status: trio.TaskStatus[None]) -> None:
            async with admission.admit("acme", ROOMY):
                task_status.started()
                await release_holder.wait()
            # No checkpoint in between: the slot is granted to "late", then its deadline passes
            # before it runs. It was granted in time, so it runs.
            mock_clock.jump(1)

        await nursery.start(holder)
        await reqs.start("late", "bravo", short)
        await reqs.start("next", "charlie")

        release_holder.set()
        await reqs.settle()
        assert reqs.admitted == ["late"]
        assert "late" not in reqs.outcomes
        assert admission.statistics().busy_slots == 1
        nursery.cancel_scope.cancel()


async def test_lowering_max_concurrency_keeps_running_requests(reqs: Requests) -> None:
    two = TenantLimits(max_concurrency=2, max_queue=10, queue_timeout_ms=60_000)
    one = TenantLimits(max_concurrency=1, max_queue=10, queue_timeout_ms=60_000)
    await reqs.start("a1", "acme", two)
    await reqs.start("a2", "acme", two)
    await reqs.start("a3", "acme", one)
    assert reqs.admitted == ["a1", "a2"]
    assert reqs.admission.tenant_statistics("acme") == TenantStatistics(2, 1)

    await reqs.finish_one()
    # One left running, and the new cap is 1: a3 still waits.
    assert reqs.admitted == ["a1", "a2"]
    await reqs.finish_one()
    assert reqs.admitted == ["a1", "a2", "a3"]


async def test_raising_max_concurrency_lets_waiters_in_first(reqs: Requests) -> None:
    one = TenantLimits(max_concurrency=1, max_queue=10, queue_timeout_ms=60_000)
    two = TenantLimits(max_concurrency=2, max_queue=10, queue_timeout_ms=60_000)
    await reqs.start("a1", "acme", one)
    await reqs.start("a2", "acme", one)
    await reqs.start("a3", "acme", two)
    # The cap went up: the request that waited longest runs, the newcomer waits its turn.
    assert reqs.admitted == ["a1", "a2"]
    assert reqs.admission.tenant_statistics("acme") == TenantStatistics(2, 1)


async def test_statistics_is_a_frozen_snapshot(reqs: Requests) -> None:
    admission = reqs.admission
    full = TenantLimits(max_concurrency=1, max_queue=0, queue_timeout_ms=1_000)
    assert admission.statistics().rejections == {
        "tenant_queue_full": 0,
        "queue_timeout": 0,
        "pod_saturated": 0,
    }
    await reqs.start("a1", "acme", full)
    await reqs.start("b1", "bravo")
    await reqs.start("b2", "bravo")
    with pytest.raises(Rejected):
        async with admission.admit("acme", full):
            pass

    snapshot = admission.statistics()
    assert (snapshot.slots, snapshot.busy_slots, snapshot.waiting, snapshot.global_queue) == (
        2,
        2,
        1,
        100,
    )
    assert dict(snapshot.tenants) == {
        "acme": TenantStatistics(running=1, waiting=0),
        "bravo": TenantStatistics(running=1, waiting=1),
    }
    assert snapshot.rejections["tenant_queue_full"] == 1
    assert admission.tenant_statistics("nobody") == TenantStatistics(running=0, waiting=0)

    for _ in range(3):
        await reqs.finish_one()
    assert admission.statistics().busy_slots == 0
    assert snapshot.busy_slots == 2, "a snapshot does not follow later changes"
    with pytest.raises(TypeError):
        snapshot.tenants["x"] = TenantStatistics(0, 0)  # type: ignore[index]


async def test_the_fast_path_lets_no_other_task_run() -> None:
    # No schedule point: the caller's guest wait yields right after. It is still a cancel
    # point: a cancelled caller is refused (next test).
    admission = Admission(slots=1, global_queue=0)
    others_ran: list[None] = []

    async def other() -> None:
        others_ran.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(64):  # trio runs ready tasks in random order: one yield may hide
            async with admission.admit("acme", ROOMY):
                pass
        assert not others_ran
    assert others_ran
    assert admission.statistics().busy_slots == 0


async def test_cancelled_before_admission_takes_nothing() -> None:
    admission = Admission(slots=1, global_queue=0)
    with trio.CancelScope() as scope:
        scope.cancel()
        async with admission.admit("acme", ROOMY):
            pytest.fail("a cancelled request must not run")
    assert scope.cancelled_caught
    assert admission.statistics().busy_slots == 0
