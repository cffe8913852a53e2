"""The admin API's client, and the `wasm-supervisor upload` / `modules` commands built on it.

    wasm-supervisor upload TENANT NAME FILE|oci:REF [--route R] [--entrypoint E] [--argv A]
                                                    [--volume G=F] [--insecure-registry H]
    wasm-supervisor modules list TENANT
    wasm-supervisor modules show|delete|rollback TENANT NAME

`--server` (or `SUPERVISOR_SERVER`) names the server, `--token` (or `SUPERVISOR_ADMIN_TOKEN`)
the bearer token: the operator's, or the tenant's own. On a terminal an upload shows a
progress bar while the body goes out, then the seconds the server has spent validating and
compiling it (the answer comes once the module is compiled and served). An `oci:` reference
instead of a file is pulled here, by the client, and its bytes uploaded: the server never
fetches a URL on a tenant's behalf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import oci

if TYPE_CHECKING:  # imported where used: `serve` builds this parser, and never needs httpx
    import httpx

__all__ = [
    "AdminClient",
    "AdminError",
    "Progress",
    "add_commands",
    "insecure_registry_option",
    "run_command",
]

API_PREFIX = "/_admin/v1"
DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "SUPERVISOR_SERVER"
TOKEN_ENV = "SUPERVISOR_ADMIN_TOKEN"
INSECURE_REGISTRY_ENV = "SUPERVISOR_INSECURE_REGISTRY"
COMMANDS = frozenset({"upload", "modules"})

UPLOAD_CHUNK_BYTES = 256 * 1024
"""One write of the upload body: a smooth progress bar, and still few writes."""
CONNECT_TIMEOUT_S = 10.0
RESPONSE_TIMEOUT_S = 600.0
"""An upload is answered once compiled: a 100 MB language runtime takes over a minute."""
PULL_MAX_BYTES = 4 * 1024**3
"""An `oci:` module pulled for upload: wasm32's cap; the server applies the tenant's own."""
PROGRESS_TICK_S = 0.1
BAR_WIDTH = 30


class AdminError(Exception):
    """The server refused a request: its status and the message it gave."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Progress:
    """One status line on a terminal: the upload's bytes, then the seconds spent compiling.

    Draws nothing unless `stream` is a terminal, so scripts and logs get only the result.
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._sent = 0
        self._started = time.monotonic()
        self._waiting_since: float | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def sent(self, count: int) -> None:
        self._sent += count
        if self._sent >= self.total:
            self._waiting_since = time.monotonic()
            if self.enabled and self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()
        self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(PROGRESS_TICK_S):
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        fraction = self._sent / self.total if self.total else 1.0
        filled = round(BAR_WIDTH * fraction)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"uploading [{bar}] {_size(self._sent)}/{_size(self.total)}"
        if self._waiting_since is not None:
            waited = time.monotonic() - self._waiting_since
            line += f"  validating and compiling {waited:.1f}s"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()


class AdminClient:
    """The admin API over httpx; every refusal raises AdminError with the server's message."""

    def __init__(self, server: str, token: str | None) -> None:
        import httpx  # ~100 ms of imports `serve` does not need (cli.py builds one parser)

        headers = {"authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(RESPONSE_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def upload(
        self,
        tenant: str,
        name: str,
        source: Path | bytes,
        *,
        route: str | None = None,
        entrypoint: str | None = None,
        argv: str | None = None,
        volumes: Sequence[str] = (),
        progress_stream: TextIO | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Upload `source` (a file, or the module's bytes) as module `name`; the record, and
        whether a new version was made."""
        params: list[tuple[str, str]] = [
            (key, value)
            for key, value in (("route", route), ("entrypoint", entrypoint), ("argv", argv))
            if value is not None
        ]
        params += [("volume", volume) for volume in volumes]
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        progress = Progress(size, progress_stream)

        def body() -> Iterator[bytes]:
            if isinstance(source, bytes):
                for start in range(0, size, UPLOAD_CHUNK_BYTES):
                    progress.sent(len(chunk := source[start : start + UPLOAD_CHUNK_BYTES]))
                    yield chunk
                return
            with source.open("rb") as file:
                while chunk := file.read(UPLOAD_CHUNK_BYTES):
                    progress.sent(len(chunk))
                    yield chunk

        try:
            response = self._http.put(
                self._module_url(tenant, name),
                params=params,
                content=body(),
                headers={"content-length": str(size), "content-type": "application/wasm"},
            )
        finally:
            progress.close()
        return self._json(response), response.status_code == 201

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return self._json(self._http.get(f"{API_PREFIX}/tenants/{tenant}/modules"))["modules"]

    def show(self, tenant: str, name: str) -> dict[str, Any]:
        return self._json(self._http.get(self._module_url(tenant, name)))

    def delete(self, tenant: str, name: str) -> dict[str, Any]:
        return self._json(self._http.delete(self._module_url(tenant, name)))

    def rollback(self, tenant: str, name: str) -> dict[str, Any]:
        return self._json(self._http.post(self._module_url(tenant, name) + "/rollback"))

    def tenant(self, tenant: str) -> dict[str, Any]:
        return self._json(self._http.get(f"{API_PREFIX}/tenants/{tenant}"))

    @staticmethod
    def _module_url(tenant: str, name: str) -> str:
        return f"{API_PREFIX}/tenants/{tenant}/modules/{name}"

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.is_success and document is not None:
            return document
        message = document.get("error") if isinstance(document, dict) else None
        raise AdminError(response.status_code, message or response.text.strip()[:300])


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add `upload` and `modules` to the `wasm-supervisor` parser."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"the server's URL (${SERVER_ENV}, default {DEFAULT_SERVER})",
    )
    connection.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"admin bearer token, the operator's or the tenant's (${TOKEN_ENV})",
    )
    upload = commands.add_parser(
        "upload", parents=[connection], help="upload a module (wasm or WAT) to a tenant"
    )
    upload.add_argument("tenant")
    upload.add_argument("name", help="the module's name: a-z 0-9 . _ -")
    upload.add_argument("file", help="a .wasm or .wat file, or an oci: reference to pull")
    upload.add_argument("--route", help="exact (/hello) or prefix (/api/...) route")
    upload.add_argument("--entrypoint", help="export to run (default _start)")
    upload.add_argument("--argv", help="argv template, as in modules.toml")
    upload.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="GUEST=FOLDER",
        help="read-only folder under the tenant's folder (repeatable)",
    )
    upload.add_argument("--insecure-registry", **insecure_registry_option())
    modules = commands.add_parser("modules", help="list and manage a tenant's modules")
    actions = modules.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[connection], help="the tenant's modules")
    listing.add_argument("tenant")
    for action, text in (
        ("show", "one module as JSON"),
        ("delete", "stop serving a module (rollback brings it back)"),
        ("rollback", "serve the previous version again"),
    ):
        parser = actions.add_parser(action, parents=[connection], help=text)
        parser.add_argument("tenant")
        parser.add_argument("name")


def insecure_registry_option() -> dict[str, Any]:
    """argparse keywords of the repeatable `--insecure-registry HOST[:PORT]` (`serve` and
    `upload`), whose default is $SUPERVISOR_INSECURE_REGISTRY (comma-separated hosts; the
    flags add to it). An invalid host there stops the command with a message naming it."""
    hosts = [host for host in os.environ.get(INSECURE_REGISTRY_ENV, "").split(",") if host]
    try:
        default = [oci.check_registry_host(host) for host in hosts]
    except oci.InvalidReference as exc:
        raise SystemExit(f"error: ${INSECURE_REGISTRY_ENV}: {exc}") from exc
    return {
        "type": _registry_host,
        "action": "append",
        "default": default,
        "metavar": "HOST[:PORT]",
        "help": "a registry spoken to over plain HTTP (repeatable); localhost:5000 and"
        " 127.0.0.1:5000 always are",
    }


def _registry_host(value: str) -> str:
    try:
        return oci.check_registry_host(value)
    except oci.InvalidReference as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def run_command(args: argparse.Namespace) -> int:
    """Run `upload` or `modules ...`; 1 when the server refuses or can't be reached."""
    import httpx

    try:
        with AdminClient(args.server, args.token) as client:
            _dispatch(client, args, sys.stdout)
    except AdminError as exc:
        print(f"error: {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: {args.server}: {exc}", file=sys.stderr)
        return 1
    except oci.PullError as exc:
        print(f"error: pulling the module: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _dispatch(client: AdminClient, args: argparse.Namespace, stdout: TextIO) -> None:
    if args.command == "upload":
        record, created = client.upload(
            args.tenant,
            args.name,
            _upload_source(args.file, args.insecure_registry),
            route=args.route,
            entrypoint=args.entrypoint,
            argv=args.argv,
            volumes=args.volume,
        )
        verb = "uploaded" if created else "unchanged"
        print(f"{verb} {args.tenant}/{_summary(record)}", file=stdout)
    elif args.action == "list":
        records = client.list(args.tenant)
        print(
            f"{'NAME':20} {'SHA256':12} {'SIZE':>9} {'COMPILE':>8}  UPLOADED  ROUTES", file=stdout
        )
        for record in records:
            print(
                f"{record['name']:20} {record['sha256'][:12]} {_size(record['size']):>9}"
                f" {record['compile_s']:>7.2f}s  {record['uploaded_at']}"
                f"  {' '.join(record['routes'])}",
                file=stdout,
            )
    elif args.action == "show":
        print(json.dumps(client.show(args.tenant, args.name), indent=2), file=stdout)
    elif args.action == "delete":
        record = client.delete(args.tenant, args.name)
        print(f"deleted {args.tenant}/{_summary(record)}", file=stdout)
    else:
        record = client.rollback(args.tenant, args.name)
        print(f"rolled back {args.tenant}/{_summary(record)}", file=stdout)


def _upload_source(file: str, insecure_registries: Sequence[str]) -> Path | bytes:
    """The file to upload, or the bytes of the module an `oci:` reference names (pulled here;
    the tag resolved and the digest printed on stderr)."""
    if not oci.is_reference(file):
        return Path(file)
    with oci.RegistryClient(insecure_registries=insecure_registries) as registry:
        pulled = registry.pull_module(file, max_bytes=PULL_MAX_BYTES)
    print(f"pulled {pulled.reference} ({pulled.manifest_digest})", file=sys.stderr)
    return pulled.content


def _summary(record: dict[str, Any]) -> str:
    return (
        f"{record['name']} sha256:{record['sha256'][:12]} {_size(record['size'])}"
        f" compiled in {record['compile_s']:.2f}s, serving {' '.join(record['routes'])}"
    )


def _size(count: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= factor:
            return f"{count / factor:.1f} {unit}"
    return f"{count} B"
