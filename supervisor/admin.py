"""The admin API: tenants upload and manage their modules over HTTP, under `/_admin/v1/`.

Knative exposes one port, so the API shares the serving port; the gateway hands it every path
under `/_admin/` before it looks for a tenant (a tenant name can't start with `_`).

    GET    /_admin/v1/openapi.json                          the document of this API
    GET    /_admin/v1/tenants/{tenant}                      policy in force and usage
    GET    /_admin/v1/tenants/{tenant}/modules              the named modules
    PUT    /_admin/v1/tenants/{tenant}/modules/{name}       upload (body: wasm or WAT)
    GET    /_admin/v1/tenants/{tenant}/modules/{name}
    DELETE /_admin/v1/tenants/{tenant}/modules/{name}       kept as a tombstone
    POST   /_admin/v1/tenants/{tenant}/modules/{name}/rollback

An upload is refused as early as each problem can be seen, cheapest first: the token and the
parameters before a byte of the body is read (so a refused client never sends it); the size
while the body streams (`RequestBody.read` stops at `max_module_bytes`); the binary's header,
imports, initial memory and entrypoint before compiling (microseconds, even for 100 MB);
then the compile, in a child process with the tenant's compile limits (compiler.py), waited
on from a worker thread under its own `CapacityLimiter`, so uploads never take the threads
that run guests; then the module's `_routes`, once, whose result the manifest stores
(declared_routes.py). The artifact goes to the compiled-artifact cache, so the reload
that follows, and every restart after it, loads the module in milliseconds.

Every change to a tenant's manifest is one transaction: a `trio.Lock` per tenant in this
process, then the store's compare-and-set (store/uploads.py: the `flock` of a file store, the
KV revision of NATS): read the manifest, change it, build the tenant with it as a dry run (the
registry's own loader: what passes loads), write it if nobody wrote since (else apply the
change again to what they wrote), and reload the registry so the next request on this pod
serves the change. Other pods see it through the store's watch (or their next poll of the
folder). A store that cannot be reached answers 503 with Retry-After, and nothing was
acknowledged.

Errors are JSON `{"error": message, "status": code}`, the message naming the problem.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio

from . import store
from .admission import Admission
from .auth import CHALLENGE, Authenticator
from .compiler import CompileLimits
from .errors import (
    BadRequest,
    ConfigError,
    Conflict,
    InsufficientStorage,
    MethodNotAllowed,
    ModuleRejected,
    NotFound,
    Rejected,
    RouteConflict,
    SupervisorError,
    Unauthorized,
)
from .modules import to_binary
from .outbound.rules import PatternError, check_entry
from .policies import is_valid_tenant_name, parse_volumes
from .routing import RouteError, validate_pattern
from .server import Request, RequestBody, Response
from .tenants import DEFAULT_ENTRYPOINT, Tenant, TenantRegistry, check_module_binary
from .wasm_binary import inspect

__all__ = ["ADMIN_PREFIX", "API_PREFIX", "DEFAULT_COMPILE_THREADS", "AdminApi", "TenantUsage"]

log = logging.getLogger("supervisor.admin")

ADMIN_PREFIX = "/_admin/"
API_PREFIX = "/_admin/v1"

DEFAULT_COMPILE_THREADS = 1
"""Uploads compiled at once. Each compile child takes one core (parallel compilation off,
compiler.py) and up to its tenant's `compile_memory_bytes` (a 100 MB runtime peaks over 2 GB):
a second one at once would take the other core of a small pod."""

MAX_UPLOADS_IN_PROGRESS = 8
"""Uploads between their first body byte and their answer. Each holds its body in memory (up
to its tenant's `max_module_bytes`) while it waits to compile; past this, 503 + Retry-After."""
UPLOAD_RETRY_AFTER_S = 5
"""A compile takes seconds: a busy upload queue is worth retrying a few seconds later."""

_JSON = (b"content-type", b"application/json")
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""Write errors that mean "no space", answered 507 (RFC 4918 §11.5), not a 500 traceback."""
_QUERY_KEYS = frozenset(
    {"route", "entrypoint", "argv", "volume", "allowed_host", "http_max_concurrency"}
)
_MAX_ENTRYPOINT_CHARS = 256
"""An export name longer than this is a mistake; it also bounds what an error message echoes."""
_MAX_HTTP_CONCURRENCY = 2**32 - 1
"""WAGI's `http_max_concurrency` is a u32; the tenant policy's caps bound it further."""


@dataclass(slots=True)
class TenantUsage:
    """Requests and fuel of one tenant in this process since it started (the gateway counts)."""

    requests: int = 0
    fuel_used: int = 0


@dataclass(frozen=True, slots=True)
class _Call:
    """One admin request, parsed: which tenant and module it is about ("" when none)."""

    request: Request
    body: RequestBody
    tenant: str
    name: str


@dataclass(frozen=True, slots=True)
class _Endpoint:
    pattern: re.Pattern[str]
    methods: Mapping[str, Callable[[AdminApi, _Call], Awaitable[Response]]]
    public: bool = False  # answered without a token


class AdminApi:
    """The admin API's request handler (a `server.Handler` for paths under `ADMIN_PREFIX`)."""

    def __init__(
        self,
        registry: TenantRegistry,
        admission: Admission,
        authenticator: Authenticator,
        usage: Mapping[str, TenantUsage],
        *,
        compile_threads: int = DEFAULT_COMPILE_THREADS,
    ) -> None:
        self.registry = registry
        self.admission = admission
        self.authenticator = authenticator
        self.usage = usage
        self.compile_limiter = trio.CapacityLimiter(compile_threads)
        self.uploads_in_progress = 0
        self._locks: dict[str, trio.Lock] = {}
        self._openapi_document = resources.files(__package__).joinpath("openapi.json").read_bytes()

    async def handle(self, request: Request, body: RequestBody) -> Response:
        started = time.perf_counter()
        principal = None
        try:
            endpoint, match = _find_endpoint(request.path)
            method = "GET" if request.method == "HEAD" else request.method
            handler = endpoint.methods.get(method)
            if handler is None:
                allow = tuple(endpoint.methods)
                raise MethodNotAllowed(f"{request.method} is not allowed here", allow=allow)
            params = {key: urllib.parse.unquote(value) for key, value in match.groupdict().items()}
            if not endpoint.public:
                principal = self.authenticator.authenticate(_header(request, "authorization"))
                self.authenticator.authorize(principal, params["tenant"])
            call = _Call(request, body, params.get("tenant", ""), params.get("name", ""))
            response = await handler(self, call)
        except SupervisorError as error:
            response = _error_response(error)
        log.info(
            "%s admin %s %s %d %.1fms %s",
            request.request_id,
            request.method,
            request.path,
            response.status,
            (time.perf_counter() - started) * 1000,
            principal or "-",
            extra={
                "request_id": request.request_id,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "principal": str(principal or "-"),
            },
        )
        return response

    # Endpoints.

    async def _openapi(self, call: _Call) -> Response:
        return Response(200, [_JSON], self._openapi_document)

    async def _get_tenant(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        manifest = await self._read_manifest(call.tenant)
        running = self.admission.tenant_statistics(call.tenant)
        usage = self.usage.get(call.tenant) or TenantUsage()
        error = self.registry.state.errors.get(call.tenant)
        document = {
            "name": tenant.name,
            "policy": tenant.policy.to_dict(),
            "usage": {
                "in_flight": running.running,
                "waiting": running.waiting,
                "requests": usage.requests,
                "fuel_used": usage.fuel_used,
                "modules": len(manifest.modules),
                "routes": len(tenant.routes),
            },
            "load_error": self._client_message(call.tenant, error) if error else None,
        }
        return _json(200, document)

    async def _list_modules(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        manifest = await self._read_manifest(call.tenant)
        modules = [
            _record_json(name, record, tenant) for name, record in sorted(manifest.modules.items())
        ]
        return _json(200, {"modules": modules})

    async def _get_module(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        _check_name(call.name)
        record = (await self._read_manifest(call.tenant)).modules.get(call.name)
        if record is None:
            raise NotFound(f"tenant {call.tenant!r} has no module {call.name!r}")
        return _json(200, _record_json(call.name, record, tenant))

    async def _put_module(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        policy = tenant.policy
        _check_name(call.name)
        known = await self._read_manifest(call.tenant)
        existing = known.modules.get(call.name)
        settings = _upload_settings(call.request.query, existing)
        # Refusals that need no body come first: the client never sends it.
        _check_route_free(tenant, settings.route, call.name)
        if existing is None and len(known.modules) >= policy.max_modules:
            raise Conflict(_over_max_modules(call.tenant, policy.max_modules))
        if self.uploads_in_progress >= MAX_UPLOADS_IN_PROGRESS:
            raise Rejected(
                f"{MAX_UPLOADS_IN_PROGRESS} uploads are in progress; retry later",
                status=503,
                reason="uploads_busy",
                retry_after=UPLOAD_RETRY_AFTER_S,
            )
        self.uploads_in_progress += 1
        try:
            return await self._receive_module(call, tenant, settings)
        finally:
            self.uploads_in_progress -= 1

    async def _receive_module(
        self, call: _Call, tenant: Tenant, settings: store.ModuleVersion
    ) -> Response:
        """Read, check, compile and commit an upload whose parameters passed."""
        policy = tenant.policy
        source = await call.body.read(policy.max_module_bytes)
        binary = await trio.to_thread.run_sync(
            functools.partial(
                _checked_binary,
                source,
                name=call.name,
                entrypoint=settings.entrypoint,
                memory_limit=policy.memory_bytes,
            )
        )
        compiled = await trio.to_thread.run_sync(
            functools.partial(
                self.registry.cache.load,
                binary,
                name=call.name,
                limits=CompileLimits.of(policy),
            ),
            limiter=self.compile_limiter,
        )
        # `_routes` runs here, once per version, and its result is stored with it: no load,
        # in any worker or pod, runs guest code (the tenant's own upload waits for it).
        declared = await trio.to_thread.run_sync(
            functools.partial(self.registry.declare_routes, compiled, policy, name=call.name)
        )
        version = dataclasses.replace(
            settings,
            sha256=compiled.sha256,
            size=len(binary),
            uploaded_at=store.utc_now(),
            compile_s=round(compiled.compile_s, 6),
            declared_routes=declared.routes,
            unknown={},  # keys of another revision describe the version they came with
        )

        def change(manifest: store.Manifest) -> store.Manifest | None:
            current = manifest.modules.get(call.name)
            if current is not None and current.current.serves_like(version):
                return None  # the same upload again: no new version, history kept
            if current is None and len(manifest.modules) >= policy.max_modules:
                raise Conflict(_over_max_modules(call.tenant, policy.max_modules))
            before = current or manifest.deleted.get(call.name)
            self.registry.uploads.put_module(call.tenant, binary)
            previous = before.current if before is not None else None
            return manifest.with_module(call.name, store.ModuleRecord(version, previous))

        manifest, changed = await self._transaction(call.tenant, change)
        record = _record_json(call.name, manifest.modules[call.name], self._tenant(call.tenant))
        location = f"{API_PREFIX}/tenants/{call.tenant}/modules/{call.name}".encode()
        return _json(201 if changed else 200, record, [(b"location", location)])

    async def _delete_module(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        _check_name(call.name)
        keep = tenant.policy.max_modules

        def change(manifest: store.Manifest) -> store.Manifest:
            if call.name not in manifest.modules:
                raise NotFound(f"tenant {call.tenant!r} has no module {call.name!r}")
            return manifest.without_module(call.name, keep_deleted=keep)

        manifest, _ = await self._transaction(call.tenant, change)
        return _json(200, _record_json(call.name, manifest.deleted[call.name], None))

    async def _rollback(self, call: _Call) -> Response:
        tenant = self._tenant(call.tenant)
        _check_name(call.name)
        max_modules = tenant.policy.max_modules

        def change(manifest: store.Manifest) -> store.Manifest:
            record = manifest.modules.get(call.name)
            if record is not None:
                if record.previous is None:
                    raise Conflict(f"module {call.name!r} has no previous version")
                restored = store.ModuleRecord(record.previous, record.current)
                return manifest.with_module(call.name, restored)
            deleted = manifest.deleted.get(call.name)
            if deleted is None:
                raise NotFound(f"tenant {call.tenant!r} has no module {call.name!r}")
            if len(manifest.modules) >= max_modules:
                raise Conflict(_over_max_modules(call.tenant, max_modules))
            return manifest.with_module(call.name, deleted)

        manifest, _ = await self._transaction(call.tenant, change)
        record = manifest.modules[call.name]
        return _json(200, _record_json(call.name, record, self._tenant(call.tenant)))

    # Helpers.

    def _tenant(self, name: str) -> Tenant:
        tenant = self.registry.state.tenants.get(name) if is_valid_tenant_name(name) else None
        if tenant is None:
            raise NotFound(f"no tenant {name!r}")
        return tenant

    async def _read_manifest(self, tenant: str) -> store.Manifest:
        try:
            stored = await trio.to_thread.run_sync(self.registry.uploads.read, tenant)
            return stored.manifest
        except ConfigError as exc:
            log.error("tenant %s: %s", tenant, exc.message)
            raise SupervisorError(
                "the tenant's manifest is unreadable; see the server log"
            ) from exc

    async def _transaction(
        self,
        tenant: str,
        change: Callable[[store.Manifest], store.Manifest | None],
    ) -> tuple[store.Manifest, bool]:
        """Apply `change` to the tenant's manifest under both locks; then reload.

        `change` gets the manifest as stored now and returns the new one, or None for no
        change. Returns the manifest in force and whether it changed.
        """
        lock = self._locks.setdefault(tenant, trio.Lock())
        async with lock:
            manifest, changed = await trio.to_thread.run_sync(self._apply, tenant, change)
        if changed:
            if self.registry.changes is not None:
                self.registry.changes.bump()  # the pod's other workers reload on their next request
            state = await trio.to_thread.run_sync(self.registry.reload)
            if tenant in state.errors:
                log.error("tenant %s did not load its new manifest: %s", tenant, state.errors)
        return manifest, changed

    def _apply(
        self,
        tenant: str,
        change: Callable[[store.Manifest], store.Manifest | None],
    ) -> tuple[store.Manifest, bool]:
        """The store's compare-and-set around `change` and the dry run (blocking: runs in a
        worker thread)."""

        def checked(manifest: store.Manifest) -> store.Manifest | None:
            new = change(manifest)
            if new is None:
                return None
            try:
                self.registry.build_tenant(tenant, new)
            except RouteConflict as exc:
                raise Conflict(self._client_message(tenant, exc.message)) from exc
            except ConfigError as exc:
                raise ModuleRejected(self._client_message(tenant, exc.message)) from exc
            return new

        try:
            return self.registry.uploads.update(tenant, checked)
        except ConfigError as exc:
            log.error("tenant %s: %s", tenant, exc.message)
            raise SupervisorError("the tenant's manifest is unreadable") from exc
        except OSError as exc:
            if exc.errno not in _DISK_FULL_ERRNOS:
                raise
            log.error("tenant %s: admin write failed: %s", tenant, exc)
            raise InsufficientStorage(
                "the server's disk is full: nothing was changed; retry once space is freed"
            ) from exc

    def _client_message(self, tenant: str, message: str) -> str:
        """`message` without the server's own paths (a tenant sees its files by name only)."""
        folder = str(self.registry.tenants_dir / tenant)
        uploads = str(self.registry.uploads.manifest_dir(tenant))
        message = message.replace(uploads + "/", "").replace(uploads, "the tenant's folder")
        return message.replace(folder + "/", "").replace(folder, "the tenant's folder")


_TENANT = r"(?P<tenant>[^/]+)"
_NAME = r"(?P<name>[^/]+)"
_MODULE = f"/tenants/{_TENANT}/modules/{_NAME}"
_ENDPOINTS = tuple(
    _Endpoint(re.compile(API_PREFIX + path), methods, public)
    for path, methods, public in (
        ("/openapi.json", {"GET": AdminApi._openapi}, True),
        (f"/tenants/{_TENANT}", {"GET": AdminApi._get_tenant}, False),
        (f"/tenants/{_TENANT}/modules", {"GET": AdminApi._list_modules}, False),
        (
            _MODULE,
            {
                "GET": AdminApi._get_module,
                "PUT": AdminApi._put_module,
                "DELETE": AdminApi._delete_module,
            },
            False,
        ),
        (f"{_MODULE}/rollback", {"POST": AdminApi._rollback}, False),
    )
)


def _find_endpoint(path: str) -> tuple[_Endpoint, re.Match[str]]:
    for endpoint in _ENDPOINTS:
        match = endpoint.pattern.fullmatch(path)
        if match is not None:
            return endpoint, match
    raise NotFound(f"no admin endpoint at {path!r}")


def _header(request: Request, name: str) -> str | None:
    value = None
    for key, item in request.headers:
        if key == name:
            value = item
    return value


def _check_name(name: str) -> None:
    if not store.MODULE_NAME_RE.fullmatch(name):
        raise BadRequest(
            f"invalid module name {name[:80]!r}: 1 to 64 of a-z 0-9 . _ -, starting with a"
            " letter or digit"
        )


def _upload_settings(query: str, existing: store.ModuleRecord | None) -> store.ModuleVersion:
    """How the upload is served, from its query; with no query, as the version it replaces.

    The returned version's content fields (sha256, size, uploaded_at, compile_s) are
    placeholders.
    """
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"malformed query string: {exc}") from exc
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise BadRequest(
                f"unknown query parameter {key[:80]!r} (known: {', '.join(sorted(_QUERY_KEYS))})"
            )
        values.setdefault(key, []).append(value)
    for key in ("route", "entrypoint", "argv", "http_max_concurrency"):
        if len(values.get(key, ())) > 1:
            raise BadRequest(f"query parameter {key!r} given more than once")
    if not values and existing is not None:
        return existing.current
    route = values.get("route", [None])[0]
    if route is None:
        raise BadRequest("query parameter 'route' is required for a new module (?route=/path)")
    try:
        validate_pattern(route)
    except RouteError as exc:
        raise BadRequest(str(exc)) from exc
    entrypoint = values.get("entrypoint", [DEFAULT_ENTRYPOINT])[0]
    if not entrypoint or len(entrypoint) > _MAX_ENTRYPOINT_CHARS:
        raise BadRequest(f"entrypoint must be 1 to {_MAX_ENTRYPOINT_CHARS} characters")
    argv = values.get("argv", [None])[0]
    if argv is not None and not argv.split():
        raise BadRequest("argv must not be empty (leave it out for the default argv)")
    volumes: dict[str, str] = {}
    for item in values.get("volume", []):
        guest, equals, folder = item.partition("=")
        if not equals:
            raise BadRequest(f"volume {item[:80]!r} must be GUEST_PATH=FOLDER, as /static=static")
        if guest in volumes:
            raise BadRequest(f"volume {guest[:80]!r} given more than once")
        volumes[guest] = folder
    try:
        volumes = parse_volumes("query parameter", volumes)
    except ConfigError as exc:
        raise BadRequest(exc.message) from exc
    allowed_hosts = values.get("allowed_host")
    for pattern in allowed_hosts or ():
        try:
            check_entry(pattern)
        except PatternError as exc:
            raise BadRequest(f"allowed_host {pattern[:80]!r}: {exc}") from None
    http_max_concurrency = values.get("http_max_concurrency", [None])[0]
    if http_max_concurrency is not None:
        http_max_concurrency = _parse_http_max_concurrency(http_max_concurrency)
    return store.ModuleVersion(
        sha256="",
        size=0,
        route=route,
        entrypoint=entrypoint,
        argv=argv,
        volumes=volumes,
        uploaded_at="",
        compile_s=0.0,
        allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts),
        http_max_concurrency=http_max_concurrency,
    )


def _parse_http_max_concurrency(text: str) -> int:
    """The upload's `http_max_concurrency=`: decimal digits, 1 to `_MAX_HTTP_CONCURRENCY`."""
    value = int(text) if re.fullmatch(r"[0-9]{1,10}", text) else 0
    if not 1 <= value <= _MAX_HTTP_CONCURRENCY:
        raise BadRequest(
            f"http_max_concurrency must be an integer from 1 to {_MAX_HTTP_CONCURRENCY},"
            f" got {text[:80]!r}"
        )
    return value


def _check_route_free(tenant: Tenant, pattern: str, name: str) -> None:
    """Refuse a route another owner serves now (the dry run checks again, under the lock)."""
    for route in tenant.routes.routes:
        owner = route.target.owner
        if route.pattern == pattern and owner != name:
            other = "modules.toml" if owner is None else f"module {owner!r}"
            raise Conflict(f"route {pattern!r} is already served by {other}")


def _checked_binary(source: bytes, *, name: str, entrypoint: str, memory_limit: int) -> bytes:
    """The module's binary, refused before compiling when it could never run here."""
    # WAT may open with comments, which `to_binary` only looks past in a `.wat` file.
    is_text = source.lstrip()[:1] == b"(" or source.lstrip()[:2] == b";;"
    binary = to_binary(source, name=f"{name}.wat" if is_text else name)
    check_module_binary(binary, name=name, memory_limit=memory_limit)
    export = inspect(binary).export(entrypoint)
    if export is None or export.kind != "func":
        raise ModuleRejected(f"{name}: exports no function {entrypoint!r} (the entrypoint)")
    if export.params or export.results:
        raise ModuleRejected(
            f"{name}: entrypoint {entrypoint!r} must take no parameters and return nothing"
        )
    return binary


def _over_max_modules(tenant: str, max_modules: int) -> str:
    return f"tenant {tenant!r} already has max_modules ({max_modules}) modules"


def _record_json(name: str, record: store.ModuleRecord, tenant: Tenant | None) -> dict[str, Any]:
    """A named module as the API shows it: its record, and the routes this server serves."""
    document = {"name": name, **record.to_dict()}
    served = []
    if tenant is not None:
        served = [
            route.pattern
            for route in tenant.routes.routes
            if route.target.owner == name and route.target.sha256 == record.current.sha256
        ]
    document["routes"] = served or [record.current.route]
    return document


def _json(
    status: int, document: object, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    body = json.dumps(document, indent=1).encode() + b"\n"
    return Response(status, [_JSON, *(headers or [])], body)


def _error_response(error: SupervisorError) -> Response:
    headers = []
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", CHALLENGE.encode()))
    elif isinstance(error, MethodNotAllowed):
        headers.append((b"allow", ", ".join(error.allow).encode()))
    elif isinstance(error, Rejected):
        headers.append((b"retry-after", str(error.retry_after).encode()))
    return _json(error.status, {"error": error.message, "status": error.status}, headers)
