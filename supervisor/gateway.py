"""One request, top to bottom: tenant → route → body → admission → sandbox → response.

Every way a request can end is a `SupervisorError` (errors.py) or a guest's CGI output; both
become one `Response` here, with one access-log line carrying the request id, tenant, route,
status, outcome, duration and fuel used.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import wagi
from .admin import ADMIN_PREFIX, TenantUsage
from .admission import Admission
from .errors import GuestBadOutput, ModuleLoading, NotFound, Outcome, SupervisorError
from .guest_threads import LONG_JOB_S, GuestThreads
from .metrics import Metrics
from .policies import Policy
from .routing import RouteMatch
from .sandbox import GuestRun, Sandbox
from .server import Handler, Request, RequestBody, Response
from .tenants import RegistryState, RouteTarget, Tenant, TenantRegistry

access_log = logging.getLogger("supervisor.access")
guest_log = logging.getLogger("supervisor.guest")

HEALTH_PATH = "/healthz"
FILLING_WAIT_S = 10.0
"""How long a request waits for its tenant to be built while the pod is just up (one tenant
takes well under a millisecond: only a tenant stuck behind a slow read waits this long);
then 503 with Retry-After."""
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_STDERR_LOG_LIMIT = 4096
"""Bytes of a guest's stderr copied into the process log per request (the rest is counted)."""
# What a log line must not hold as is: C0 controls (newline, CR, ESC...), DEL, C1 controls,
# and the Unicode line and paragraph separators (`str.splitlines` breaks at them); and the
# backslash, so that an escape in the log always comes from the host, never from the guest.
_LOG_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


StderrSink = Callable[[str, bytes], None]
"""Takes a run's stderr with the route it ran for (as written); called in the guest thread,
so it may write files. It must not raise: the response is ready when it is called."""


@dataclass(slots=True)
class _Resolved:
    tenant: Tenant
    base_path: str  # "/<tenant>" when addressed by path, "" when by host
    match: RouteMatch[RouteTarget]


class _RoutesPending(NotFound):
    """No route matched in a tenant whose modules.toml `_routes` are not learned yet."""

    def __init__(self, tenant: Tenant, path: str) -> None:
        super().__init__(f"tenant {tenant.name!r} has no route for {path!r}")
        self.tenant = tenant


class Gateway:
    """The server's request handler. Holds no per-request state."""

    def __init__(
        self,
        registry: TenantRegistry,
        sandbox: Sandbox,
        admission: Admission,
        guest_threads: GuestThreads,
        metrics: Metrics,
        *,
        admin: Handler | None = None,
    ) -> None:
        self.registry = registry
        self.sandbox = sandbox
        self.admission = admission
        self.guest_threads = guest_threads
        self.metrics = metrics
        self.admin = admin  # answers every path under ADMIN_PREFIX
        self.usage: dict[str, TenantUsage] = {}  # by tenant, for the admin API
        # `wagi` mode (WAGI has no tenant prefix): the tenant a request goes to when no policy
        # names its Host, served at `/`; and the Host a request without one is given.
        self.root_tenant: str | None = None
        self.default_host = ""
        # `wagi --log-dir`: each run's stderr also goes to its route's file, as in WAGI.
        self.guest_stderr: StderrSink | None = None

    async def handle(self, request: Request, body: RequestBody) -> Response:
        if request.path == HEALTH_PATH:
            # 503 while this worker serves an older state than the pod committed (WAGI.md),
            # or has not read the store yet.
            diverged = self.registry.not_ready()
            if diverged is not None:
                return Response(503, list(_TEXT), diverged.encode() + b"\n")
            return Response(200, list(_TEXT), b"OK\n")
        if self.admin is not None and request.path.startswith(ADMIN_PREFIX):
            await self.registry.filled()  # the pod is just up: every tenant known first
            return await self.admin(request, body)
        # In flight from here until the response is handed to the server, however it ends.
        self.metrics.request_started()
        try:
            return await self._serve(request, body)
        finally:
            self.metrics.request_finished()

    async def _serve(self, request: Request, body: RequestBody) -> Response:
        started = time.perf_counter()
        tenant_name = route = "-"
        fuel_used = memory_bytes = outbound_calls = 0
        try:
            if self.registry.behind():  # another worker of the pod committed an admin change
                await self.registry.catch_up()
            try:
                resolved = await self._resolve_while_filling(request)
            except _RoutesPending as pending:  # the pod is just up: learn them, then look again
                policy = pending.tenant.policy
                deadline = (
                    trio.current_time() + (policy.queue_timeout_ms + policy.timeout_ms) / 1000
                )
                if not await self.registry.learn_routes(pending.tenant.name, deadline=deadline):
                    raise ModuleLoading(
                        f"tenant {pending.tenant.name!r} is still learning its routes",
                        retry_after=1,
                    ) from None
                resolved = self._resolve(request, self.registry.state)
            tenant_name = resolved.tenant.name
            route = resolved.match.route.pattern
            run, response, outcome = await self._run(request, body, resolved)
            fuel_used = run.fuel_used
            memory_bytes = run.memory_bytes
            outbound_calls = run.outbound_calls
        except SupervisorError as error:
            response, outcome = error_response(error), error.outcome
        duration_s = time.perf_counter() - started
        if access_log.isEnabledFor(logging.INFO):  # the record costs more than the check
            access_log.info(
                "%s %s %s %s %d %s %.1fms fuel=%d outbound=%d",
                request.request_id,
                tenant_name,
                request.method,
                route,
                response.status,
                outcome,
                duration_s * 1000,
                fuel_used,
                outbound_calls,
                extra={
                    "request_id": request.request_id,
                    "tenant": tenant_name,
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": response.status,
                    "outcome": str(outcome),
                    "duration_ms": round(duration_s * 1000, 3),
                    "fuel_used": fuel_used,
                    "outbound_calls": outbound_calls,
                },
            )
        self.metrics.observe_request(
            tenant_name, response.status, outcome, duration_s, fuel_used, memory_bytes
        )
        if tenant_name != "-":
            usage = self.usage.get(tenant_name)
            if usage is None:
                usage = self.usage[tenant_name] = TenantUsage()
            usage.requests += 1
            usage.fuel_used += fuel_used
        return response

    async def _resolve_while_filling(self, request: Request) -> _Resolved:
        """`_resolve`; while the pod is just up and still building its tenants, a request
        whose tenant is not built yet has it built next and waits for it (milliseconds)."""
        try:
            return self._resolve(request, self.registry.state)
        except NotFound:
            host = host_name(request.host) if request.host else None
            name = self.root_tenant or request.path[1:].partition("/")[0]
            with trio.move_on_after(FILLING_WAIT_S):
                state = await self.registry.filling_state(host, name)
                if state is None:
                    raise
                return self._resolve(request, state)
            raise ModuleLoading(
                f"the tenant of {request.path!r} is not read yet", retry_after=1
            ) from None

    def _resolve(self, request: Request, state: RegistryState) -> _Resolved:
        """Tenant by `Host` first, else by the first path segment; then the route."""
        tenant = state.tenant_for_host(host_name(request.host)) if request.host else None
        base_path = ""
        path = request.path
        if tenant is None and self.root_tenant is not None:
            tenant = state.tenants.get(self.root_tenant)
            if tenant is None:
                raise NotFound(f"tenant {self.root_tenant!r} is not loaded")
        elif tenant is None:
            segment, slash, rest = path[1:].partition("/")
            tenant = state.tenants.get(segment)
            if tenant is None:
                raise NotFound(f"no tenant serves {path!r}")
            base_path = "/" + segment
            path = slash + rest or "/"
        match = tenant.routes.match(path)
        if match is None:
            if tenant.routes_pending:
                raise _RoutesPending(tenant, path)
            raise NotFound(f"tenant {tenant.name!r} has no route for {path!r}")
        return _Resolved(tenant, base_path, match)

    async def _run(
        self, request: Request, body: RequestBody, resolved: _Resolved
    ) -> tuple[GuestRun, Response, Outcome]:
        """Run the guest and turn its output into the response, both in a guest thread."""
        tenant, match = resolved.tenant, resolved.match
        target = match.route.target
        prepared = self.registry.loaded.get(target.sha256)
        if prepared is None:  # its first request here (or since it was evicted): load it
            # The latest the policy lets the request answer: a slot's wait, then the guest's.
            policy = tenant.policy
            deadline = trio.current_time() + (policy.queue_timeout_ms + policy.timeout_ms) / 1000
            prepared = await self.registry.loaded.load(target.module, deadline=deadline)
        stdin = await body.read(tenant.policy.max_request_bytes)
        cgi = wagi.CgiRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            has_query=request.has_query,
            http_version=request.http_version,
            headers=request.headers,
            host=request.host or self.default_host,
            server_port=request.server_port,
            client_addr=request.client_addr,
            body_length=len(stdin),
            scheme=request.scheme,
        )
        env = wagi.build_env(
            cgi,
            script_name=(resolved.base_path + match.script_name) or "/",
            path_info_raw=match.path_info_raw,
            matched_route=match.route.pattern,
            base_path=resolved.base_path or "/",
            tenant_env=tenant.policy.env,
        )
        argv = wagi.build_argv(cgi, target.argv_template)
        run_guest = functools.partial(
            self.sandbox.run,
            prepared,
            target.entrypoint,
            argv=argv,
            env=env,
            stdin=stdin,
            limits=tenant.guest_limits,
            volumes=target.volumes,
            outbound=target.outbound,
        )
        stderr_sink = None
        if self.guest_stderr is not None:
            stderr_sink = functools.partial(self.guest_stderr, match.route.pattern)
        job = functools.partial(_run_and_respond, run_guest, tenant.policy, stderr_sink)
        async with self.admission.admit(tenant.name, tenant.admission_limits):
            run, response, outcome = await self.guest_threads.run(job, long=prepared.last_run_long)
        prepared.last_run_long = run.slept or run.cpu_s >= LONG_JOB_S
        if run.stderr:
            _log_stderr(tenant.name, request.request_id, run)
        return run, response, outcome


def _run_and_respond(
    run_guest: Callable[[], GuestRun],
    policy: Policy,
    stderr_sink: Callable[[bytes], None] | None = None,
) -> tuple[GuestRun, Response, Outcome]:
    """A guest thread's job: the run, then its response. Parsing the output grows with it
    (up to the policy's header bounds), and a stderr sink writes files, so neither runs on
    the event loop."""
    run = run_guest()
    response, outcome = respond(run, policy)
    if stderr_sink is not None and run.stderr:
        stderr_sink(run.stderr)
    return run, response, outcome


def respond(run: GuestRun, policy: Policy) -> tuple[Response, Outcome]:
    """The response to a finished guest run: its CGI output, or the error it ended in.

    A bad output comes back as its error response, not raised: this ends a guest's job."""
    if run.error is not None:
        # Not raised: its traceback would hold this frame, hence `run` and its whole stdout,
        # in a cycle (run -> error -> frame -> run) that only the cyclic GC frees.
        return error_response(run.error), run.error.outcome
    try:
        output = wagi.parse_output(
            run.stdout,
            max_headers=policy.max_response_headers,
            max_header_bytes=policy.max_response_header_bytes,
        )
        if output.status < 200:
            raise GuestBadOutput(f"guest sent an informational status {output.status}")
    except SupervisorError as error:
        return error_response(error), error.outcome
    return Response(output.status, output.headers, output.body, output.reason), Outcome.OK


def error_response(error: SupervisorError) -> Response:
    """The one response of an error: its status and its client-safe message."""
    headers = list(_TEXT)
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    return Response(error.status, headers, error.message.encode() + b"\n")


def host_name(host: str) -> str:
    """`Host` without its port, lower-cased; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


def _log_stderr(tenant: str, request_id: str, run: GuestRun) -> None:
    """One log line for the guest's stderr, whatever it holds: a guest must not be able to
    write a line of its own (a forged access-log line for another tenant, say)."""
    text = _escape_controls(run.stderr[:_STDERR_LOG_LIMIT].decode("utf-8", errors="replace"))
    more = len(run.stderr) - _STDERR_LOG_LIMIT
    if more > 0 or run.stderr_truncated:
        text += f" [... {max(more, 0)} more bytes{', capped' if run.stderr_truncated else ''}]"
    guest_log.info(
        "%s %s stderr: %s",
        request_id,
        tenant,
        text,
        extra={"request_id": request_id, "tenant": tenant},
    )


def _escape_controls(text: str) -> str:
    """`text` with every `_LOG_UNSAFE` character escaped as Python would (`\\n`, `\\x1b`)."""
    return _LOG_UNSAFE.sub(_python_escape, text)


def _python_escape(match: re.Match[str]) -> str:
    return ascii(match.group())[1:-1]
