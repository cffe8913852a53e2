"""`wasm-supervisor wagi`: WAGI 0.8.1's command line, served by the normal app.

A WAGI user keeps their command and their `modules.toml`. The command becomes one tenant,
`wagi`, served at `/` whatever the Host (WAGI has no tenant prefix), in a private folder made
for this run: `tenants/wagi/modules.toml` links to the operator's file, `policies/wagi.toml`
holds WAGI_POLICY (WAGI had no limits), the `-e`/`--env-file` variables, `outbound_hosts` as
the union of the modules' `allowed_hosts` (in WAGI the file's author is the operator: there
is no policy to intersect with), then every key of `--policy FILE` (its `env` added over
`-e`'s). Module and volume paths resolve against the working directory, as in WAGI, outside
any tenant folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import trio

from . import app, policies, server
from .errors import ConfigError
from .tenants import MODULES_FILE, parse_modules_toml

TENANT = "wagi"
DEFAULT_LISTEN = "127.0.0.1:3000"  # WAGI's
DEFAULT_HOSTNAME = "localhost:3000"  # WAGI's, for a request without a Host header
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # serve's text format
STDERR_FILE = "module.stderr"  # WAGI's name for a route's guest stderr under --log-dir
SERVER_LOG_FILE = "wagi.log"  # the process log's copy under --log-dir

log = logging.getLogger("supervisor.wagi")

WAGI_POLICY: Mapping[str, object] = {
    # WAGI had no limits; these let WAGI apps run as before while a runaway guest still ends.
    "timeout_ms": 600_000,  # the longest a request may take anywhere (Knative's maximum)
    "memory_bytes": "4GiB",  # all wasm32 can address
    "fuel_per_request": 10**13,  # hours of CPU: the deadline is what ends a guest
    "max_concurrency": 10_000,
    "max_queue": 100_000,
    "queue_timeout_ms": 600_000,
    "max_request_bytes": "1GiB",
    "max_response_bytes": "1GiB",
    "max_module_bytes": "4GiB",
    "max_stderr_bytes": "16MiB",
}

# WAGI flags this host cannot honour, and what to use instead.
REFUSED_FLAGS: Mapping[str, str] = {
    "bindle": "Bindle is gone: list the modules in a modules.toml (-c), as files or oci: refs",
    "bindle_path": "Bindle is gone: use -c modules.toml",
    "bindle_url": "Bindle is gone: use -c modules.toml",
    "bindle_http_user": "Bindle is gone: use -c modules.toml",
    "bindle_http_password": "Bindle is gone: use -c modules.toml",
    "bindle_insecure": "Bindle is gone: use -c modules.toml",
    "cache": "compiled modules are cached by the host itself: use --module-cache DIR",
}


def add_command(commands: argparse._SubParsersAction) -> None:
    """The `wagi` subcommand with WAGI 0.8.1's flags (wagi_app.rs)."""
    wagi = commands.add_parser("wagi", help="serve a WAGI modules.toml as WAGI 0.8 does")
    wagi.add_argument("-c", "--config", type=Path, help="the modules.toml to serve")
    wagi.add_argument("-l", "--listen", default=DEFAULT_LISTEN, help="IP:PORT")
    wagi.add_argument("--hostname", default=DEFAULT_HOSTNAME, help="host for requests without one")
    wagi.add_argument("-e", "--env", nargs="+", action="extend", default=[], help="K=V ...")
    wagi.add_argument("--env-file", nargs="+", action="extend", default=[], type=Path)
    wagi.add_argument("--module-cache", type=Path, help="compiled modules (default: a temp dir)")
    wagi.add_argument("--log-dir", type=Path, default=os.environ.get("WAGI_LOG_DIR"))
    wagi.add_argument("--tls-cert", type=Path, default=os.environ.get("WAGI_TLS_CERT"))
    wagi.add_argument("--tls-key", type=Path, default=os.environ.get("WAGI_TLS_KEY"))
    wagi.add_argument("--policy", type=Path, help="a policy file: any key it sets wins")
    wagi.add_argument("--log-level", default="info")
    for flags in (
        ("-b", "--bindle"),
        ("--bindle-path",),
        ("--bindle-url",),
        ("--bindle-http-user",),
        ("--bindle-http-password",),
        ("--cache",),
    ):
        wagi.add_argument(*flags, help=argparse.SUPPRESS)
    wagi.add_argument("-k", "--bindle-insecure", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Serve until stopped; 2 with a message for a flag or file that cannot be served."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, force=True)
    private = Path(tempfile.mkdtemp(prefix="wasm-supervisor-wagi-"))
    try:
        config = _app_config(args, private)
        if args.log_dir is not None:
            _log_to(args.log_dir)
        trio.run(app.run, config)
    except (WagiError, ConfigError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return 0


class WagiError(Exception):
    """A flag or file `wagi` cannot serve; the message says what to do instead."""


def _app_config(args: argparse.Namespace, private: Path) -> app.AppConfig:
    for name, instead in REFUSED_FLAGS.items():
        if getattr(args, name):
            raise WagiError(f"--{name.replace('_', '-')} is not supported: {instead}")
    if args.config is None:
        raise WagiError("-c/--config MODULES_TOML is required")
    config_file = args.config.resolve()
    specs = parse_modules_toml(
        policies.read_toml(config_file), source=str(args.config), operator_paths=True
    )
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise WagiError(f"-l/--listen: expected IP:PORT, got {args.listen!r}")
    env = {}
    for env_file in args.env_file:  # in order; -e wins over every file
        env.update(_read_env_file(env_file))
    env.update(_parse_env(args.env, source="-e/--env"))
    allowed = sorted({pattern for spec in specs for pattern in spec.allowed_hosts or ()})
    policy = {**WAGI_POLICY, "outbound_hosts": allowed, "env": env}
    if args.policy is not None:
        operator = policies.read_toml(args.policy)
        if isinstance(operator.get("env"), Mapping):  # added to -e's, not in their place
            operator["env"] = {**env, **operator["env"]}
        policy.update(operator)
    tenant_dir = private / "tenants" / TENANT
    tenant_dir.mkdir(parents=True)
    (tenant_dir / MODULES_FILE).symlink_to(config_file)
    (private / "policies").mkdir()
    (private / "policies" / f"{TENANT}.toml").write_text(_toml(policy))
    if (args.tls_cert is None) != (args.tls_key is None):
        raise WagiError("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_cert is not None:
        server.tls_context(args.tls_cert, args.tls_key)  # ValueError naming the bad file
    return app.AppConfig(
        host=host.strip("[]") or "0.0.0.0",
        port=int(port),
        tenants_dir=private / "tenants",
        policies_dir=private / "policies",
        cache_dir=args.module_cache or private / "module-cache",
        server=server.ServerConfig(tls_cert=args.tls_cert, tls_key=args.tls_key),
        root_tenant=TENANT,
        default_host=args.hostname,
        operator_root=Path.cwd(),
        guest_stderr=None if args.log_dir is None else ModuleStderrFiles(args.log_dir),
    )


def _parse_env(items: list[str], *, source: str) -> dict[str, str]:
    """`K=V` pairs as WAGI reads them: surrounding quotes of the value stripped, `=v` refused."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise WagiError(f"{source}: {item!r} is not NAME=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def _read_env_file(path: Path) -> dict[str, str]:
    """A `.env` file: `NAME=VALUE` lines, `export ` before them allowed; blank lines and `#`
    comments skipped. Spaces around the `=` are dropped: WAGI's own docs show
    `TEST_NAME = "test value"`, which its reader (env-file-reader 0.2) skipped silently."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WagiError(f"--env-file {path}: {exc}") from None
    items = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        items.append(f"{name.strip()}{sep}{value.strip()}")
    return _parse_env(items, source=str(path))


def _toml(table: Mapping[str, object]) -> str:
    """The policy as TOML: scalars and arrays as JSON spells them (valid TOML), tables inline."""
    lines = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            items = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{json.dumps(key)} = {{ {items} }}")
        else:
            lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _log_to(folder: Path) -> None:
    """--log-dir: the process log also goes to DIR/wagi.log (the guests' stderr goes to
    their routes' files, `ModuleStderrFiles`)."""
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / SERVER_LOG_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


class ModuleStderrFiles:
    """--log-dir laid out as WAGI lays it out, so its users find their guests' stderr where
    they looked before: each request's stderr appended, as written, to
    DIR/<hex sha256 of the matched route as written>/module.stderr (WAGI's
    `prepare_stdio_streams` and `RoutingTableEntry::unique_key`; a `_routes` entry's route is
    the joined one). Each request adds at most the policy's `max_stderr_bytes`, the bound the
    stderr is held to anyway; the file grows as WAGI's did (rotate it as any log)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, route: str) -> Path:
        return self.folder / hashlib.sha256(route.encode()).hexdigest() / STDERR_FILE

    def __call__(self, route: str, data: bytes) -> None:
        """Append `data` (a gateway `StderrSink`: in the guest thread, never raises)."""
        path = self.path(route)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:  # one write on a local file; the loop covers a short one
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:  # the response is ready; the log says what was lost
            log.warning(
                "route %s: %d bytes of stderr not written to %s: %s", route, len(data), path, exc
            )
