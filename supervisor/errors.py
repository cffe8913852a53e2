"""Every error that can end a request, each knowing its HTTP status and metric outcome.

The hierarchy is translated into a response once, at the gateway boundary:

    SupervisorError                 status, outcome, message (safe to show a client)
    ├── ClientError                 the HTTP client is at fault (4xx)
    │   ├── NotFound                404 unknown tenant / no route
    │   ├── BodyTooLarge            413
    │   ├── HeadTooLarge            431
    │   ├── RequestTimeout          408 body (or head) not received in time
    │   ├── BadRequest              400 malformed HTTP, or an invalid admin API parameter
    │   ├── Unauthorized            401 admin API: no bearer token, or an unknown one
    │   ├── Forbidden               403 admin API: a valid token for another tenant
    │   ├── MethodNotAllowed        405 admin API: the path exists, the method does not
    │   └── Conflict                409 admin API: the change contradicts the stored state
    ├── Rejected                    admission said no (429 tenant / 503 pod), with Retry-After
    ├── ModuleLoading               503 + Retry-After: the route's module did not load in time
    ├── ModuleUnavailable           503 + Retry-After: the route's module could not be loaded
    ├── GuestError                  the guest misbehaved (5xx)
    │   ├── GuestTrap               500 trap, proc_exit(n != 0), missing entrypoint
    │   ├── GuestMemoryExhausted    500, classified as `memory`
    │   ├── GuestFuelExhausted      503 without Retry-After: retrying won't help
    │   ├── GuestTimeout            504 wall-clock deadline
    │   ├── GuestOutputTooLarge     502 stdout over max_response_bytes
    │   └── GuestBadOutput          500/502 output that is not valid CGI
    ├── ModuleRejected              422 a module that cannot be served (named reason)
    ├── InsufficientStorage         507 admin API: the disk (or quota) is full, nothing written
    └── ConfigError                 a policy, modules.toml or manifest.json that failed validation
        └── RouteConflict           409 two sources (modules.toml, named modules) claim a route

Anything else raised while serving a request is a bug and answers 500 `internal`.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """The metric and log label of a finished request: one value per row of DESIGN.md."""

    OK = "ok"
    TRAP = "trap"
    FUEL = "fuel"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_LIMIT = "output_limit"
    BAD_OUTPUT = "bad_output"
    REJECTED = "rejected"
    LOADING = "loading"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"
    CLIENT_ERROR = "client_error"
    INTERNAL = "internal"


class SupervisorError(Exception):
    """Base class. `message` is what the client sees; it never holds guest memory or secrets."""

    status: int = 500
    outcome: Outcome = Outcome.INTERNAL
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class ClientError(SupervisorError):
    status = 400
    outcome = Outcome.CLIENT_ERROR


class BadRequest(ClientError):
    status = 400


class NotFound(ClientError):
    status = 404
    outcome = Outcome.NOT_FOUND


class BodyTooLarge(ClientError):
    status = 413


class HeadTooLarge(ClientError):
    status = 431


class RequestTimeout(ClientError):
    status = 408


class Unauthorized(ClientError):
    """No bearer token, or one that matches no credential (the answer carries a challenge)."""

    status = 401


class Forbidden(ClientError):
    """A valid token asking for another tenant's resources."""

    status = 403


class MethodNotAllowed(ClientError):
    """The admin path exists but not with this method; `allow` lists the ones it has."""

    status = 405

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


class Conflict(ClientError):
    """The request contradicts the stored state: over `max_modules`, no version to roll back."""

    status = 409


class Rejected(SupervisorError):
    """Admission refused the request; the client may retry after `retry_after` seconds."""

    status = 429
    outcome = Outcome.REJECTED

    def __init__(self, message: str, *, status: int, reason: str, retry_after: int) -> None:
        super().__init__(message, status=status)
        self.reason = reason
        self.retry_after = retry_after


class ModuleLoading(SupervisorError):
    """The route's module is loading (first request after start or eviction) and did not
    finish within the request's deadline; the load goes on, so a retry finds it loaded."""

    status = 503
    outcome = Outcome.LOADING

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModuleUnavailable(SupervisorError):
    """The route's module could not be loaded (its file or artifact unreadable, its compile
    refused): the reason is in the server log; the next request tries again."""

    status = 503
    outcome = Outcome.UNAVAILABLE

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GuestError(SupervisorError):
    status = 500
    outcome = Outcome.TRAP


class GuestTrap(GuestError):
    status = 500
    outcome = Outcome.TRAP


class GuestMemoryExhausted(GuestError):
    status = 500
    outcome = Outcome.MEMORY


class GuestFuelExhausted(GuestError):
    status = 503
    outcome = Outcome.FUEL


class GuestTimeout(GuestError):
    status = 504
    outcome = Outcome.TIMEOUT


class GuestOutputTooLarge(GuestError):
    status = 502
    outcome = Outcome.OUTPUT_LIMIT


class GuestBadOutput(GuestError):
    """stdout is not valid CGI: 500 when headers are missing, 502 when they are invalid."""

    status = 502
    outcome = Outcome.BAD_OUTPUT


class ModuleRejected(ClientError):
    """A module we refuse to load or accept: not WebAssembly, bad imports, no entrypoint..."""

    status = 422


class InsufficientStorage(SupervisorError):
    """A write of the admin API found the disk or the quota full (ENOSPC, EDQUOT).

    Nothing was half-written (files are written whole, then renamed); retrying once space is
    freed succeeds. The server's fault, not the client's: outcome `internal`.
    """

    status = 507


class ConfigError(SupervisorError):
    """A configuration file failed validation; the message names the file, the key and why."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


class RouteConflict(ConfigError):
    """A route claimed by two owners (modules.toml and a named module, or two named modules).

    At load time it keeps the tenant's last good state; at upload it refuses the upload (409).
    """

    status = 409
