"""`serve --workers N`: a supervisor process and N worker processes sharing its sockets.

Why processes: a guest runs on a thread with the GIL released, but the request path around it
is Python, so short requests do not go faster with threads; they do with processes
(FACTS.md). Each worker is the whole single-process server (`app.run`): registry, admission,
guest threads, trio loop.

The supervisor

- binds the serving socket(s) and the metrics socket, then starts each worker through the
  fork server (fork_server.py: a process forked before `trio.run` or any thread, with every
  module imported, so a worker pays no import), which runs the `worker` command with the
  serve arguments in a fork of itself, handing it the serving socket (SCM_RIGHTS): one accept
  queue, and the kernel gives each new connection to whichever worker accepts first. A
  worker also gets a private unix socket for its own `/metrics`, a pipe on which it says
  "ready" once it has read every policy (its tenants are built while it serves, a request
  waiting for its own; no module loads before its first request), the read end of a pipe
  the supervisor never writes (EOF = the supervisor is gone: drain and exit), and its
  column in the pod-wide tenant counts (pod_limits.py). All workers start at once, and each
  accepts (told by SIGUSR2) as soon as it is ready: the pod answers when its first worker is;
- restarts a worker that dies, after `RESTART_DELAY_S` doubled per crash in a row (up to
  `MAX_RESTART_DELAY_S`; a worker that served `BACKOFF_RESET_S` resets it), counted in
  `wasm_supervisor_worker_restarts_total`;
- on SIGTERM/SIGINT closes its copy of the serving socket, sends SIGTERM to every worker
  (each drains its in-flight requests for `grace_period_s`, then cancels the rest), waits
  `grace_period_s + EXIT_MARGIN_S`, SIGKILLs what is left, and exits 0;
- on SIGHUP sends SIGHUP to every worker (each reloads policies and modules at once, as a
  single process does), then rolls them one at a time: start the new one, wait until it is
  ready and accepts; tell the old one to stop accepting (SIGUSR1), give the connections it accepted
  just before `ACCEPT_SETTLE_S` to deliver their first request, then SIGTERM it and wait for
  it to exit; then the next. The socket stays open throughout, so no connection is refused,
  and a connection is never closed before its first request is read (a draining server also
  gives a just-accepted connection `server.FIRST_REQUEST_GRACE_S` for its first request; the
  pause keeps the roll from leaning on that).
  Like any HTTP/1.1 server that closes idle keep-alive connections, a client whose request
  crosses that close on the wire must retry it (RFC 9112 §9.3.1). A new worker is forked from
  the fork server, so it runs the code the pod started with (new code means a new pod, as on
  Knative), but reads its files again: policies, modules, key files, certificates;
- serves `/metrics` on the metrics port itself: the workers' expositions merged
  (metrics_merge.py), plus its own series.

The execution slots, the global queue and `queue_timeout_ms` stay per worker: the pod has N
times the slots of one worker. Tenant `max_concurrency` is pod-wide (pod_limits.py).
"""

from __future__ import annotations

import faulthandler
import functools
import itertools
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from . import app, metrics_merge, server
from .fork_server import Child, ForkedProcess, ForkServer
from .metrics import METRICS_PATH, PREFIX
from .pod_limits import PodCounters

log = logging.getLogger("supervisor.workers")

RESTART_DELAY_S = 0.1
"""Before restarting a worker that died; doubled for each crash in a row."""
MAX_RESTART_DELAY_S = 10.0
"""A worker that cannot start (say, a broken install) is retried this often, not in a loop."""
BACKOFF_RESET_S = 30.0
"""A worker that served this long before dying starts the delay over: it was not a crash loop."""
EXIT_MARGIN_S = 2.0
"""After the grace period a worker cancels what is left, joins its guest threads and exits;
this much more before SIGKILL."""
ACCEPT_SETTLE_S = 0.25
"""Between telling an old worker to stop accepting and draining it: a client sends its request
right after connecting (microseconds on loopback or in a cluster), so every connection the
worker accepted before it stopped has been read by then and is busy, not idle."""
SCRAPE_TIMEOUT_S = 2.0
"""For one worker's `/metrics` (its event loop answers while guests run on threads); a worker
that misses it contributes its previous answer. Well inside Prometheus' default 10 s."""
SCRAPE_RESPONSE_BYTES = 64 * 1024 * 1024
"""A worker's exposition is bounded by its label sets (a few hundred KiB); this is a guard."""


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Handoff:
    """What a worker process gets from its supervisor, as inherited file descriptors."""

    listen_fds: tuple[int, ...]
    metrics_fd: int | None
    ready_fd: int
    parent_fd: int
    pod_counters: Path
    pod_column: int

    def arguments(self) -> list[str]:
        """The `worker` command's flags that carry this handoff (cli.py parses them)."""
        args = [f"--listen-fd={fd}" for fd in self.listen_fds]
        if self.metrics_fd is not None:
            args.append(f"--metrics-fd={self.metrics_fd}")
        args += [
            f"--ready-fd={self.ready_fd}",
            f"--parent-fd={self.parent_fd}",
            f"--pod-counters={self.pod_counters}",
            f"--pod-column={self.pod_column}",
        ]
        return args

    def fds(self) -> list[int]:
        extra = [] if self.metrics_fd is None else [self.metrics_fd]
        return [*self.listen_fds, *extra, self.ready_fd, self.parent_fd]

    def request(self, cpu: int | None) -> dict:
        """The fork server's spawn request: this handoff less its descriptors (sent beside
        it, in `fds` order), and the CPU to pin the worker to."""
        return {
            "listen": len(self.listen_fds),
            "metrics": self.metrics_fd is not None,
            "pod_counters": str(self.pod_counters),
            "pod_column": self.pod_column,
            "cpu": cpu,
        }

    @classmethod
    def from_request(cls, request: dict, fds: list[int]) -> Handoff:
        """The handoff a forked worker got: `request`, and `fds` as received."""
        listen, rest = fds[: request["listen"]], fds[request["listen"] :]
        metrics_fd = rest.pop(0) if request["metrics"] else None
        ready_fd, parent_fd = rest
        return cls(
            tuple(listen),
            metrics_fd,
            ready_fd,
            parent_fd,
            Path(request["pod_counters"]),
            request["pod_column"],
        )


def forked_worker(main: Callable[[list[str]], int], serve_args: Sequence[str]) -> Child:
    """What the fork server runs in each worker it forks: the `worker` command with the serve
    arguments and the handoff received, as an exec'd worker would run it (so the worker reads
    its flags, key files and certificates again, as it did when it was a new interpreter)."""

    def run(request: dict, fds: list[int]) -> int:
        if request["cpu"] is not None:  # first, so that every thread it starts inherits it
            os.sched_setaffinity(0, {request["cpu"]})
        handoff = Handoff.from_request(request, fds)
        return main(["worker", *serve_args, *handoff.arguments()])

    return run


# The worker side ------------------------------------------------------------------------------


def run_worker(config: app.AppConfig, handoff: Handoff) -> None:
    """The `worker` command: serve on the inherited sockets until told to stop.

    A fatal signal (SIGSEGV, SIGBUS, ...) prints every thread's Python stack to stderr first
    (faulthandler), which the supervisor's log carries: the request a guest thread was serving.
    """
    faulthandler.enable()
    trio.run(_run_worker, config, handoff)


async def _run_worker(config: app.AppConfig, handoff: Handoff) -> None:
    listeners = [_PausableListener(_inherited_listener(fd)) for fd in handoff.listen_fds]
    metrics_listeners = None
    if handoff.metrics_fd is not None:
        metrics_listeners = [_inherited_listener(handoff.metrics_fd)]
    pod = PodCounters(handoff.pod_counters, handoff.pod_column)
    try:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus) -> None:
                await app.run(
                    config,
                    listeners=listeners,
                    metrics_listeners=metrics_listeners,
                    pod=pod,
                    on_serving=functools.partial(_say_ready, handoff.ready_fd),
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # drained: stop watching the supervisor

            await nursery.start(_accept_when_told, listeners)
            running = await nursery.start(serve)  # every tenant built
            nursery.start_soon(_drain_when_orphaned, handoff.parent_fd, running.shutdown)
    finally:
        pod.close()


def _say_ready(ready_fd: int) -> None:
    """Tell the supervisor this worker serves: its policies are read, its tenants are being
    built (a request waits for its own)."""
    os.write(ready_fd, b"r")
    os.close(ready_fd)


def _inherited_listener(fd: int) -> trio.SocketListener:
    return trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


class _PausableListener(trio.abc.Listener[trio.SocketStream]):
    """The shared serving socket as one worker sees it. It starts paused; `pause` stops this
    worker accepting while the socket stays open for the others (closing a shared socket
    refuses nothing), `resume` starts it."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener
        self.socket = listener.socket  # server.serve reads the port from it
        self._resumed = trio.Event()
        self._accepting: trio.CancelScope | None = None

    async def accept(self) -> trio.SocketStream:
        while True:
            await self._resumed.wait()
            with trio.CancelScope() as self._accepting:
                return await self._listener.accept()

    async def aclose(self) -> None:
        await self._listener.aclose()

    def pause(self) -> None:
        if self._resumed.is_set():
            self._resumed = trio.Event()
        if self._accepting is not None:
            self._accepting.cancel()

    def resume(self) -> None:
        self._resumed.set()


async def _accept_when_told(
    listeners: list[_PausableListener], *, task_status: trio.TaskStatus[None]
) -> None:
    """SIGUSR2: start accepting; SIGUSR1: stop (the supervisor's orders, see `Supervisor`)."""
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
        task_status.started()
        async for signum in signals:
            resume = signum == signal.SIGUSR2
            log.info("%s accepting connections", "started" if resume else "stopped")
            for listener in listeners:
                if resume:
                    listener.resume()
                else:
                    listener.pause()


async def _drain_when_orphaned(parent_fd: int, shutdown: trio.Event) -> None:
    """Nobody writes the pipe: it becomes readable (EOF) when the supervisor has exited."""
    await trio.lowlevel.wait_readable(parent_fd)
    log.warning("the supervisor is gone: draining")
    shutdown.set()


# The supervisor side --------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    index: int  # which of the N it is (a replacement takes its predecessor's index)
    column: int  # its column in the pod-wide counts
    process: ForkedProcess
    metrics_path: Path | None
    metrics_socket: socket.socket | None
    ready_at: float | None = None  # trio time it said ready
    retiring: bool = False  # told to stop by the supervisor: its exit is no crash
    scrape: metrics_merge.Families | None = None  # its last /metrics answer
    exited: trio.Event = field(default_factory=trio.Event)


class Supervisor:
    """Starts, watches, restarts, rolls and stops the workers; serves the merged `/metrics`."""

    def __init__(self, config: app.AppConfig, workers: int, fork_server: ForkServer) -> None:
        self._config = config
        self._count = workers
        self._fork_server = fork_server
        self._drain_s = config.server.grace_period_s + EXIT_MARGIN_S
        self._current: list[_Worker | None] = [None] * workers
        self._alive: set[_Worker] = set()
        self._failures = [0] * workers  # crashes in a row, per index
        # One column per worker, plus one for the new worker of a rolling restart.
        self._free_columns = list(range(workers + 1))
        self._serials = itertools.count()
        self._serving = False
        self._stopping = False
        self._rolling = False
        self._roll_again = False
        self._merger = metrics_merge.Merger()
        disable_created_metrics()  # as in the workers (metrics.py)
        self._registry = CollectorRegistry(auto_describe=True)
        self._restarts = Counter(
            f"{PREFIX}_worker_restarts",
            "Worker processes restarted after they died without being told to stop.",
            registry=self._registry,
        )
        self._ready_workers = Gauge(
            f"{PREFIX}_workers",
            "Worker processes accepting requests now.",
            registry=self._registry,
        )
        self._ready_workers.set_function(
            lambda: sum(1 for w in self._alive if w.ready_at is not None and not w.retiring)
        )
        ProcessCollector(registry=self._registry)  # the supervisor's own CPU and memory
        # Set in `run`.
        self._runtime: Path
        self._pod: PodCounters
        self._listen_fds: tuple[int, ...] = ()
        self._parent_fd: int
        self._nursery: trio.Nursery  # watchers and the metrics server
        self._tasks: trio.Nursery  # starts, restarts and rolls: cancelled first on shutdown
        self._start_failed = False  # a worker exited before any was ready: stop, exit 1

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a drain, 1 if the workers could not start.

        `task_status.started` gets the serving port once the first worker accepts.
        """
        config = self._config
        with (
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
            tempfile.TemporaryDirectory(prefix="wasm-supervisor-") as runtime,
        ):
            self._runtime = Path(runtime)  # private (0700): worker sockets, pod counts
            listeners = await server.open_listeners(config.host, config.port)
            port = server.bound_port(listeners)
            self._listen_fds = tuple(listener.socket.fileno() for listener in listeners)
            metrics_listeners = None
            if config.metrics_port is not None:
                metrics_listeners = await server.open_listeners(
                    config.metrics_host, config.metrics_port
                )
            pod_path = self._runtime / "pod-counters"
            PodCounters.create(pod_path, columns=len(self._free_columns))
            self._pod = PodCounters(pod_path, column=None)
            parent_read, parent_write = os.pipe()
            self._parent_fd = parent_read
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._fork_server.run)
                    async with trio.open_nursery() as tasks:
                        self._tasks = tasks
                        started = await self._start_all()
                        if started:
                            signame = await self._serve(
                                port, metrics_listeners, signals, task_status
                            )
                            log.info("%s: draining %d workers", signame, len(self._alive))
                        self._stopping = True
                        tasks.cancel_scope.cancel()
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)  # refuse new connections now
                    await self._stop_all()
                    nursery.cancel_scope.cancel()
            finally:
                os.close(parent_write)
                os.close(parent_read)
                self._pod.close()
                for listener in listeners + (metrics_listeners or []):
                    await trio.aclose_forcefully(listener)
        log.info("stopped")
        return 0 if started and not self._start_failed else 1

    async def _serve(
        self,
        port: int,
        metrics_listeners: list[trio.SocketListener] | None,
        signals: AsyncIterator[int],
        task_status: trio.TaskStatus[int],
    ) -> str:
        """Serve metrics and handle SIGHUP until SIGTERM/SIGINT; return that signal's name."""
        config = self._config
        self._serving = True
        log.info("serving on http://%s:%d with %d workers", config.host, port, self._count)
        if metrics_listeners is not None:
            await self._nursery.start(
                functools.partial(
                    server.serve,
                    self._handle_metrics,
                    metrics_listeners,
                    config.server,
                    shutdown=trio.Event(),
                )
            )
            log.info(
                "metrics on http://%s:%d/metrics",
                config.metrics_host,
                server.bound_port(metrics_listeners),
            )
        task_status.started(port)
        async for signum in signals:
            if signum != signal.SIGHUP:
                return signal.Signals(signum).name
            self._hangup()
        raise AssertionError("the signal receiver never ends")

    async def _start_all(self) -> bool:
        """Every worker at once, each accepting as soon as it is ready: a worker compiles
        nothing at start (modules load on their first request), so none waits for another.
        Returns once the first is ready, so the pod answers (and handles signals) from then;
        False if one exited before any was ready (`run` then stops and returns 1). One that
        exits before it is ready once the pod serves is restarted as a crash (`_watch`)."""
        first = trio.Event()

        async def start(index: int) -> None:
            worker = await self._spawn(index, current=True, accept=True)
            if worker is not None:
                self._serving = True  # from the first ready worker on, a death is a crash
            elif not first.is_set():
                log.error("worker %d exited before it was ready: stopping", index)
                self._start_failed = True
            first.set()

        for index in range(self._count):
            self._tasks.start_soon(start, index)
        await first.wait()
        return not self._start_failed

    async def _spawn(self, index: int, *, current: bool, accept: bool = False) -> _Worker | None:
        """Start a worker; wait until it is ready, and tell it to accept if `accept` or once
        the pod serves (a replacement). None if it exits first (its watcher says)."""
        column = self._free_columns.pop()
        serial = next(self._serials)
        metrics_path = metrics_socket = None
        if self._config.metrics_port is not None:
            metrics_path = self._runtime / f"worker-{serial}.sock"
            metrics_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            metrics_socket.bind(str(metrics_path))
            metrics_socket.listen()
        ready_read, ready_write = os.pipe()
        handoff = Handoff(
            listen_fds=self._listen_fds,
            metrics_fd=None if metrics_socket is None else metrics_socket.fileno(),
            ready_fd=ready_write,
            parent_fd=self._parent_fd,
            pod_counters=self._runtime / "pod-counters",
            pod_column=column,
        )
        try:
            process = await self._fork_server.spawn(
                handoff.request(self._cpu(index)), handoff.fds()
            )
        except BaseException:
            os.close(ready_read)
            self._free_columns.append(column)
            if metrics_socket is not None:
                metrics_socket.close()
            raise
        finally:
            os.close(ready_write)
        worker = _Worker(index, column, process, metrics_path, metrics_socket)
        self._alive.add(worker)
        if current:
            self._current[index] = worker
        self._nursery.start_soon(self._watch, worker)
        if self._stopping:
            worker.retiring = True
            process.send_signal(signal.SIGTERM)
        async with trio.lowlevel.FdStream(ready_read) as ready:
            if not await ready.receive_some(1):
                return None
        worker.ready_at = trio.current_time()
        log.info("worker %d ready (pid %d)", index, process.pid)
        if accept or self._serving:
            process.send_signal(signal.SIGUSR2)
        return worker

    def _cpu(self, index: int) -> int | None:
        """Worker `index` runs on CPU `index` when there is a CPU per worker (else None).

        A worker's event loop and guest threads share one GIL; spread over two cores they
        fight for it across cores. Measured on 2 cores, hello with 2 workers: 3,668 req/s
        unpinned, 5,892 pinned one worker per core. The forked worker sets it first, before
        it has threads: the threads it starts inherit the mask. A replacement takes its
        predecessor's CPU.
        """
        cpus = sorted(os.sched_getaffinity(0))
        return cpus[index] if self._count <= len(cpus) else None

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker to exit; restart it if that was a crash."""
        returncode = await worker.process.wait()
        self._forget(worker)
        worker.exited.set()
        if worker.retiring or self._stopping:
            log.info("worker %d (pid %d) exited: %s", worker.index, worker.process.pid, returncode)
            return
        if not self._serving or self._current[worker.index] is not worker:
            return  # failed to start: `_start_all` or `_roll` says so
        index = worker.index
        served_s = 0.0 if worker.ready_at is None else trio.current_time() - worker.ready_at
        if served_s >= BACKOFF_RESET_S:
            self._failures[index] = 0
        delay = min(RESTART_DELAY_S * 2 ** self._failures[index], MAX_RESTART_DELAY_S)
        self._failures[index] += 1
        self._restarts.inc()
        log.error(
            "worker %d (pid %d) died (%s); restarting in %.1fs",
            index,
            worker.process.pid,
            _describe(returncode),
            delay,
        )
        self._tasks.start_soon(self._restart, worker, delay)

    async def _restart(self, dead: _Worker, delay: float) -> None:
        await trio.sleep(delay)
        if self._current[dead.index] is dead:  # not replaced by a rolling restart meanwhile
            await self._spawn(dead.index, current=True)

    def _forget(self, worker: _Worker) -> None:
        """An exited worker: keep what it counted, free its column and socket."""
        self._alive.discard(worker)
        if worker.scrape is not None:
            self._merger.retire(worker.scrape)
            worker.scrape = None
        self._pod.clear_column(worker.column)
        self._free_columns.append(worker.column)
        if worker.metrics_socket is not None:
            worker.metrics_socket.close()
            worker.metrics_path.unlink(missing_ok=True)

    def _hangup(self) -> None:
        log.info("SIGHUP: reloading every worker, then replacing them one at a time")
        for worker in self._alive:
            # One still starting loads the files as they are now anyway (and has no handler
            # yet: SIGHUP would kill it).
            if worker.ready_at is not None and not worker.retiring:
                worker.process.send_signal(signal.SIGHUP)
        if self._rolling:
            self._roll_again = True
        else:
            self._tasks.start_soon(self._roll)

    async def _roll(self) -> None:
        self._rolling = True
        try:
            while True:
                self._roll_again = False
                for index in range(self._count):
                    old = self._current[index]
                    new = await self._spawn(index, current=False)
                    if new is None:
                        log.error("rolling restart stopped: worker %d's successor died", index)
                        return
                    self._current[index] = new
                    if old is not None:
                        old.retiring = True
                        if old.process.returncode is None:
                            old.process.send_signal(signal.SIGUSR1)  # stop accepting
                            await trio.sleep(ACCEPT_SETTLE_S)
                        await self._stop(old)
                log.info("rolling restart done")
                if not self._roll_again:
                    return
        finally:
            self._rolling = False

    async def _stop(self, worker: _Worker) -> None:
        """SIGTERM; after the grace period (and a margin) SIGKILL; return once it exited."""
        worker.retiring = True
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self._drain_s):
            await worker.exited.wait()
            return
        log.warning("worker %d (pid %d) still running: SIGKILL", worker.index, worker.process.pid)
        worker.process.kill()
        await worker.exited.wait()

    async def _stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for worker in list(self._alive):
                nursery.start_soon(self._stop, worker)

    # /metrics -----------------------------------------------------------------------------

    async def _handle_metrics(
        self, request: server.Request, body: server.RequestBody
    ) -> server.Response:
        if request.path != METRICS_PATH:
            return server.Response(404, [_TEXT], b"only /metrics is served here\n")
        if request.method not in ("GET", "HEAD"):
            return server.Response(405, [_TEXT, (b"allow", b"GET, HEAD")], b"use GET\n")
        sources = [metrics_merge.families_of(self._registry.collect())]
        ready = [w for w in self._alive if w.ready_at is not None]
        async with trio.open_nursery() as nursery:
            for worker in ready:
                nursery.start_soon(self._scrape, worker)
        sources += [w.scrape for w in ready if w.scrape is not None]
        accept = next((value for name, value in request.headers if name == "accept"), "")
        encode, content_type = choose_encoder(accept)
        data = encode(metrics_merge.Snapshot(self._merger.merge(sources)))
        return server.Response(200, [(b"content-type", content_type.encode("latin-1"))], data)

    async def _scrape(self, worker: _Worker) -> None:
        """Refresh `worker.scrape`; on failure it keeps its previous answer (logged)."""
        try:
            with trio.fail_after(SCRAPE_TIMEOUT_S):
                text = await _get_metrics(worker.metrics_path)
            families = metrics_merge.parse(text)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError) as exc:
            log.warning("worker %d (pid %d): no metrics: %r", worker.index, worker.process.pid, exc)
            return
        if worker in self._alive:  # not exited (and retired) meanwhile
            worker.scrape = families


_TEXT = (b"content-type", b"text/plain; charset=utf-8")


async def _get_metrics(path: Path) -> str:
    """GET /metrics over a worker's unix socket, in the text format."""
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=METRICS_PATH,
        headers=[("host", "worker"), ("connection", "close"), ("accept", "text/plain")],
    )
    body = bytearray()
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        status = None
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some(64 * 1024))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > SCRAPE_RESPONSE_BYTES:
                    raise ValueError("metrics response too large")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    if status != 200:
        raise ValueError(f"metrics answered {status}")
    return body.decode("utf-8")


MAPPED_FILE_FAULTS = frozenset({signal.SIGBUS, signal.SIGSEGV})
"""How a worker dies when a file it has mapped changes under it: wasmtime maps each compiled
artifact it loads (modules.py), and a truncated one faults with SIGBUS, a rewritten one with
SIGSEGV or worse. Nothing else a worker does maps shared files."""


def _describe(returncode: int) -> str:
    """How a worker ended, with the likely cause when the signal has one."""
    if returncode >= 0:
        return f"exit {returncode}"
    signum = signal.Signals(-returncode)
    if signum in MAPPED_FILE_FAULTS:
        return (
            f"signal {signum.name}: likely a compiled artifact changed or truncated on disk"
            " while the worker had it mapped; the artifact cache must be writable by the"
            " server alone"
        )
    return f"signal {signum.name}"


async def supervise(config: app.AppConfig, workers: int, fork_server: ForkServer) -> int:
    """`serve --workers N` with N > 1; `fork_server` (forked before `trio.run`) starts the
    workers."""
    return await Supervisor(config, workers, fork_server).run()
