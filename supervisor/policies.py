"""Tenant policies: the schema, the built-in defaults, and loading a policy folder.

A policy is what the operator allows one tenant: its host names, its guest environment and
volumes, its limits and its admin credential. The schema is strict, because a policy that
swallows a typo (`timout_ms`) silently runs the tenant on a limit nobody chose: every unknown
key, wrong type or out-of-range value is a `ConfigError` naming the file, the key and why.

This module only parses and validates. Hot reload and "keep the last good policy" belong to
the tenant registry, which calls `load_policy_dir` (cheap, deterministic) on every change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from supervisor.errors import ConfigError
from supervisor.outbound.rules import PatternError, check_entry

__all__ = [
    "DEFAULTS_FILE",
    "DEFAULT_POLICY",
    "RESERVED_TENANT_NAMES",
    "TENANT_NAME_RE",
    "Policy",
    "PolicySet",
    "is_valid_tenant_name",
    "load_policy_dir",
    "load_policy_file",
    "parse_policy",
    "parse_size",
    "parse_volumes",
    "read_toml",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# A DNS label (RFC 1123): a tenant name is usable as a host-name label and as a path segment,
# and it can never start with "_" or ".", so reserved top-level paths never collide with it.
TENANT_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# Valid DNS labels that are top-level paths of the server: a tenant of that name could never be
# reached by path (WAGI.md: `/healthz` answers 200 and can't be overridden).
RESERVED_TENANT_NAMES = frozenset({"healthz"})

# The folder-wide defaults; every other `<tenant>.toml` in the folder is one tenant's policy.
DEFAULTS_FILE = "_defaults.toml"

# RFC 1035: a host name is at most 253 characters in its textual form.
MAX_HOST_NAME_LENGTH = 253

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
# TOML's bare keys: a key shown in an error is quoted unless it could be written bare.
_TOML_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# At most 20 digits: anything longer is beyond every range below and not worth int() parsing.
_SIZE_RE = re.compile(r"(?P<number>[0-9]{1,20}) ?(?P<unit>[A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
}
_SIZE_UNIT_NAMES = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
# Values echoed in error messages are cut here: a message is one readable log line.
_MAX_SHOWN_CHARS = 60


@dataclass(frozen=True, slots=True)
class _Limit:
    """The accepted range of one integer knob; `size` knobs also take "64MiB"-style strings."""

    minimum: int
    maximum: int
    size: bool = False

    def show(self, number: int) -> str:
        return _format_size(number) if self.size else f"{number:_}"


# Every limit knob and its range, with the reason for each bound.
_LIMITS: Mapping[str, _Limit] = MappingProxyType(
    {
        # 1e13 units is hours of CPU: a larger budget is a typo, not a plan.
        "fuel_per_request": _Limit(1, 10**13),
        # One wasm page (64KiB) up to the whole wasm32 address space (4GiB).
        "memory_bytes": _Limit(64 * KiB, 4 * GiB, size=True),
        # Up to 10 minutes: Knative's default max-revision-timeout-seconds (600).
        "timeout_ms": _Limit(1, 600_000),
        # Far beyond any pod's execution slots; larger is a typo.
        "max_concurrency": _Limit(1, 10_000),
        # 0 = never queue; waiting requests cost memory, so the queue is bounded too.
        "max_queue": _Limit(0, 100_000),
        # 0 = don't wait for a slot; at most the same 10 minutes as a request.
        "queue_timeout_ms": _Limit(0, 600_000),
        # 0 = no request body; the body is held in memory, hence 1GiB at most.
        "max_request_bytes": _Limit(0, 1 * GiB, size=True),
        # At least 1KiB so a CGI header block fits; held in memory, hence 1GiB at most.
        "max_response_bytes": _Limit(1 * KiB, 1 * GiB, size=True),
        # The smallest useful module is bytes, a language runtime ~100MiB; 4GiB is wasm32's cap.
        "max_module_bytes": _Limit(1 * KiB, 4 * GiB, size=True),
        "max_modules": _Limit(1, 100_000),
        # Guest stderr kept per request (the tenant's log); held in memory while the guest runs.
        "max_stderr_bytes": _Limit(0, 16 * MiB, size=True),
        # CGI response headers: parsing and encoding them grows with their number and size.
        "max_response_headers": _Limit(1, 10_000),
        "max_response_header_bytes": _Limit(1 * KiB, 16 * MiB, size=True),
        # Subscriptions in one poll_oneoff call: each is host work done while holding the GIL.
        "max_poll_subscriptions": _Limit(1, 4096),
        # Routes a module may declare (its own plus `_routes`), and a tenant may hold in all:
        # every worker keeps them in memory.
        "max_routes_per_module": _Limit(1, 100_000),
        "max_routes": _Limit(1, 1_000_000),
        # `_routes` output read per module version.
        "max_routes_output_bytes": _Limit(1 * KiB, 16 * MiB, size=True),
        # Compile time and memory grow with the functions and code of a module.
        "max_module_functions": _Limit(1, 10_000_000),
        "max_code_bytes": _Limit(1 * KiB, 4 * GiB, size=True),
        # Address space of the child process that compiles one module (RLIMIT_AS); CPython
        # for WASI needs ~700MiB. And its CPU time: a 99MB runtime compiles in ~70 s.
        "compile_memory_bytes": _Limit(256 * MiB, 64 * GiB, size=True),
        "compile_cpu_seconds": _Limit(1, 3600),
        # Outbound HTTP (wasi_experimental_http): `req` calls per guest request (0: none),
        # response bytes held in host memory per call, and calls in flight per tenant (each
        # holds a pooled connection, hence a descriptor).
        "max_outbound_requests": _Limit(0, 10_000),
        "max_outbound_response_bytes": _Limit(0, 1 * GiB, size=True),
        "max_outbound_concurrency": _Limit(1, 10_000),
        # Bytes of compiled artifacts the tenant's modules in force may take in the cache: an
        # artifact can be 30x its module. 1MiB fits small guests; 64GiB is a node's disk.
        "max_artifact_bytes": _Limit(1 * MiB, 64 * GiB, size=True),
    }
)

_ALL_KEYS = frozenset({"hosts", "env", "volumes", "admin_token_sha256", "outbound_hosts", *_LIMITS})
# Keys that name one tenant: in the defaults file they would hand every tenant the same hosts
# or the same admin credential.
_TENANT_ONLY_KEYS = frozenset({"hosts", "admin_token_sha256"})
_DEFAULTS_KEYS = _ALL_KEYS - _TENANT_ONLY_KEYS


def is_valid_tenant_name(name: str) -> bool:
    """True if `name` is a DNS label and not a reserved top-level path."""
    return TENANT_NAME_RE.fullmatch(name) is not None and name not in RESERVED_TENANT_NAMES


@dataclass(frozen=True, slots=True, repr=False)
class Policy:
    """What one tenant may do. Immutable: a reload builds a new one, requests keep theirs.

    Construct it through `parse_policy`; the constructor only freezes its arguments.
    """

    hosts: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: Mapping[str, str] = field(default_factory=dict)
    fuel_per_request: int = 2_000_000_000
    memory_bytes: int = 64 * MiB
    timeout_ms: int = 2000
    max_concurrency: int = 8
    max_queue: int = 64
    queue_timeout_ms: int = 1000
    max_request_bytes: int = 1 * MiB
    max_response_bytes: int = 8 * MiB
    max_module_bytes: int = 64 * MiB
    max_modules: int = 100
    max_stderr_bytes: int = 64 * KiB
    max_response_headers: int = 128
    max_response_header_bytes: int = 64 * KiB
    max_poll_subscriptions: int = 64
    max_routes_per_module: int = 256
    max_routes: int = 1024
    max_routes_output_bytes: int = 64 * KiB
    max_module_functions: int = 100_000
    max_code_bytes: int = 64 * MiB
    compile_memory_bytes: int = 1 * GiB
    compile_cpu_seconds: int = 300
    outbound_hosts: tuple[str, ...] = ()
    max_outbound_requests: int = 16
    max_outbound_response_bytes: int = 4 * MiB
    max_outbound_concurrency: int = 16
    max_artifact_bytes: int = 512 * MiB
    admin_token_sha256: str | None = None

    def __post_init__(self) -> None:
        # Copy before wrapping: a proxy over the caller's own dict would still change under us.
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "outbound_hosts", tuple(self.outbound_hosts))
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "volumes", MappingProxyType(dict(self.volumes)))

    def __repr__(self) -> str:
        shown: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = dict(value)
            if f.name == "admin_token_sha256" and value is not None:
                shown.append(f"{f.name}=<set>")
            else:
                shown.append(f"{f.name}={value!r}")
        return f"Policy({', '.join(shown)})"

    def to_dict(self) -> dict[str, Any]:
        """The policy in force, JSON-ready; the admin credential shows only whether it is set."""
        return {
            "hosts": list(self.hosts),
            "env": dict(self.env),
            "volumes": dict(self.volumes),
            "outbound_hosts": list(self.outbound_hosts),
            **{name: getattr(self, name) for name in _LIMITS},
            "admin_token_set": self.admin_token_sha256 is not None,
        }


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class PolicySet:
    """One reading of a policy folder: the policies that validated and the files that did not."""

    defaults: Policy
    policies: Mapping[str, Policy]
    errors: Mapping[str, ConfigError]


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "64MiB", "1 MiB" or "1KB" (binary and decimal units)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a size: {_show(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {_show(value)}")
        return value
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(
            f"not a size: {_show(value)}; expected a whole number and a unit, such as"
            f' "64MiB" or "1 MB" (units: {_SIZE_UNIT_NAMES})'
        )
    unit = match["unit"]
    if unit.lower() not in _SIZE_UNITS:
        raise ValueError(
            f"unknown unit {_show(unit)} in {_show(value)} (units: {_SIZE_UNIT_NAMES})"
        )
    return int(match["number"]) * _SIZE_UNITS[unit.lower()]


def parse_policy(data: Mapping, *, source: str, base: Policy = DEFAULT_POLICY) -> Policy:
    """Validate parsed TOML into a `Policy`; keys absent from `data` inherit from `base`.

    `env` and `volumes` merge over `base`'s (an entry of `data` wins). Raises `ConfigError`
    naming `source`, the key and the reason.
    """
    return _parse(data, source=source, base=base, allowed=_ALL_KEYS)


def load_policy_file(path: Path, *, base: Policy = DEFAULT_POLICY) -> Policy:
    """Read and validate one policy file; any failure, TOML syntax included, is a ConfigError."""
    return parse_policy(read_toml(path), source=str(path), base=base)


def load_policy_dir(directory: Path) -> PolicySet:
    """Read `_defaults.toml` and every `<tenant>.toml` of `directory`, in name order.

    A file that fails is an entry of `errors` (by file name), never an exception: one broken
    file must not take the other tenants down. A broken defaults file leaves the built-in
    defaults under the tenants. Hidden files (a Kubernetes ConfigMap mount's `..data`) and
    non-`.toml` files are ignored; symlinks are followed.

    Raises `ConfigError` only when the directory itself can't be listed.
    """
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except OSError as exc:
        raise ConfigError(str(directory), None, f"cannot list: {exc.strerror}") from exc

    errors: dict[str, ConfigError] = {}
    policies: dict[str, Policy] = {}
    defaults = DEFAULT_POLICY
    files = [
        name
        for name in names
        if name.endswith(".toml") and not name.startswith(".") and not (directory / name).is_dir()
    ]
    if DEFAULTS_FILE in files:
        path = directory / DEFAULTS_FILE
        try:
            defaults = _parse(
                read_toml(path), source=str(path), base=DEFAULT_POLICY, allowed=_DEFAULTS_KEYS
            )
        except ConfigError as exc:
            errors[DEFAULTS_FILE] = exc
    for name in files:
        if name == DEFAULTS_FILE:
            continue
        path = directory / name
        tenant = name.removesuffix(".toml")
        try:
            if not is_valid_tenant_name(tenant):
                raise ConfigError(str(path), None, _tenant_name_problem(tenant))
            policies[tenant] = load_policy_file(path, base=defaults)
        except ConfigError as exc:
            errors[name] = exc
    return PolicySet(
        defaults=defaults,
        policies=MappingProxyType(policies),
        errors=MappingProxyType(errors),
    )


def _tenant_name_problem(name: str) -> str:
    if name in RESERVED_TENANT_NAMES:
        return f"{_show(name)} is reserved (a top-level path of the server), not a tenant name"
    return (
        f"{_show(name)} is not a valid tenant name: the file name must be a DNS label"
        ' (lower-case letters, digits and "-", 1 to 63 characters, no "-" at either end)'
    )


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; every failure is a ConfigError naming the file (tenants.py uses it too)."""
    source = str(path)
    if not path.is_file():
        reason = "not a regular file" if path.exists() else "no such file"
        raise ConfigError(source, None, reason)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 (byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from exc


def _parse(data: Mapping, *, source: str, base: Policy, allowed: frozenset[str]) -> Policy:
    if not isinstance(data, Mapping):
        raise ConfigError(source, None, f"must be a table, got {_describe(data)}")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _ALL_KEYS:
            raise ConfigError(source, _show_key(key), _unknown_key_reason(str(key)))
        if key not in allowed:
            raise ConfigError(
                source, key, "names one tenant: set it in the tenant's own file, not the defaults"
            )
        if key in _LIMITS:
            changes[key] = _parse_limit(source, key, value)
        elif key == "hosts":
            changes[key] = _parse_hosts(source, value)
        elif key == "outbound_hosts":
            changes[key] = _parse_outbound_hosts(source, value)
        elif key == "env":
            changes[key] = {**base.env, **_parse_env(source, value)}
        elif key == "volumes":
            changes[key] = {**base.volumes, **parse_volumes(source, value)}
        else:
            changes[key] = _parse_admin_token(source, value)
    return dataclasses.replace(base, **changes)


def _unknown_key_reason(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(_ALL_KEYS), n=1)
    if close:
        return f"unknown key (did you mean {_show(close[0])}?)"
    return f"unknown key (known keys: {', '.join(sorted(_ALL_KEYS))})"


def _parse_limit(source: str, key: str, value: object) -> int:
    limit = _LIMITS[key]
    if limit.size:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(
                source,
                key,
                f'must be a number of bytes or a size like "64MiB", got {_describe(value)}',
            )
        try:
            number = parse_size(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"must be an integer, got {_describe(value)}")
        number = value
    if number < limit.minimum:
        raise ConfigError(
            source, key, f"must be at least {limit.show(limit.minimum)}, got {_show(value)}"
        )
    if number > limit.maximum:
        raise ConfigError(
            source, key, f"must be at most {limit.show(limit.maximum)}, got {_show(value)}"
        )
    return number


def _parse_hosts(source: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(source, "hosts", f"must be an array of strings, got {_describe(value)}")
    hosts: list[str] = []
    for index, item in enumerate(value):
        key = f"hosts[{index}]"
        if not isinstance(item, str):
            raise ConfigError(source, key, f"must be a string, got {_describe(item)}")
        host = item.lower()
        problem = _host_problem(host)
        if problem:
            raise ConfigError(source, key, f"{_show(item)} {problem}")
        if host in hosts:
            raise ConfigError(source, key, f"{_show(item)} is listed twice")
        hosts.append(host)
    return tuple(hosts)


def _parse_outbound_hosts(source: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            source, "outbound_hosts", f"must be an array of strings, got {_describe(value)}"
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(
                source, f"outbound_hosts[{index}]", f"must be a string, got {_describe(item)}"
            )
        try:
            check_entry(item)
        except PatternError as exc:
            raise ConfigError(source, f"outbound_hosts[{index}]", f"{_show(item)}: {exc}") from None
    return tuple(value)


def _host_problem(host: str) -> str | None:
    """Why `host` (lower-cased) can't match a Host header, or None when it can."""
    if any(char in host for char in ":/@"):
        return "must be a bare host name: no scheme, port, path or user"
    name = host.removeprefix("*.")
    if "*" in name:
        return 'may only use "*" as its whole first label, as in "*.example.com"'
    if len(name) > MAX_HOST_NAME_LENGTH:
        return f"is longer than {MAX_HOST_NAME_LENGTH} characters"
    if not all(TENANT_NAME_RE.fullmatch(label) for label in name.split(".")):
        return (
            "is not a host name: dot-separated labels of letters, digits and inner"
            ' "-" (international names in their "xn--" form)'
        )
    return None


def _parse_env(source: str, value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(source, "env", f"must be a table, got {_describe(value)}")
    env: dict[str, str] = {}
    for name, text in value.items():
        key = _show_key(name, table="env")
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise ConfigError(
                source,
                key,
                "not a valid variable name (letters, digits and _, not starting with a digit)",
            )
        if not isinstance(text, str):
            raise ConfigError(source, key, f"must be a string, got {_describe(text)}")
        if "\0" in text:
            raise ConfigError(source, key, "must not contain a NUL character")
        env[name] = text
    return env


def parse_volumes(source: str, value: object) -> dict[str, str]:
    """Guest path -> folder under the tenant's folder (modules.toml entries use it too)."""
    if not isinstance(value, Mapping):
        raise ConfigError(source, "volumes", f"must be a table, got {_describe(value)}")
    volumes: dict[str, str] = {}
    for guest_path, folder in value.items():
        key = _show_key(guest_path, table="volumes")
        if not isinstance(guest_path, str) or not guest_path.startswith("/"):
            raise ConfigError(source, key, "the guest path must be absolute")
        guest = "/" + "/".join(_path_parts(source, key, guest_path))
        if guest in volumes:
            raise ConfigError(source, key, f"the guest path {_show(guest)} is listed twice")
        if not isinstance(folder, str):
            raise ConfigError(source, key, f"must be a string, got {_describe(folder)}")
        if folder.startswith("/"):
            raise ConfigError(
                source, key, "the folder must be relative to the tenant's folder, not absolute"
            )
        parts = _path_parts(source, key, folder)
        if not parts:
            raise ConfigError(source, key, "the folder must be a folder under the tenant's folder")
        volumes[guest] = "/".join(parts)
    return volumes


def _path_parts(source: str, key: str, path: str) -> list[str]:
    """The normalised segments of a path; ".." is refused rather than resolved."""
    if "\0" in path:
        raise ConfigError(source, key, "a path must not contain a NUL character")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ConfigError(source, key, 'a path must not contain ".."')
    return parts


def _parse_admin_token(source: str, value: object) -> str:
    # The value is never echoed: an operator who pasted the token instead of its hash must
    # not find it in the logs.
    key = "admin_token_sha256"
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, got {_toml_type(value)}")
    digest = value.lower()
    if not _SHA256_HEX_RE.fullmatch(digest):
        raise ConfigError(
            source,
            key,
            "must be the sha256 of the admin token as 64 hex characters"
            " (e.g. `printf %s TOKEN | sha256sum`), not the token itself",
        )
    return digest


def _format_size(number: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if number and number % factor == 0:
            return f"{number // factor}{unit}"
    return f"{number}B"


def _show_key(key: object, *, table: str | None = None) -> str:
    """A key as TOML would spell it: bare when it can be, quoted otherwise."""
    text = str(key)
    shown = text if _TOML_BARE_KEY_RE.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    return f"{table}.{shown}" if table else shown


def _show(value: object) -> str:
    """A value as TOML would spell it, cut to one readable line."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:_}"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date/time"
    return type(value).__name__


def _describe(value: object) -> str:
    return f"{_toml_type(value)} ({_show(value)})"
