"""Admission control: who may run a guest now, who waits, and who is turned away.

Step 4 of the request path (DESIGN.md). Pure trio, no I/O, so it is tested without a server.

The pod has `slots` execution slots. A request takes one for as long as its guest runs, if its
tenant is below `max_concurrency` and nobody of that tenant is waiting before it. Otherwise it
waits, counted against its tenant's `max_queue` and the pod's `global_queue`, for at most its
tenant's `queue_timeout_ms`. A freed slot goes to the next tenant, in round-robin order, that
has a waiter and is below its own cap (FIFO within a tenant), so a tenant flooding the pod
cannot starve a quiet one.

Invariant, restored after every change: while a slot is free, no waiter could take it (each
waiting tenant is at its cap). That is what lets the fast path take a free slot without looking
at the queues of other tenants.

Waiters park with `trio.lowlevel.wait_task_rescheduled`, so the fast path allocates no Event
and waiting costs no more than trio's own `ParkingLot`. A waiter is removed from its queue by
its abort function at the moment it is cancelled; a slot granted to a waiter cancelled in the
same instant is released at once, which hands it to the next waiter.

Queue timeouts are not one cancel scope per waiter: one task (`_expire_waiters`) sleeps until
the earliest deadline and turns away whoever is overdue. Measured on one core with a tenant
capped at 8 under 16 connections (half the requests wait): a cancel scope with a deadline per
wait cost ~8 µs of CPU per request.

With `--workers N`, `pod` (pod_limits.py) makes `max_concurrency` hold for the whole pod: a
tenant may run only while the sum over every worker process is below its cap. Another
process's release wakes nobody here, so while requests wait, `poll_pod` rechecks every
`POD_POLL_S` (a release in this process rechecks at once). A waiter blocked only by the pod
keeps its place in this process's queue; between processes there is no order: whichever
process rechecks first after a guest ends elsewhere takes the freed count. `max_queue`,
`queue_timeout_ms`, the slots and the global queue stay per process. Without `pod` (one
process) none of this runs: no lock, no poll.
"""

from __future__ import annotations

import collections
import enum
import math
import types
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import outcome
import trio

from supervisor.errors import Rejected

if TYPE_CHECKING:
    from supervisor.pod_limits import PodCounters

# Seconds a refused client is told to wait (`Retry-After`). Queue waits are bounded by
# `queue_timeout_ms` (about a second by default), so a slot usually frees within one second;
# HTTP's Retry-After has whole-second resolution (RFC 9110 §10.2.3), so 1 is the shortest hint.
RETRY_AFTER_S = 1

POD_POLL_S = 0.002
"""How often waiters recheck the pod-wide counts: a trivial guest runs in ~0.1 ms, so a few ms
is the most a guest ending in another process adds to a wait, at no more than 500 lock round
trips a second per process, and only while requests wait."""


class RejectReason(enum.StrEnum):
    """Why admission refused a request: the `reason` of `Rejected` and the metric label."""

    TENANT_QUEUE_FULL = "tenant_queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    POD_SATURATED = "pod_saturated"


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's admission limits, taken from its policy on every request (hot reload)."""

    max_concurrency: int
    max_queue: int
    queue_timeout_ms: int


@dataclass(frozen=True, slots=True)
class TenantStatistics:
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class AdmissionStatistics:
    """A frozen snapshot for `/metrics`: a collector reads state, it keeps no copy of its own."""

    slots: int
    busy_slots: int
    waiting: int
    global_queue: int
    tenants: Mapping[str, TenantStatistics]
    rejections: Mapping[str, int]


class _Waiter:
    __slots__ = ("deadline", "task")

    def __init__(self, task: trio.lowlevel.Task, deadline: float) -> None:
        self.task = task
        self.deadline = deadline  # trio time after which it is turned away


class _Tenant:
    """Live admission state of one tenant; dropped when it has nothing running or waiting."""

    __slots__ = ("limits", "name", "running", "waiters")

    def __init__(self, name: str, limits: TenantLimits) -> None:
        self.name = name
        self.limits = limits
        self.running = 0
        self.waiters: collections.deque[_Waiter] = collections.deque()

    def can_run(self) -> bool:
        return self.running < self.limits.max_concurrency


class Admission:
    """Execution slots shared by all tenants, with per-tenant caps and fair queueing."""

    def __init__(self, *, slots: int, global_queue: int, pod: PodCounters | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if global_queue < 0:
            raise ValueError(f"global_queue must not be negative, got {global_queue}")
        self._slots = slots
        self._global_queue = global_queue
        self._busy = 0
        self._waiting = 0
        self._tenants: dict[str, _Tenant] = {}
        # Tenants with waiters, in the order they are next served: the round-robin ring.
        self._ring: collections.OrderedDict[str, _Tenant] = collections.OrderedDict()
        # Every reason starts at 0 so its metric series exists before the first refusal.
        self._rejections = dict.fromkeys(RejectReason, 0)
        self._pod = pod
        self._waiter_arrived = trio.Event()  # wakes `poll_pod` from its idle wait
        self._expiry: trio.CancelScope | None = None  # `_expire_waiters`'s sleep, once started

    def admit(self, tenant: str, limits: TenantLimits) -> AbstractAsyncContextManager[None]:
        """`async with admission.admit(t, limits):` runs holding one slot; raises `Rejected`.

        A cancel point always, but a schedule point only when it waits: the body must yield
        (the gateway's guest wait always does). A schedule point here as well cost ~1.8 µs
        of CPU per demo hello, one more pass through trio's run loop, and bought nothing:
        the task yields again, still before its guest runs.
        """
        return _Ticket(self, tenant, limits)

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            slots=self._slots,
            busy_slots=self._busy,
            waiting=self._waiting,
            global_queue=self._global_queue,
            tenants=types.MappingProxyType(
                {name: self._tenant_snapshot(state) for name, state in self._tenants.items()}
            ),
            rejections=types.MappingProxyType({str(k): v for k, v in self._rejections.items()}),
        )

    def tenant_statistics(self, tenant: str) -> TenantStatistics:
        state = self._tenants.get(tenant)
        if state is None:
            return TenantStatistics(running=0, waiting=0)
        return self._tenant_snapshot(state)

    @staticmethod
    def _tenant_snapshot(state: _Tenant) -> TenantStatistics:
        return TenantStatistics(running=state.running, waiting=len(state.waiters))

    async def _acquire(self, tenant: str, limits: TenantLimits) -> None:
        # The fast path's one cancel point (see `admit`); every decision below is taken
        # without yielding.
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(tenant, limits)
        else:
            state.limits = limits
            if state.waiters:
                # A raised cap may let this tenant's waiters run now (hot reload).
                self._dispatch()
        # In one process, by the invariant, a tenant that can run has no waiters; with `pod`,
        # waiters blocked by the pod-wide count go first.
        if (
            self._busy < self._slots
            and state.can_run()
            and not state.waiters
            and self._pod_admits(state)
        ):
            state.running += 1
            self._busy += 1
            return
        self._check_room(state)
        await self._wait(state, limits.queue_timeout_ms)

    def _pod_admits(self, state: _Tenant) -> bool:
        """Whether the pod-wide count lets the tenant run one more (counted if so)."""
        pod = self._pod
        return pod is None or pod.try_acquire(state.name, state.limits.max_concurrency)

    async def poll_pod(self) -> None:
        """With `pod`: while requests wait, hand them what other processes freed."""
        while True:
            if not self._waiting:
                self._waiter_arrived = trio.Event()
                await self._waiter_arrived.wait()
            await trio.sleep(POD_POLL_S)
            self._dispatch()

    def _check_room(self, state: _Tenant) -> None:
        """Refuse a request that would have to wait when there is no room to wait."""
        if len(state.waiters) >= state.limits.max_queue:
            self._forget_if_idle(state)
            raise self._reject(429, RejectReason.TENANT_QUEUE_FULL, "tenant queue is full")
        if self._waiting >= self._global_queue:
            self._forget_if_idle(state)
            if self._busy < self._slots:
                # Slots are free: this tenant waits only for its own cap, so it is to blame.
                raise self._reject(429, RejectReason.TENANT_QUEUE_FULL, "tenant queue is full")
            raise self._reject(503, RejectReason.POD_SATURATED, "all execution slots are busy")

    async def _wait(self, state: _Tenant, queue_timeout_ms: int) -> None:
        waiter = _Waiter(
            trio.lowlevel.current_task(), trio.current_time() + queue_timeout_ms / 1000
        )
        state.waiters.append(waiter)
        self._waiting += 1
        if state.name not in self._ring:
            self._ring[state.name] = state
        if self._pod is not None:
            self._waiter_arrived.set()
        if self._expiry is None:
            self._expiry = trio.CancelScope(deadline=waiter.deadline)
            trio.lowlevel.spawn_system_task(self._expire_waiters, name="admission-timeouts")
        elif waiter.deadline < self._expiry.deadline:
            self._expiry.deadline = waiter.deadline

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Runs only while the task is still parked, hence still in its queue.
            self._unqueue(state, waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        if not await trio.lowlevel.wait_task_rescheduled(abort):
            raise self._reject(429, RejectReason.QUEUE_TIMEOUT, "timed out waiting in the queue")
        # Granted a slot (already counted as ours). If we were cancelled in the same instant,
        # nobody will use it: release it to the next waiter and give up.
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._release(state.name)
            raise

    def _unqueue(self, state: _Tenant, waiter: _Waiter) -> None:
        state.waiters.remove(waiter)
        self._waiting -= 1
        if not state.waiters:
            del self._ring[state.name]
        self._forget_if_idle(state)

    async def _expire_waiters(self) -> None:
        """Forever: sleep until the earliest waiter's deadline, then turn away the overdue.

        Within a tenant, waiters queue in deadline order unless its `queue_timeout_ms` was
        just lowered; then a later waiter is turned away at the next expiry after its own.
        """
        expiry = self._expiry
        assert expiry is not None
        while True:
            with expiry:
                await trio.sleep_forever()
            now = trio.current_time()
            for state in list(self._ring.values()):
                while state.waiters and state.waiters[0].deadline <= now:
                    waiter = state.waiters[0]
                    self._unqueue(state, waiter)
                    trio.lowlevel.reschedule(waiter.task, outcome.Value(False))
            expiry = self._expiry = trio.CancelScope(deadline=self._next_deadline())

    def _next_deadline(self) -> float:
        return min((state.waiters[0].deadline for state in self._ring.values()), default=math.inf)

    def _release(self, tenant: str) -> None:
        state = self._tenants[tenant]
        state.running -= 1
        self._busy -= 1
        if self._pod is not None:
            self._pod.release(tenant)
        self._dispatch()
        self._forget_if_idle(state)

    def _dispatch(self) -> None:
        """Hand free slots to waiters, round robin over tenants below their cap."""
        while self._busy < self._slots:
            for state in self._ring.values():
                if state.can_run() and self._pod_admits(state):
                    break
            else:
                return
            task = state.waiters.popleft().task
            if state.waiters:
                self._ring.move_to_end(state.name)
            else:
                del self._ring[state.name]
            self._waiting -= 1
            state.running += 1
            self._busy += 1
            trio.lowlevel.reschedule(task, outcome.Value(True))

    def _forget_if_idle(self, state: _Tenant) -> None:
        if state.running == 0 and not state.waiters:
            del self._tenants[state.name]

    def _reject(self, status: int, reason: RejectReason, message: str) -> Rejected:
        self._rejections[reason] += 1
        return Rejected(message, status=status, reason=str(reason), retry_after=RETRY_AFTER_S)


class _Ticket:
    """The context manager `admit` returns: one small object, nothing else on the fast path."""

    __slots__ = ("_admission", "_limits", "_tenant")

    def __init__(self, admission: Admission, tenant: str, limits: TenantLimits) -> None:
        self._admission = admission
        self._tenant = tenant
        self._limits = limits

    async def __aenter__(self) -> None:
        await self._admission._acquire(self._tenant, self._limits)

    async def __aexit__(self, *exc_info: object) -> None:
        # No checkpoint: the slot is given back even when the request is being cancelled.
        self._admission._release(self._tenant)
