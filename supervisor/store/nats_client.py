"""One NATS connection per process, on an asyncio loop in a thread of its own.

nats-py is asyncio; the supervisor serves on trio, and its store calls come from worker
threads. So the connection lives on a private asyncio loop in a daemon thread, and the rest of
the process reaches it two ways, neither of which blocks the trio loop:

- `call(make_coro, timeout=...)` from a worker thread (never from the trio thread): runs the
  coroutine on the loop and waits for its result. While NATS is unreachable it raises
  `StoreUnavailable` at once, so a caller answers 503 instead of hanging for a timeout.
- `spawn(make_coro)` starts a long-lived task on the loop (a watch). Such a task hands its
  events to trio with `trio.lowlevel.TrioToken.run_sync_soon`, which never blocks.

The client reconnects forever (`max_reconnect_attempts=-1`; nats-py's default gives up after
60 attempts), and the first connection is retried forever too (nats-py raises on a first
connect that fails): a pod that starts while NATS is down becomes ready when NATS returns.
Every (re)connection runs the `on_connect` listeners, so watches can be re-created and
anything missed reconciled (a KV watch was seen to stall 16 s after a server restart).

URLs: `nats://HOST:PORT[,HOST:PORT...]`, or `tls://...` for TLS. A `tls://` store trusts the
system's CAs, or only those of `--store-ca FILE` (a PEM bundle): a flag, not `SSL_CERT_FILE`,
because that variable would also replace the CAs of every other TLS client in the process.
Credentials (`--store-credentials FILE`): a NATS `.creds` file (a user JWT and its NKey seed,
signed in with the `nkeys` package), or a file holding a token. Every fault of these is named
with the URL or the file it comes from: in `serve`'s error, the log, `/healthz` and 503s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, Rejected

__all__ = ["NatsConnection", "NatsSettings", "StoreUnavailable", "parse_nats_url"]

log = logging.getLogger("supervisor.store.nats")

T = TypeVar("T")

RECONNECT_WAIT_S = 0.5
"""Between reconnect attempts: a restarted nats-server is back within a second, and a pod
that waits longer serves stale manifests longer."""
CONNECT_TIMEOUT_S = 2.0
"""One connection attempt; a server that does not answer in 2 s is not there."""
DEFAULT_CALL_TIMEOUT_S = 10.0
"""A store call that takes longer has lost its server (the admin API then answers 503)."""
STORE_RETRY_AFTER_S = 2
"""Retry-After of a 503 answered because the store is unreachable: about a reconnect."""
_CREDS_MARKER = "-----BEGIN NATS USER JWT-----"
_SEED_MARKER = "-----BEGIN USER NKEY SEED-----"
_SCHEMES = {"nats": "nats", "tls": "tls"}


class StoreUnavailable(Rejected):
    """The store cannot be reached now; retrying later may work (503 with Retry-After)."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message, status=503, reason="store_unavailable", retry_after=STORE_RETRY_AFTER_S
        )


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """How to reach NATS: servers, TLS, credentials. Built by `parse_nats_url`."""

    servers: tuple[str, ...]
    tls: bool
    credentials: Path | None = None
    ca_file: Path | None = None  # the CAs a tls:// store's certificate must chain to

    @property
    def url(self) -> str:
        return ",".join(self.servers)


def parse_nats_url(
    url: str, *, credentials: Path | None = None, ca_file: Path | None = None
) -> NatsSettings:
    """`nats://h:p[,h:p...]` or `tls://...` -> settings. Raises ConfigError naming the fault."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigError("--store", None, f"{url!r}: expected nats://HOST:PORT or tls://...")
    servers = []
    for part in rest.split(","):
        hostport = part.strip().rstrip("/")
        parsed = urllib.parse.urlsplit(f"{scheme}://{hostport}")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or port is None or parsed.path:
            raise ConfigError("--store", None, f"{url!r}: {part!r} is not HOST:PORT")
        servers.append(f"{scheme}://{hostport}")
    if credentials is not None:
        _read_credentials(credentials)
    if ca_file is not None:
        if scheme != "tls":
            raise ConfigError("--store-ca", None, f"{ca_file}: only a tls:// store uses a CA")
        _tls_context(ca_file)
    return NatsSettings(tuple(servers), scheme == "tls", credentials, ca_file)


def _read_credentials(path: Path) -> dict[str, str]:
    """The nats-py options that sign in with the file at `path`: a `.creds` file (its user JWT
    and NKey seed) or a token. Raises ConfigError naming the file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise ConfigError("--store-credentials", None, f"{path}: cannot read: {reason}") from exc
    if _CREDS_MARKER in text:
        if _SEED_MARKER not in text:
            raise ConfigError(
                "--store-credentials", None, f"{path}: a .creds file without its NKey seed"
            )
        try:
            import nkeys  # noqa: F401 (nats-py signs the server's nonce with it)
        except ImportError as exc:
            raise ConfigError(
                "--store-credentials", None, f"{path}: a .creds file needs the nkeys package"
            ) from exc
        return {"user_credentials": str(path)}
    token = text.strip()
    if not token or any(char.isspace() for char in token):
        raise ConfigError(
            "--store-credentials", None, f"{path}: neither a NATS .creds file nor one token"
        )
    return {"token": token}


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying TLS: against `ca_file` only, or the system's CAs. Raises ConfigError."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--store-ca", None, f"{ca_file}: not a PEM CA bundle ({exc})") from exc


class NatsConnection:
    """A nats-py client and its JetStream context, owned by a private asyncio loop."""

    def __init__(self, settings: NatsSettings, *, name: str = "wasm-supervisor") -> None:
        self.settings = settings
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="nats-loop", daemon=True)
        self._client: Any = None  # nats.aio.client.Client once connected
        self._jetstream: Any = None
        self._connected = threading.Event()
        self._closing = False
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self.last_error = "not connected yet"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop and connect in the background (forever, until `close`)."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect_forever(), self._loop)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        """Drain nothing, close the client, stop the loop (at exit: pending calls fail)."""
        if not self._thread.is_alive():
            return
        self._closing = True
        future = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout=CONNECT_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CONNECT_TIMEOUT_S)

    def on_connect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Run `listener()` on the loop after every (re)connection, and now if connected."""
        self._listeners.append(listener)
        if self.connected:
            asyncio.run_coroutine_threadsafe(self._run_listener(listener), self._loop)

    # -- calls -------------------------------------------------------------------------------

    @property
    def jetstream(self) -> Any:
        """The JetStream context; only inside coroutines run by `call` or `spawn`."""
        if self._jetstream is None:
            raise StoreUnavailable(f"store unreachable: {self.last_error}")
        return self._jetstream

    def call(
        self,
        make_coro: Callable[[], Awaitable[T]],
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT_S,
        wait_connected: float = 0.0,
    ) -> T:
        """Run `make_coro()` on the loop and return its result. Worker threads only.

        Raises StoreUnavailable when NATS is unreachable now (after waiting up to
        `wait_connected` seconds for it) or the call times out or loses its connection.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("NatsConnection.call from its own loop would deadlock")
        if not self._connected.wait(wait_connected):
            raise StoreUnavailable(f"store unreachable: {self.last_error}")
        future: Future[T] = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self._awaitable(make_coro), timeout), self._loop
        )
        try:
            return future.result(timeout + 1.0)
        except StoreUnavailable:
            raise
        except TimeoutError as exc:
            future.cancel()
            raise StoreUnavailable(f"store call timed out after {timeout:g} s") from exc
        except Exception as exc:
            if _is_connection_error(exc):
                raise StoreUnavailable(f"store unreachable: {exc!r}") from exc
            raise

    def spawn(self, make_coro: Callable[[], Awaitable[None]]) -> Future[None]:
        """Run `make_coro()` as a task on the loop; errors are logged, not raised."""
        return asyncio.run_coroutine_threadsafe(self._logged(make_coro), self._loop)

    # -- inside the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @staticmethod
    async def _awaitable(make_coro: Callable[[], Awaitable[T]]) -> T:
        return await make_coro()

    async def _logged(self, make_coro: Callable[[], Awaitable[None]]) -> None:
        try:
            await make_coro()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("store task failed")

    async def _connect_forever(self) -> None:
        import nats  # imported here: the file store never pays for it

        attempt = 0
        while not self._closing:
            attempt += 1
            try:
                client = await nats.connect(**self._options())
            except Exception as exc:
                self._note_failure(exc)
                if attempt == 1 or attempt % 20 == 0:
                    log.warning(
                        "store: %s; retrying every %.1f s", self.last_error, RECONNECT_WAIT_S
                    )
                await asyncio.sleep(RECONNECT_WAIT_S)
                continue
            self._client = client
            self._jetstream = client.jetstream()
            log.info("store: connected to NATS at %s", client.connected_url.netloc)
            await self._connected_now()
            return

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "servers": list(self.settings.servers),
            "name": self._name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": RECONNECT_WAIT_S,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
        }
        if self.settings.tls:
            options["tls"] = _tls_context(self.settings.ca_file)
        if self.settings.credentials is not None:  # read again: a Secret may have rotated
            options.update(_read_credentials(self.settings.credentials))
        return options

    def _describe(self, exc: BaseException) -> str:
        """Why NATS cannot be used, naming the URL, and the CA or credentials file at fault."""
        if isinstance(exc, ConfigError):
            return f"NATS at {self.settings.url}: {exc.message}"
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            trusted = self.settings.ca_file or "the system's CAs"
            return (
                f"NATS at {self.settings.url}: its TLS certificate is not trusted by"
                f" {trusted} ({reason})"
            )
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            signed_in = self.settings.credentials or "no --store-credentials"
            return f"NATS at {self.settings.url} refused the sign-in with {signed_in} ({reason})"
        return f"NATS at {self.settings.url}: {reason}"

    async def _connected_now(self) -> None:
        """Listeners first (they open buckets), then callers may `call`."""
        for listener in list(self._listeners):
            await self._run_listener(listener)
        self._connected.set()

    async def _run_listener(self, listener: Callable[[], Awaitable[None]]) -> None:
        try:
            await listener()
        except Exception:
            log.exception("store: a reconnect listener failed")

    async def _disconnected(self) -> None:
        if self._connected.is_set() and not self._closing:
            log.warning("store: lost NATS; reconnecting")
        self.last_error = "connection lost; reconnecting"
        self._connected.clear()

    async def _reconnected(self) -> None:
        log.info("store: reconnected to NATS at %s", self._client.connected_url.netloc)
        await self._connected_now()

    async def _error(self, exc: Exception) -> None:
        self._note_failure(exc)

    def _note_failure(self, exc: BaseException) -> None:
        """Keep a refused sign-in as the reason over the hang-up that follows it: the server
        closes the connection after refusing, and the client may see the reset first."""
        description = self._describe(exc)
        hung_up = isinstance(exc, (ConnectionError, EOFError)) or type(exc).__name__ in (
            "UnexpectedEOF",
            "ConnectionClosedError",
        )
        if hung_up and " refused the sign-in " in self.last_error:
            return
        self.last_error = description

    async def _close(self) -> None:
        """Close the client, then end every task of the loop (watches), so none is left
        pending when the loop stops."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _is_connection_error(exc: BaseException) -> bool:
    """A failure that means "NATS is not reachable now", not "the request was wrong"."""
    from nats import errors as nats_errors

    kinds = (
        nats_errors.ConnectionClosedError,
        nats_errors.ConnectionDrainingError,
        nats_errors.ConnectionReconnectingError,
        nats_errors.NoServersError,
        nats_errors.StaleConnectionError,
        nats_errors.TimeoutError,
        nats_errors.NoRespondersError,
        ConnectionError,
    )
    return isinstance(exc, kinds)
