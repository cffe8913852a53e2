"""The `wasm-supervisor` command.

Every flag of `serve` can also be set through the environment as `SUPERVISOR_<FLAG>` (upper
case, `-` → `_`), so a container sets its paths without a wrapper script; a flag given on the
command line wins. `--listen` defaults to `0.0.0.0:$PORT` (Knative sets `PORT`), `PORT`
defaulting to 8080.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import (
    __version__,
    admin,
    app,
    artifacts,
    client,
    loaded_modules,
    metrics,
    modules,
    policies,
    server,
    wagi_cli,
    workers,
)
from .auth import operator_token_sha256
from .errors import ConfigError
from .fork_server import ForkServer, ForkServerGone
from .store.settings import StoreSettings

DEFAULT_PORT = 8080

# LogRecord attributes that are not a request's own fields (the JSON formatter skips them).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(
            (key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _env_default(flag: str, default: str | None) -> str | None:
    return os.environ.get("SUPERVISOR_" + flag.upper().replace("-", "_"), default)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _tenant_names(value: str) -> frozenset[str]:
    """`a,b c`: commas or spaces between names; each must be a valid tenant name."""
    names = frozenset(value.replace(",", " ").split())
    try:
        metrics.TenantLabels(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return names


def _size(value: str) -> int:
    """Bytes, as policies write them: `2147483648`, `2GiB`, `500MB`."""
    try:
        return policies.parse_size(value)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"expected a size like 2GiB, got {value!r}") from exc


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (0 or more), got {value!r}")
    return seconds


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasm-supervisor", description="A multi-tenant host for WebAssembly HTTP handlers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the tenants over HTTP")
    port = os.environ.get("PORT", str(DEFAULT_PORT))
    options: list[tuple[str, dict]] = [
        (
            "listen",
            {"type": _listen_address, "default": f"0.0.0.0:{port}", "help": "HOST:PORT"},
        ),
        ("tenants", {"type": Path, "default": "tenants", "help": "tenant folders"}),
        ("policies", {"type": Path, "default": "policies", "help": "policy files"}),
        (
            "store",
            {
                "default": None,
                "help": "where uploads live: file:PATH (default: file:TENANTS) or"
                " nats://HOST:PORT[,HOST:PORT...] / tls://...",
            },
        ),
        (
            "store-credentials",
            {"type": Path, "default": None, "help": "NATS .creds file, or a file with a token"},
        ),
        (
            "store-ca",
            {
                "type": Path,
                "default": None,
                "help": "PEM CA bundle a tls:// store's certificate must chain to (default: the"
                " system's CAs)",
            },
        ),
        (
            "store-replicas",
            {
                "type": _positive_int,
                "default": "1",
                "help": "replicas of the NATS buckets (3 in production)",
            },
        ),
        (
            "store-prefix",
            {"default": "wasm-supervisor", "help": "NATS bucket names start with this"},
        ),
        (
            "cache",
            {
                "type": Path,
                "default": str(app.default_cache_dir()),
                "help": "compiled-artifact cache (never inside the tenants folder)",
            },
        ),
        (
            "cache-max-bytes",
            {
                "type": _size,
                "default": str(modules.DEFAULT_MAX_BYTES),
                "help": "bound of the artifact cache on disk (e.g. 2GiB); unused artifacts are"
                " evicted past it, least recently used first",
            },
        ),
        (
            "module-cache-bytes",
            {
                "type": _size,
                "default": str(loaded_modules.DEFAULT_MAX_BYTES),
                "help": "bound of the modules each worker keeps loaded in memory (e.g. 1GiB);"
                " least recently used evicted past it, loaded again from the artifact cache",
            },
        ),
        (
            "cache-min-age",
            {
                "type": _seconds,
                "default": str(modules.DEFAULT_MIN_AGE_S),
                "help": "seconds an artifact is kept after its last use by any process",
            },
        ),
        (
            "slots",
            {
                "type": _positive_int,
                "default": str(app.DEFAULT_SLOTS),
                "help": "execution slots: guests running at once",
            },
        ),
        (
            "global-queue",
            {
                "type": int,
                "default": str(app.DEFAULT_GLOBAL_QUEUE),
                "help": "requests waiting for a slot, all tenants together",
            },
        ),
        (
            "grace-period",
            {
                "type": float,
                "default": "30",
                "help": "seconds in-flight requests get to finish on SIGTERM",
            },
        ),
        (
            "max-connections",
            {
                "type": _positive_int,
                "default": str(server.ServerConfig().max_connections),
                "help": "connections open at once, at most (lowered to fit RLIMIT_NOFILE)",
            },
        ),
        (
            "max-idle-per-client",
            {
                "type": _positive_int,
                "default": str(server.ServerConfig().max_idle_per_client),
                "help": "idle keep-alive connections one client address may hold; past it,"
                " its oldest idle one is closed",
            },
        ),
        (
            "max-connections-per-client",
            {
                "type": _positive_int,
                "default": str(server.ServerConfig().max_connections_per_client),
                "help": "connections of any kind one client address may hold; past it, a new"
                " one is closed as soon as it is accepted",
            },
        ),
        (
            "metrics-listen",
            {
                "type": _listen_address,
                "default": f"0.0.0.0:{metrics.DEFAULT_METRICS_PORT}",
                "help": "HOST:PORT of /metrics (port 0: any free port)",
            },
        ),
        (
            "metrics-tenants",
            {
                "type": _tenant_names,
                "default": "",
                "help": "tenants with their own metric label, comma-separated; others: other",
            },
        ),
        (
            "admin-token-file",
            {
                "type": Path,
                "default": None,
                "help": "file holding the operator's admin token (else $SUPERVISOR_ADMIN_TOKEN)",
            },
        ),
        (
            "artifact-key-file",
            {
                "type": Path,
                "default": None,
                "help": "keys sealing the store's shared compiled artifacts, one KEY_ID:SECRET a"
                " line, the first signs (else $SUPERVISOR_ARTIFACT_KEY; neither: not shared)",
            },
        ),
        (
            "compile-threads",
            {
                "type": _positive_int,
                "default": str(admin.DEFAULT_COMPILE_THREADS),
                "help": "admin uploads compiled at once",
            },
        ),
        (
            "workers",
            {
                "type": _positive_int,
                "default": str(workers.default_workers()),
                "help": "worker processes (default: the CPUs this process may use); 1: one"
                " process, no supervisor",
            },
        ),
        ("log-format", {"choices": ["text", "json"], "default": "text"}),
        ("log-level", {"default": "info"}),
    ]
    # Internal: one worker process of `serve --workers N`, started by its supervisor with the
    # same serve arguments plus the file descriptors it inherits (workers.Handoff).
    worker = commands.add_parser("worker")
    for flag, spec in options:
        spec = dict(spec)
        spec["default"] = _env_default(flag, spec["default"])
        serve.add_argument(f"--{flag}", **spec)
        worker.add_argument(f"--{flag}", **spec)
    for parser_ in (serve, worker):
        for flag in ("tls-cert", "tls-key"):
            parser_.add_argument(
                f"--{flag}",
                type=Path,
                default=_env_default(flag, None),
                help="PEM file; with both --tls-cert and --tls-key, serve HTTPS",
            )
    insecure = client.insecure_registry_option()
    serve.add_argument("--insecure-registry", **insecure)
    worker.add_argument("--insecure-registry", **insecure)
    worker.add_argument("--listen-fd", type=int, action="append", required=True)
    worker.add_argument("--metrics-fd", type=int)
    for flag in ("ready-fd", "parent-fd", "pod-column"):
        worker.add_argument(f"--{flag}", type=int, required=True)
    worker.add_argument("--pod-counters", type=Path, required=True)

    policy = commands.add_parser("policy", help="policy tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy folder")
    check.add_argument(
        "--policies", type=Path, default=Path(_env_default("policies", "policies") or "policies")
    )
    client.add_commands(commands)

    store_command = commands.add_parser("store", help="store tools")
    store_commands = store_command.add_subparsers(dest="store_command", required=True)
    copy = store_commands.add_parser(
        "copy", help="copy every tenant's uploads (manifests, module bytes) to another store"
    )
    copy.add_argument("source", metavar="SRC", help="file:PATH, nats://... or tls://...")
    copy.add_argument("target", metavar="DST", help="file:PATH, nats://... or tls://...")
    for flag, spec in options:
        if flag.startswith("store-"):
            spec = dict(spec)
            spec["default"] = _env_default(flag, spec["default"])
            copy.add_argument(f"--{flag}", **spec)

    wagi_cli.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv[argv.index("serve") + 1 :])
    if args.command == "worker":
        return _worker(args)
    if args.command == "wagi":
        return wagi_cli.run(args)
    if args.command in client.COMMANDS:
        return client.run_command(args)
    if args.command == "store":
        return _store_copy(args)
    return _policy_check(args.policies)


def _serve(args: argparse.Namespace, serve_args: list[str]) -> int:
    """`serve_args`: the command line after `serve`, which the workers are started with."""
    configure_logging(args.log_format, args.log_level)
    config = _app_config(args)
    if config is None:
        return 2
    try:
        if args.workers > 1:
            return _supervise(config, args.workers, serve_args)
        faulthandler.enable()  # a fatal signal prints the Python stacks (workers.run_worker)
        trio.run(app.run, config)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _supervise(config: app.AppConfig, count: int, serve_args: list[str]) -> int:
    """`serve --workers N`: fork the fork server now, before `trio.run` starts any thread,
    with every module a worker imports already imported (the NATS client too, when the store
    is NATS: the file store never imports it)."""
    if config.store is not None and not config.store.is_file:
        importlib.import_module("supervisor.store.nats_store")
        importlib.import_module("supervisor.store.nats_artifacts")
    fork_server = ForkServer.start(workers.forked_worker(main, serve_args))
    try:
        return trio.run(workers.supervise, config, count, fork_server)
    except BaseExceptionGroup as group:  # raised in the supervisor's nursery
        gone = group.subgroup(ForkServerGone)
        if gone is None:
            raise
        print(f"error: {gone.exceptions[0]}: no worker can be started", file=sys.stderr)
        return 1
    finally:
        fork_server.close()


def _worker(args: argparse.Namespace) -> int:
    configure_logging(args.log_format, args.log_level)
    config = _app_config(args)
    if config is None:
        return 2
    handoff = workers.Handoff(
        listen_fds=tuple(args.listen_fd),
        metrics_fd=args.metrics_fd,
        ready_fd=args.ready_fd,
        parent_fd=args.parent_fd,
        pod_counters=args.pod_counters,
        pod_column=args.pod_column,
    )
    workers.run_worker(config, handoff)
    return 0


def _app_config(args: argparse.Namespace) -> app.AppConfig | None:
    """The configuration `serve` arguments describe; None (reason printed) if it is invalid."""
    host, port = args.listen
    metrics_host, metrics_port = args.metrics_listen
    if args.cache.resolve().is_relative_to(args.tenants.resolve()):
        print("error: --cache must not be inside --tenants (tenants write there)", file=sys.stderr)
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("error: --tls-cert and --tls-key go together: give both or neither", file=sys.stderr)
        return None
    if args.tls_cert is not None:
        try:
            server.tls_context(args.tls_cert, args.tls_key)  # a bad file fails here, named
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
    try:
        admin_token_sha256 = operator_token_sha256(args.admin_token_file, os.environ)
    except (OSError, ValueError) as exc:
        print(f"error: admin token: {exc}", file=sys.stderr)
        return None
    try:
        artifact_keys = artifacts.load_artifact_keys(args.artifact_key_file, os.environ)
    except (OSError, ValueError) as exc:
        print(f"error: artifact key: {exc}", file=sys.stderr)
        return None
    try:
        store_settings = StoreSettings.parse(
            args.store or f"file:{args.tenants}",
            credentials=args.store_credentials,
            ca_file=args.store_ca,
            replicas=args.store_replicas,
            prefix=args.store_prefix,
        )
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return None
    return app.AppConfig(
        host=host,
        port=port,
        tenants_dir=args.tenants,
        policies_dir=args.policies,
        cache_dir=args.cache,
        cache_max_bytes=args.cache_max_bytes,
        module_cache_bytes=args.module_cache_bytes,
        cache_min_age_s=args.cache_min_age,
        slots=args.slots,
        global_queue=args.global_queue,
        server=server.ServerConfig(
            grace_period_s=args.grace_period,
            max_connections=args.max_connections,
            max_idle_per_client=args.max_idle_per_client,
            max_connections_per_client=args.max_connections_per_client,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ),
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_tenants=args.metrics_tenants,
        admin_token_sha256=admin_token_sha256,
        compile_threads=args.compile_threads,
        insecure_registries=frozenset(args.insecure_registry),
        artifact_keys=artifact_keys,
        store=store_settings,
    )


def _store_copy(args: argparse.Namespace) -> int:
    """`store copy SRC DST`: 0 when every tenant was copied."""
    from .store.copy import copy_urls

    configure_logging("text", "info")
    try:
        source, target = (
            StoreSettings.parse(
                url,
                credentials=args.store_credentials,
                ca_file=args.store_ca,
                replicas=args.store_replicas,
                prefix=args.store_prefix,
            )
            for url in (args.source, args.target)
        )
        report = copy_urls(source, target)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"error: copying the store: {exc!r}", file=sys.stderr)
        return 1
    print(f"copied {report.tenants} tenants, {report.modules} module files")
    return 0


def _policy_check(directory: Path) -> int:
    """Print every policy problem, one per line; exit 1 if there is any."""
    try:
        policy_set = policies.load_policy_dir(directory)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    for error in policy_set.errors.values():
        print(error.message, file=sys.stderr)
    print(f"{len(policy_set.policies)} valid, {len(policy_set.errors)} invalid")
    return 1 if policy_set.errors else 0


if __name__ == "__main__":
    sys.exit(main())
